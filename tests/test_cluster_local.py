"""`orch cluster up --local | status | down` as a user runs them: everything on loopback, stopped by pid."""

from __future__ import annotations

import ipaddress
import stat
import time
from pathlib import Path

import psutil
import pytest

from cluster_helpers import family, orch, shell_env, start_cluster, stop_cluster
from conftest import copy_user_project

pytestmark = pytest.mark.slow


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def warm_processes(ray_pid: int, within_s: float) -> tuple[list[psutil.Process], float]:
    """The idle processes kept warm under the cluster's Ray, polled until some appear or within_s runs out."""
    started = time.monotonic()
    while True:
        warm = [p for p in family(ray_pid) if _command(p).startswith("ray::IDLE")]
        waited = time.monotonic() - started
        if warm or waited > within_s:
            return warm, waited
        time.sleep(0.5)


def pool_report(state: dict) -> str:
    """What Ray's processes are and what the raylet said about starting and ending workers: for a failure's message."""
    commands = [f"  {p.pid} {_command(p)[:160]}" for p in family(state["processes"]["ray"]["pid"])]
    said = []
    for log in Path(state["ray_temp_dir"]).glob("session_latest/logs/raylet*.out"):
        said += [line.rstrip()[:240] for line in log.read_text(errors="replace").splitlines()
                 if any(word in line.lower() for word in ("prestart", "kill", "keep_alive", "idle", "exit"))]
    return "processes:\n" + "\n".join(commands) + "\nraylet:\n" + "\n".join(said[-60:])


def test_up_listens_only_on_loopback_keeps_workers_warm_and_down_stops_everything(tmp_path):
    home = tmp_path / "orch_home"
    state = start_cluster(home, "--num-cpus", "2")
    try:
        processes = family(state["processes"]["ray"]["pid"]) + family(state["processes"]["mlflow"]["pid"])
        listeners = []
        for process in processes:
            try:
                listeners += [(process.name(), c.laddr) for c in process.net_connections("inet") if c.status == "LISTEN"]
            except psutil.Error:
                continue
        assert len(listeners) >= 6, listeners  # GCS, raylet, dashboard, its agents, MLflow, ...
        assert all(loopback(address.ip) for _, address in listeners), \
            [entry for entry in listeners if not loopback(entry[1].ip)]
        assert stat.S_IMODE(Path(state["token_path"]).stat().st_mode) == 0o600

        env = shell_env(home)
        again = orch(["cluster", "up", "--local"], env=env)
        assert again.returncode == 0 and "already up" in again.stdout  # one cluster, not a second one
        status = orch(["cluster", "status"], env=env)
        assert status.returncode == 0, status.stderr
        for fragment in ("head", "127.0.0.1", "2/2", state["dashboard_url"], state["mlflow_url"], "running jobs: none",
                         state["token_path"]):
            assert fragment in status.stdout, (fragment, status.stdout)

        # Warm processes (warm_pool.py): the end of a job asks Ray for processes like its actors', Lightning
        # imported; the same job sent again starts its workers in them. Sent as a user sends jobs, through the
        # Jobs API, so the job's own runtime env (its uploaded project) has to match as well.
        project = copy_user_project(tmp_path)
        outputs = []
        for _ in range(2):
            job = orch(["submit", "job.yaml", "trainer.max_epochs=1", "--cluster", state["dashboard_url"]], env=env,
                       cwd=project, timeout=300)
            assert job.returncode == 0, job.stdout + job.stderr
            outputs.append(job.stdout)
        from mlflow import MlflowClient

        client = MlflowClient(state["mlflow_url"])
        experiment = client.get_experiment_by_name("user-project")
        first, second = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
        assert first.data.metrics["orch/warm_workers"] == 0, outputs[0]
        assert second.data.metrics["orch/warm_workers"] == 2, outputs[1]
        assert first.data.metrics["debug/wrapped_in_ddp"] == second.data.metrics["debug/wrapped_in_ddp"] == 1
        assert "2 of 2 workers warm" in outputs[1] and "workers warm" not in outputs[0]
        # A warm process imported PyTorch before Ray told it its CPU share: it must still compute with the threads
        # a fresh process uses (one CPU per worker here), or two workers oversubscribe the cores.
        assert second.data.tags["orch.torch_threads"] == first.data.tags["orch.torch_threads"] == "1,1"
        # The refill at the second job's end only asks the raylet for processes: they start in the background and
        # take the "ray::IDLE" title once connected to Ray, seconds later on a loaded machine (CI has two cores).
        warm, waited = warm_processes(state["processes"]["ray"]["pid"], within_s=90)
        assert warm, "no warm process kept within 90 s of the second job's end\n" + pool_report(state)
        print(f"\nwarm processes after the second job: {len(warm)}, seen after {waited:.1f} s")
        processes += warm  # `down` must stop these too

        started = time.time()
        down = orch(["cluster", "down"], env=env, timeout=240)
        took = time.time() - started
        assert down.returncode == 0 and "stopped the local cluster" in down.stdout, down.stdout + down.stderr
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, alive
        assert not Path(state["token_path"]).exists() and not (home / "local" / "cluster.json").exists()
        print(f"\ncluster down took {took:.1f} s")
        after = orch(["list"], env=env)
        assert after.returncode == 2 and "orch cluster up --local" in after.stderr
    finally:
        stop_cluster(home, state)
