"""Faults end to end: real Ray workers killed, real signals to the CLI, a real MLflow server stopped and restarted.

The job (tests/assets/faults_project) trains 2 DDP workers for 3 epochs of 8 steps, logs every step, and
checkpoints every 3 steps and every epoch; dropout and shuffling make any replay error visible in the weights.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import ASSETS, ORCH, prepared_store, run_orch

pytestmark = pytest.mark.slow

STEPS = list(range(24))  # every logged step of the job, 0-based
EPOCH_ENDS = [7, 15, 23]


def project(tmp_path: Path) -> Path:
    target = tmp_path / "faults_project"
    shutil.copytree(ASSETS / "faults_project", target)
    return target


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([ORCH, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen, timeout: float = 420) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return output


def signal_after(process: subprocess.Popen, needle: str, sig: int, timeout: float = 300, delay: float = 1.0) -> str:
    """Read output until `needle`, wait `delay`, send `sig`; return the whole output once the process ends."""
    seen, deadline = [], time.time() + timeout
    for line in process.stdout:
        seen.append(line)
        if needle in line:
            time.sleep(delay)
            process.send_signal(sig)
            break
        if time.time() > deadline:
            break
    return "".join(seen) + finish(process)


def runs(uri: str, experiment: str = "faults") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow import MlflowClient

    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def assert_complete_series(uri: str, run_id: str) -> None:
    """One value per step, in order, none missing: what a restart or a resume must leave behind."""
    assert steps(uri, run_id, "train/loss_step") == STEPS
    assert steps(uri, run_id, "epoch") == STEPS
    assert steps(uri, run_id, "val/acc") == EPOCH_ENDS
    assert steps(uri, run_id, "train/loss_epoch") == EPOCH_ENDS


def final_weights(run) -> dict[str, torch.Tensor]:
    path = Path(run.data.tags["orch.last_checkpoint"], "checkpoint.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory, migrated_store):
    """The same job, never interrupted; started in the background by the first test that needs it."""
    folder = tmp_path_factory.mktemp("reference")
    uri = prepared_store(folder, migrated_store)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_TRACKING_URI=uri, RAY_ADDRESS=ray_address, PYTHONUNBUFFERED="1", COLUMNS="200")
    process = start(["submit", "job.yaml", f"checkpoint.storage_path={folder}/ckpt"], env, project(folder))
    cache: dict = {}

    def weights() -> dict[str, torch.Tensor]:
        if not cache:
            output = finish(process)
            assert process.returncode == 0, output
            (run,) = runs(uri)
            assert run.info.status == "FINISHED"
            assert_complete_series(uri, run.info.run_id)
            cache.update(final_weights(run))
        return cache

    yield weights
    if process.poll() is None:
        process.kill()


def test_a_killed_worker_restarts_from_its_checkpoint_exactly(cluster_env, tracking_uri, tmp_path, reference):
    # Rank 0 is SIGKILLed in the middle of epoch 2 (step 13); checkpoints come every 3 steps.
    killed = start(["submit", "job.yaml", f"checkpoint.storage_path={tmp_path}/ckpt", "model.init_args.kill_at_step=13",
                    f"model.init_args.marker={tmp_path}/kills", "model.init_args.sleep_per_step=0.2"],
                   cluster_env, project(tmp_path))
    output = finish(killed)
    assert killed.returncode == 0, output
    assert "attempt 1 failed: rank 0: the worker process died" in output
    (run,) = runs(tracking_uri)  # one MLflow run for the whole job
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["orch.attempts"] == "2"
    assert tags["orch.attempt.1.failure"].startswith("rank 0: the worker process died")
    resumed_at = int(tags["orch.attempt.2.start_step"])
    assert 0 < resumed_at < 13, resumed_at  # from a checkpoint, not from scratch
    assert (tmp_path / "kills").read_text().count("\n") == 1
    # The steps the killed attempt ran after its checkpoint were run again: logged once, by the new attempt.
    assert_complete_series(tracking_uri, run.info.run_id)
    difference = max_difference(final_weights(run), reference())
    print(f"resumed at step {resumed_at}; max |weight difference| vs the uninterrupted run: {difference:.3g}")
    assert difference <= 1e-6


def test_stop_checkpoints_and_resume_carries_on_exactly(cluster_env, tracking_uri, tmp_path, reference):
    """SIGTERM is what `orch stop` (Ray's stop_job) and schedulers send; Ctrl-C takes the same path."""
    folder = project(tmp_path)
    job = start(["submit", "job.yaml", f"checkpoint.storage_path={tmp_path}/ckpt", "model.init_args.sleep_per_step=0.3"],
                cluster_env, folder)
    output = signal_after(job, "epoch 1 ", signal.SIGTERM)
    assert job.returncode == 130, output
    (run,) = runs(tracking_uri)
    run_id = run.info.run_id
    assert run.info.status == "KILLED"
    assert f"continue with `orch resume {run_id}`" in output
    stopped_at = int(output.split("checkpoint at step ")[1].split()[0])
    assert 8 < stopped_at < 24, output
    assert f"checkpoint at step {stopped_at} saved" in run.data.tags["orch.error"]

    resumed = run_orch(["resume", run_id], env=cluster_env, cwd=tmp_path, timeout=420)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output
    (run,) = runs(tracking_uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["orch.resumes"] == "1" and tags["orch.attempt.2.start_step"] == str(stopped_at)
    assert tags["orch.resume.1.after"].startswith("KILLED: stopped by")
    assert "orch.error" not in tags
    assert_complete_series(tracking_uri, run_id)
    difference = max_difference(final_weights(run), reference())
    print(f"stopped at step {stopped_at}; max |weight difference| vs the uninterrupted run: {difference:.3g}")
    assert difference <= 1e-6


def test_a_nonfinite_loss_stops_the_job_or_is_skipped(cluster_env, tmp_path, migrated_store):
    stop_dir, skip_dir = tmp_path / "stop", tmp_path / "skip"
    stop_uri, skip_uri = prepared_store(stop_dir, migrated_store), prepared_store(skip_dir, migrated_store)
    nan = ["model.init_args.nan_at_step=5", "model.init_args.nan_rank=1"]  # rank 1 only: rank 0's loss is fine
    # Stop: rank 1's gradients stay finite, so rank 0 can only stop at step 5 by hearing of rank 1's loss.
    stop = start(["submit", "job.yaml", f"checkpoint.storage_path={stop_dir}/ckpt", "failure.max_failures=1", *nan,
                  "model.init_args.nan_gradients=false"],
                 {**cluster_env, "MLFLOW_TRACKING_URI": stop_uri}, project(stop_dir))
    skip = start(["submit", "job.yaml", f"checkpoint.storage_path={skip_dir}/ckpt", "failure.nonfinite_loss=skip", *nan],
                 {**cluster_env, "MLFLOW_TRACKING_URI": skip_uri}, project(skip_dir))

    output = finish(stop)
    assert stop.returncode == 1, output
    message = "non-finite loss (nan) at step 5 on rank 1"
    assert message in output
    (run,) = runs(stop_uri)
    assert run.info.status == "FAILED" and message in run.data.tags["orch.error"]
    assert run.data.tags["orch.attempts"] == "1"  # deterministic: not retried despite max_failures=1
    assert steps(stop_uri, run.info.run_id, "train/loss_step") == [0, 1, 2, 3, 4]  # the curve up to it

    output = finish(skip)
    assert skip.returncode == 0, output
    (run,) = runs(skip_uri)
    assert run.info.status == "FINISHED"
    assert steps(skip_uri, run.info.run_id, "orch/nonfinite_skipped") == [5]
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())  # both ranks skipped that step
    assert_complete_series(skip_uri, run.info.run_id)


def test_nonfinite_gradients_stop_the_job_before_a_checkpoint_keeps_them(cluster_env, tmp_path, migrated_store):
    """Under `stop` with DDP the gradients are not read every step (faults.FaultGuard): NaN gradients reach the
    weights, and the job stops at the next step's loss or at the next checkpoint, whichever comes first, with no
    checkpoint of NaN weights."""
    jobs = {}
    # Step 4's gradients: step 5's loss is NaN on every rank (no checkpoint at 5: every 3 steps).
    # Step 5's gradients: the checkpoint at step 6 finds the weights NaN before it is written.
    for name, step in (("loss", 4), ("checkpoint", 5)):
        folder = tmp_path / name
        uri = prepared_store(folder, migrated_store)
        process = start(["submit", "job.yaml", f"checkpoint.storage_path={folder}/ckpt", "failure.max_failures=1",
                         f"model.init_args.nan_at_step={step}", "model.init_args.nan_rank=1",
                         "model.init_args.nan_gradients_only=true"],
                        {**cluster_env, "MLFLOW_TRACKING_URI": uri}, project(folder))
        jobs[name] = (process, uri)
    expected = {"loss": "non-finite loss (nan) at step 5 on rank",
                "checkpoint": "non-finite weights at step 6"}
    for name, (process, uri) in jobs.items():
        output = finish(process)
        assert process.returncode == 1, output
        assert expected[name] in output
        (run,) = runs(uri)
        assert run.info.status == "FAILED" and expected[name] in run.data.tags["orch.error"]
        assert run.data.tags["orch.attempts"] == "1"  # never retried: it would recur
        if name == "loss":
            assert "the weights are non-finite" in run.data.tags["orch.error"]
        kept = sorted((tmp_path / name / "ckpt").rglob("checkpoint.ckpt"))
        assert kept, f"no checkpoint kept under {tmp_path / name / 'ckpt'}"  # the step-3 one at least
        for path in kept:
            weights = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
            assert all(torch.isfinite(w).all() for w in weights.values()), path


def test_exhausted_retries_end_failed_with_each_cause(cluster_env, tracking_uri, tmp_path):
    # One worker, 16 steps per epoch; killed at step 20 on both attempts; max_failures=1 allows one retry.
    result = run_orch(["submit", "job.yaml", f"checkpoint.storage_path={tmp_path}/ckpt", "scaling.num_workers=1",
                       "trainer.max_epochs=2", "failure.max_failures=1", "model.init_args.kill_at_step=20",
                       "model.init_args.kill_times=2", f"model.init_args.marker={tmp_path}/kills",
                       "model.init_args.sleep_per_step=0.05"], env=cluster_env, cwd=project(tmp_path), timeout=420)
    assert result.returncode == 1, result.stdout + result.stderr
    (run,) = runs(tracking_uri)
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["orch.attempts"] == "2"
    for attempt in (1, 2):
        assert tags[f"orch.attempt.{attempt}.failure"] == \
            "rank 0: the worker process died (killed, out of memory, or its node lost)"
    resumed_at = int(tags["orch.attempt.2.start_step"])
    assert 0 < resumed_at < 20  # the second attempt resumed from a checkpoint
    # Steps up to the last committed checkpoint, each once; those after it died with the killed worker.
    logged = steps(tracking_uri, run.info.run_id, "train/loss_step")
    assert logged == list(range(len(logged))) and len(logged) >= resumed_at


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art"),
         "--workers", "1"],
        cwd=folder, stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise AssertionError((folder / "server.log").read_text())
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start:\n" + (folder / "server.log").read_text())


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # a crash, not a polite shutdown
        process.wait()


def test_a_tracking_server_outage_loses_no_metric(cluster_env, tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(port, tmp_path)
    try:
        job = start(["submit", "job.yaml", f"checkpoint.storage_path={tmp_path}/ckpt", "model.init_args.sleep_per_step=0.3"],
                    {**cluster_env, "MLFLOW_TRACKING_URI": uri}, project(tmp_path))
        seen = []
        for line in job.stdout:
            seen.append(line)
            if "epoch 1 " in line:
                _kill_group(server)  # training goes on while nothing answers
                time.sleep(3)
                server = _mlflow_server(port, tmp_path)
                break
        output = "".join(seen) + finish(job)
        assert job.returncode == 0, output
        (run,) = runs(uri)
        assert run.info.status == "FINISHED"
        assert_complete_series(uri, run.info.run_id)
    finally:
        _kill_group(server)
