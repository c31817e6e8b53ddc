"""Jobs on a two-node Ray cluster through the real CLI: submit/list/status/logs/stop, refusals, security.

One cluster serves the module: `orch cluster up --local --host 127.0.0.2` (a head Ray does not rewrite to
the LAN address, so other nodes can join) plus a second node joined with `ray start --address`, 2 CPUs
each. Runs are recorded in the cluster's own MLflow server, found through the head's label.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster_helpers import (TRANSCRIPT, orch, shell_env, start_cluster, start_worker_node, stop_cluster,
                             stop_process, wait_for)
from conftest import ASSETS, ORCH, wait_for_line
from orchestrator.local_cluster import free_ports

pytestmark = pytest.mark.slow
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("orch_home")
    # No warm processes: their imports after each job would load the 2 cores under the tests that follow.
    state = start_cluster(home, "--host", "127.0.0.2", "--num-cpus", "2", "--warm-minutes", "0")
    worker_dir = Path(state["ray_temp_dir"] + "-node-2")
    worker_dir.mkdir()
    worker = start_worker_node(state["gcs_address"], state["token_path"], worker_dir, "node-2", cpus=2)
    try:
        wait_for(lambda: "node-2" in orch(["cluster", "status"], env=shell_env(home)).stdout, 120,
                 "the second node to join")
        yield home, state
    finally:
        stop_process(worker)
        stop_cluster(home, state)
        shutil.rmtree(worker_dir, ignore_errors=True)
        print("\ntimings (s):", {k: round(v, 2) for k, v in TIMINGS.items()})


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("project") / "cluster_project"
    shutil.copytree(ASSETS / "cluster_project", target)
    return target


def submitted_id(output: str) -> str:
    found = re.search(r"submitted job (orch-[\w.-]+)", output)
    assert found, output
    return found[1]


def mlflow(state):
    from mlflow import MlflowClient

    return MlflowClient(state["mlflow_url"])


def test_strict_spread_puts_one_worker_on_each_node_and_the_job_names_its_run(cluster, project):
    home, state = cluster
    env = shell_env(home)
    status = orch(["cluster", "status"], env=env)
    assert "in all: CPU 4 free of 4" in status.stdout and re.search(r"node-2 .*2/2", status.stdout), status.stdout
    result = orch(["submit", "job.yaml", "scaling.placement=STRICT_SPREAD", "tracking.system_metrics_interval=0.5",
                   "--cluster", state["dashboard_url"]],
                  env=env, cwd=project, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    job_id = submitted_id(output)
    assert f"job {job_id}: SUCCEEDED" in output and "Traceback" not in output, output
    placed = re.findall(r"\[rank (\d) @ ([\w.-]+)\] probe: rank \1 of 2 on node (\w+)", output)
    assert sorted(rank for rank, _, _ in placed) == ["0", "1"], output
    assert {node for _, node, _ in placed} == {"head", "node-2"}, placed  # labelled by node: one worker each
    assert len({node_id for _, _, node_id in placed}) == 2

    # The run is in the cluster's MLflow server and names its job; the job names its run.
    client = mlflow(state)
    runs = client.search_runs([client.get_experiment_by_name("cluster-tests").experiment_id],
                              f"tags.`orch.ray_job_id` = '{job_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["scaling.placement"] == "STRICT_SPREAD" and run.data.metrics["val/acc"] > 0.5
    assert run.data.tags["orch.cluster"] == state["dashboard_url"]
    assert Path(run.data.tags["orch.best_checkpoint"]).is_relative_to(state["storage_path"])
    # Hardware series from both nodes, side by side: both share this host's name, so the node id tells them apart.
    sampled = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    assert len(sampled) == 2, (sampled, {k: v for k, v in run.data.tags.items() if "system_metrics" in k}, output[-6000:])
    for node in sampled:
        cpu = [m.value for m in client.get_metric_history(run.info.run_id, f"system/{node}/cpu_utilization_percentage")]
        assert cpu and all(0 <= value <= 100 for value in cpu), (node, cpu)

    listed = orch(["list"], env=env)  # no --cluster: the local cluster `orch cluster up` started
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and run.info.run_id in row and "probe" in row

    status = orch(["status", job_id], env=env)
    assert status.returncode == 0 and f"{run.info.run_id} (FINISHED)" in status.stdout, status.stdout

    logs = orch(["logs", job_id], env=env)
    lines = logs.stdout.splitlines()
    assert logs.returncode == 0 and len(lines) > 10
    unlabelled = [line for line in lines if not re.match(r"^\[(rank \d+|driver|\w+) @ [\w.-]+\] ", line)]
    assert not unlabelled, unlabelled
    assert any(line.startswith("[rank 1 @ ") and "probe: rank 1" in line for line in lines)
    assert any(line.startswith("[driver @ head] ") and "FINISHED" in line for line in lines)


def test_ctrl_c_detaches_a_queued_job_waits_and_stop_closes_runs_killed(cluster, project):
    home, state = cluster
    env = shell_env(home)
    # A terminal on stdin, as a user has: Ctrl-C asks whether to stop the job or detach; the answer is "d".
    terminal, stdin = pty.openpty()
    follower = subprocess.Popen([ORCH, "submit", "job.yaml", "trainer.max_epochs=500", "model.init_args.sleep_per_step=0.05",
                                 "--cluster", state["dashboard_url"]], env=env, cwd=project, text=True, stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    os.close(stdin)
    try:
        seen = wait_for_line(follower, "epoch 1 ", timeout=240)
        follower.send_signal(signal.SIGINT)
        time.sleep(1)
        os.write(terminal, b"d\n")  # waits in the terminal until the prompt reads it
        rest, _ = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
        os.close(terminal)
    TRANSCRIPT.append(seen + rest)
    assert "[s]top / [d]etach" in rest and "detached" in rest and follower.returncode == 0, seen + rest
    long_job = submitted_id(seen)
    assert "RUNNING" in orch(["status", long_job], env=env).stdout

    # 4 workers fit the cluster's 4 CPUs, but the running job holds 2 of them: accepted, and told why it waits.
    queued = orch(["submit", "job.yaml", "scaling.num_workers=4", "--cluster", state["dashboard_url"], "--detach"],
                  env=env, cwd=project)
    assert queued.returncode == 0, queued.stderr
    assert "queued: other work holds the resources it needs (CPU 2 of 4 in use)" in queued.stderr
    waiting_job = queued.stdout.strip()
    assert re.fullmatch(r"orch-probe-[0-9a-f]{6}", waiting_job), queued.stdout  # --detach: stdout is the id alone

    follow_logs = subprocess.Popen([ORCH, "logs", long_job, "-f"], env=env, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
    try:
        TRANSCRIPT.append(wait_for_line(follow_logs, "probe: rank 1 of 2", timeout=60))
        follow_logs.send_signal(signal.SIGINT)
        assert follow_logs.wait(timeout=30) == 0
    finally:
        if follow_logs.poll() is None:
            follow_logs.kill()

    for job_id in (waiting_job, long_job):
        started = time.time()
        stopped = orch(["stop", job_id], env=env, timeout=200)
        TIMINGS[f"stop {'queued' if job_id == waiting_job else 'running'} job"] = time.time() - started
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"job {job_id}: STOPPED" in stopped.stdout and "KILLED" in stopped.stdout, stopped.stdout

    client = mlflow(state)
    experiment = client.get_experiment_by_name("cluster-tests").experiment_id
    for job_id in (waiting_job, long_job):
        run = client.search_runs([experiment], f"tags.`orch.ray_job_id` = '{job_id}'")[0]
        assert run.info.status == "KILLED", (job_id, run.info.status)
    # The running job's driver closed its own run (gracefully, before any SIGKILL) and kept its checkpoints.
    logs = orch(["logs", long_job], env=env).stdout
    assert "[driver @ head] KILLED" in logs, logs[-3000:]
    run = client.search_runs([experiment], f"tags.`orch.ray_job_id` = '{long_job}'")[0]
    assert "orch.error" not in run.data.tags or "closed by orch" not in run.data.tags["orch.error"]
    folder = Path(run.data.tags["orch.storage_path"]) / run.data.tags["orch.ray_run_name"]
    assert folder.parent == Path(state["storage_path"]) and folder.name.startswith("probe_"), folder
    assert any(folder.glob("checkpoint_*")), f"no checkpoint in {folder}"


def test_impossible_requests_are_refused_in_seconds_and_nothing_is_sent(cluster, project):
    home, state = cluster
    env = shell_env(home)
    before = orch(["list"], env=env).stdout.count("orch-probe-")
    cases = {
        "too many CPUs": (["scaling.num_workers=5"], "asks for 5 CPU (5 workers x 1); the cluster has 4 in all, short by 1"),
        "worker larger than any node": (["scaling.num_workers=1", "scaling.cpus_per_worker=3"],
                                        "one worker needs 3 CPU on a single node; the largest node has 2 CPU"),
        "GPUs on a CPU cluster": (["scaling.use_gpu=true"],
                                  "asks for 2 GPU (2 workers x 1); the cluster has 0 in all, short by 2"),
        "STRICT_SPREAD over more nodes than exist": (
            ["scaling.num_workers=3", "scaling.placement=STRICT_SPREAD"],
            "needs 3 nodes with 1 CPU free each; the cluster has 2 such node(s) (head, node-2), short by 1"),
    }
    for name, (overrides, message) in cases.items():
        started = time.time()
        result = orch(["submit", "job.yaml", *overrides, "--cluster", state["dashboard_url"]], env=env, cwd=project)
        TIMINGS[f"refuse: {name}"] = time.time() - started
        assert result.returncode == 2, result.stdout + result.stderr
        assert message in result.stderr and "nothing was sent" in result.stderr, result.stderr
        assert TIMINGS[f"refuse: {name}"] < 60
    assert orch(["list"], env=env).stdout.count("orch-probe-") == before


def test_unreachable_addresses_fail_fast_with_a_clear_error(cluster, project):
    home, state = cluster
    env = shell_env(home)
    port = free_ports("127.0.0.1", 1)[0]
    for args, message in (
        (["submit", "job.yaml", "--cluster", f"http://127.0.0.1:{port}"], f"no Ray dashboard answers at http://127.0.0.1:{port}"),
        (["list", "--cluster", f"http://127.0.0.1:{port}"], f"no Ray dashboard answers at http://127.0.0.1:{port}"),
        (["submit", "job.yaml", "--cluster", f"127.0.0.1:{port}"], f"no Ray cluster answers at 127.0.0.1:{port}"),
    ):
        started = time.time()
        result = orch(args, env=env, cwd=project, timeout=120)
        TIMINGS[f"unreachable: {args[0]} {args[-1][:4]}"] = time.time() - started
        assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    wrong_token = orch(["list"], env={**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong_token.returncode == 2 and "refused the connection" in wrong_token.stderr, wrong_token.stderr


def test_a_project_over_the_upload_limit_is_refused_with_its_size(cluster, project, tmp_path):
    home, state = cluster
    heavy = tmp_path / "heavy_project"
    shutil.copytree(project, heavy)
    (heavy / "data").mkdir()
    (heavy / "data" / "blob.bin").write_bytes(bytes(range(256)) * 2048)  # 512 KiB
    (heavy / "outputs").mkdir()
    (heavy / "outputs" / "ignored.bin").write_bytes(b"x" * 4_000_000)
    (heavy / ".gitignore").write_text("outputs/\n")  # respected: not counted, not uploaded
    env = shell_env(home, RAY_max_grpc_message_size=str(256 * 1024))  # Ray's own knob for its upload limit
    result = orch(["submit", "job.yaml", "--cluster", state["dashboard_url"]], env=env, cwd=heavy)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(r"packs to 5\d\d\.\d\d KiB, over Ray's upload limit of 256\.00 KiB", result.stderr), result.stderr
    largest = re.search(r"largest: ([^)]*)\)", result.stderr)[1]
    assert largest.startswith("data 512.00 KiB") and "outputs" not in largest, largest


def test_the_token_is_never_printed_logged_or_recorded(cluster):
    home, state = cluster
    token = Path(state["token_path"]).read_text().strip()
    assert len(token) == 64
    env = shell_env(home)
    jobs = re.findall(r"orch-probe-[0-9a-f]{6}", orch(["list"], env=env).stdout)
    texts = list(TRANSCRIPT) + [orch(["logs", job], env=env).stdout for job in set(jobs)]
    assert jobs and not [text for text in texts if token in text]
    roots = (home, Path(state["ray_temp_dir"]), Path(state["ray_temp_dir"] + "-node-2"))
    files = [p for root in roots for p in root.rglob("*")
             if p.is_file() and p != Path(state["token_path"]) and not p.is_symlink()]
    leaked = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert not leaked, leaked
    client = mlflow(state)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs
    for run in runs:
        assert token not in str(run.data.params) and token not in str(run.data.tags)
        if any(a.path == "spec" for a in client.list_artifacts(run.info.run_id)):
            spec = Path(client.download_artifacts(run.info.run_id, "spec/resolved.yaml")).read_text()
            assert token not in spec
