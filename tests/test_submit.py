"""`orch submit` end to end: the real CLI, a real Ray cluster (shared by the session), a real MLflow store."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ORCH, REPO, copy_user_project, only_run, run_orch, wait_for_line

pytestmark = pytest.mark.slow


def test_digits_default_spec_trains_and_records_everything(orch_env, tracking_uri, tmp_path):
    # The quickstart's path: no cluster named, so the command starts (and ends) Ray in its own process.
    launched = time.time()
    result = run_orch(["submit", str(REPO / "jobs/digits.yaml"), f"checkpoint.storage_path={tmp_path}/ckpt"],
                      env=orch_env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    client, run = only_run(tracking_uri, "digits")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    for fragment in ("FINISHED", "final metrics", "val/acc", "best checkpoint", run_id, f"orch ui --run {run_id}",
                     "start-up: imports"):
        assert fragment in output, f"{fragment!r} missing from:\n{output}"
    # Ray's known noise stays out of the terminal, and so do MLflow's notes on creating this new store's tables.
    for noise in ("Failed to query Ray Train Controller", "Traceback", "token authentication", "mlflow.store",
                  "database tables"):
        assert noise not in output, output
    # The progress view starts as the workers are launched, not once the run is open: on a new store the run
    # opens seconds into training (orch/run_open_s), and the epochs trained meanwhile used to appear all at once.
    started_line = re.search(r"^(\d\d:\d\d:\d\d) starting 2 workers\s*$", result.stdout, re.MULTILINE)
    assert started_line, output
    launched_at = launched + sum(run.data.metrics[f"orch/startup/{name}_s"]
                                 for name in ("imports", "preflight", "ray_start", "launch"))
    day = time.strftime("%Y-%m-%d", time.localtime(launched))
    shown_at = time.mktime(time.strptime(f"{day} {started_line[1]}", "%Y-%m-%d %H:%M:%S"))
    shown_at += 86400 if shown_at < launched - 43200 else 0  # past midnight
    assert shown_at <= launched_at + 2, (time.strftime("%H:%M:%S", time.localtime(launched_at)),
                                         run.data.metrics["orch/run_open_s"], output)

    # Where the wait before the first step went, phase by phase, adding up to the time to the first step.
    phases = {key: value for key, value in run.data.metrics.items() if key.startswith("orch/startup/")}
    assert set(phases) == {f"orch/startup/{name}_s" for name in
                           ("imports", "preflight", "ray_start", "launch", "workers_start", "setup", "first_step")}
    assert all(value >= 0 for value in phases.values())
    assert sum(phases.values()) == pytest.approx(run.data.metrics["orch/first_step_s"], abs=0.05)
    # Both workers took a process prestarted while the driver planned (warm_pool.prestart_for_this_job): Ray
    # matched the runtime environment the driver predicted for them, byte for byte.
    assert run.data.metrics["orch/warm_workers"] == 2, output
    # One of them planned the model (worker_plan.py): the driver of a cold start imports no Lightning.
    assert run.data.tags["orch.planned_by"].startswith("worker process "), run.data.tags

    # The default spec must reach 95 % validation accuracy.
    assert run.data.metrics["val/acc"] >= 0.95, run.data.metrics

    # Params: the resolved spec, flattened with dotted names.
    params = run.data.params
    assert params["trainer.max_epochs"] == "10"
    assert params["scaling.num_workers"] == "2"
    assert params["model.class_path"] == "jobs.digits.DigitsCNN"
    assert params["model.init_args.lr"] == "0.002"

    # Parameter counts and size at the training precision.
    metrics = run.data.metrics
    assert metrics["model/params_total"] == 151_498
    assert metrics["model/params_trainable"] == 151_498
    assert metrics["model/params_non_trainable"] == 0
    assert metrics["model/size_bytes"] == 151_498 * 4
    assert metrics["model/params_by_module/features"] + metrics["model/params_by_module/classifier"] == 151_498

    # Tags: where and how it ran.
    tags = run.data.tags
    assert tags["orch.world_size"] == "2" and tags["orch.strategy"] == "ddp" and tags["orch.accelerator"] == "cpu"
    for package in ("torch", "lightning", "ray", "mlflow"):
        assert tags[f"orch.version.{package}"][0].isdigit()
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["orch.git_dirty"] in ("true", "false")
    assert tags["orch.hostnames"]
    assert tags["recipe"] == "digits"
    assert Path(tags["orch.best_checkpoint"]).is_dir()

    # Artifacts: the resolved spec and the model summary.
    artifacts = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for a in client.list_artifacts(run_id, "spec")} | {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"spec/resolved.yaml", "model/summary.txt"} <= artifacts

    # Rank 0 alone logs: one value per step, per epoch metrics once per epoch.
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss_step")]
    assert steps == sorted(set(steps)) and len(steps) >= 10
    assert len(client.get_metric_history(run_id, "val/acc")) == 10
    assert len(client.get_metric_history(run_id, "train/acc_epoch")) == 10


def test_user_module_outside_jobs_with_overrides(cluster_env, tracking_uri, tmp_path):
    project = copy_user_project(tmp_path)
    # Side by side, as a user sweeping a setting would: two drivers on one cluster, one worker each.
    jobs = [subprocess.Popen([ORCH, "submit", "job.yaml", "trainer.max_epochs=1", "scaling.num_workers=1",
                              f"model.init_args.lr={lr}"], env=cluster_env, cwd=project, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for lr in ("0.1", "0.05")]
    for job in jobs:
        try:
            output, _ = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
        assert job.returncode == 0, output
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("user-project")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert {r.data.params["model.init_args.lr"] for r in runs} == {"0.1", "0.05"}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["trainer.max_epochs"] == "1"
        assert run.data.tags["orch.world_size"] == "1"
        assert run.data.metrics["model/params_total"] == 18  # Linear(8, 2)
        # One rank has no one to reduce gradients with: the model trains without DDP's wrapper (distributed.py).
        assert run.data.metrics["debug/wrapped_in_ddp"] == 0
        # Ranks run at the default priority, as torchrun's do, not at Ray's nice 15 for workers (cluster.py).
        assert run.data.metrics["debug/niceness"] == 0
    # Runs compare side by side: the same param and metric names in both.
    assert set(runs[0].data.params) == set(runs[1].data.params)
    assert set(runs[0].data.metrics) == set(runs[1].data.metrics)


def test_verbose_shows_what_every_process_says_on_the_local_default(orch_env, tracking_uri, tmp_path):
    """--verbose is the way to see everything: Ray's own lines and each worker's output, which the local default
    otherwise keeps out of the terminal (no log monitor runs there then, cluster.py).

    Also a cold start of a user's project outside jobs/: its model is planned in a prestarted worker process
    (worker_plan.py), which finds the project's module as the driver would, and the driver itself never imports
    PyTorch or Lightning (Python's own import log, which only the driver writes to this terminal unlabelled)."""
    project = copy_user_project(tmp_path)
    result = run_orch(["submit", "job.yaml", "--verbose", "trainer.max_epochs=1", "scaling.num_workers=1"],
                      env={**orch_env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=project, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Started a local Ray instance" in output, output
    worker_lines = [line for line in output.splitlines() if "(RayTrainWorker pid=" in line]
    assert any("[rank 0 @ " in line and "`Trainer.fit` stopped" in line for line in worker_lines), output
    _, run = only_run(tracking_uri, "user-project")
    assert run.info.status == "FINISHED"
    assert run.data.tags["orch.planned_by"].startswith("worker process "), run.data.tags
    assert run.data.metrics["model/params_total"] > 0
    driver_imports = [line.rpartition("|")[2].strip() for line in result.stderr.splitlines()
                      if line.startswith("import time:")]
    assert "ray.train" in driver_imports, result.stderr[-2000:]  # (the import log is there to read)
    assert not {"torch", "lightning", "lightning.pytorch"} & set(driver_imports)


def test_a_failing_job_is_marked_failed_with_its_error(cluster_env, tracking_uri, tmp_path):
    project = copy_user_project(tmp_path)
    result = run_orch(["submit", "job.yaml", "model.init_args.fail_at_step=3", "failure.max_failures=0"],
                      env=cluster_env, cwd=project, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "failed on purpose at step 3" in output
    _, run = only_run(tracking_uri, "user-project")
    assert run.info.status == "FAILED"
    assert "failed on purpose at step 3" in run.data.tags["orch.error"]


def test_ctrl_c_marks_the_run_killed(cluster_env, tracking_uri, tmp_path):
    """A second Ctrl-C does not wait for the checkpoint the first one asked for; the run is still closed."""
    project = copy_user_project(tmp_path)
    process = subprocess.Popen(
        [ORCH, "submit", "job.yaml", "trainer.max_epochs=100", "model.init_args.sleep_per_step=0.05",
         "checkpoint.stop_timeout_s=600"],
        env=cluster_env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "epoch 1 ", timeout=240)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    assert "checkpoint at step" not in output  # it did not wait for the workers' checkpoint
    _, run = only_run(tracking_uri, "user-project")
    assert run.info.status == "KILLED"


def test_plan_and_dry_run_start_nothing(orch_env, tracking_uri):
    env = {**orch_env, "RAY_ADDRESS": "127.0.0.1:1"}  # reaching for Ray would fail loudly
    plan = run_orch(["plan", str(REPO / "jobs/digits.yaml"), "scaling.num_workers=1"], env=env, timeout=120)
    assert plan.returncode == 0, plan.stderr
    for fragment in ("world size", "1 workers", "151.50 K", "num_workers: 1", "checkpoint_score_attribute: val/acc"):
        assert fragment in plan.stdout, fragment
    dry = run_orch(["submit", "--dry-run", str(REPO / "jobs/digits.yaml")], env=env, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "nothing was started" in dry.stdout and "151.50 K" in dry.stdout
    as_json = run_orch(["plan", "--json", str(REPO / "jobs/digits.yaml")], env=env, timeout=120)
    data = json.loads(as_json.stdout)
    assert data["parameters"]["total"] == 151_498 and data["ray"]["scaling"]["num_workers"] == 2
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_sigterm_marks_the_run_killed(orch_env, tracking_uri, tmp_path):
    """Schedulers and Ray's stop_job send SIGTERM; the run must be closed as KILLED, never left RUNNING.

    On the local default, where ray.init runs in a thread, and on a new store, whose run opens seconds into
    training: the first epoch usually ends before it is open, and the stop must still be graceful."""
    project = copy_user_project(tmp_path)
    process = subprocess.Popen(
        [ORCH, "submit", "job.yaml", "trainer.max_epochs=100", "model.init_args.sleep_per_step=0.05",
         f"checkpoint.storage_path={tmp_path}/ckpt"],
        env=orch_env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_line(process, "epoch 1 ", timeout=240)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    _, run = only_run(tracking_uri, "user-project")
    assert run.info.status == "KILLED"
    # Graceful: the workers checkpointed the step they were at, and the user is told how to go on.
    assert "checkpoint at step" in output and f"orch resume {run.info.run_id}" in output, output
    assert Path(run.data.tags["orch.last_checkpoint"]).is_dir()
    assert run.data.metrics.get("val/acc") is not None  # the epochs trained before the run opened are recorded
    # ray.init's core worker puts abseil's failure handler on SIGTERM, which says so in the terminal and aborts the
    # process 3 s later, mid graceful stop: the driver takes SIGTERM back.
    assert "SIGTERM received" not in output, output
    print("stopped while the run was opening" if "opening the MLflow run" in output else "stopped after the run opened")


@pytest.mark.parametrize("before", ["", "sleep 4; "])
def test_start_up_counts_from_orch_not_from_the_shell_it_replaced(before):
    """A shell that execs orch as its last command hands it its pid and its creation time (cli.py)."""
    probe = f"{sys.executable} -c 'import time, orchestrator.cli as c; print(time.time() - c.STARTED_AT)'"
    result = subprocess.run(["bash", "-c", f"{before}exec {probe}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    since_start = float(result.stdout)
    assert 0 < since_start < 3.5, since_start  # not the 4 s the shell slept before it became orch


def test_start_up_counts_from_the_moment_the_process_was_made():
    """Not up to a second earlier, as psutil's create_time() is (it adds ticks to a boot time rounded down to
    whole seconds): every start-up phase `orch` reports, and the benchmarks' comparison with plain Lightning
    (which counts from the harness's clock), would carry that error."""
    probe = [sys.executable, "-c", "import orchestrator.cli as c; print(repr(c.STARTED_AT))"]
    for _ in range(3):
        before = time.time()
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        after = time.time()
        assert result.returncode == 0, result.stderr
        started_at = float(result.stdout)
        # The kernel's start ticks are 10 ms apart: allow two of them, and the clocks' reading, before `before`.
        assert before - 0.025 <= started_at <= after, (started_at - before, after - before)
