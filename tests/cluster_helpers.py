"""Helpers for the cluster tests: a user's shell environment, a cluster started and stopped through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import run_orch

TRANSCRIPT: list[str] = []  # every output the CLI produced in these tests: scanned for the token


def shell_env(orch_home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no cluster or tracking URI named, no token in the environment, a private ORCH_HOME."""
    dropped = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ORCH_CLUSTER", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"ORCH_HOME": str(orch_home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}, **extra)
    return env


def orch(args: list[str], env: dict[str, str], cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_orch(args, env=env, cwd=cwd or os.getcwd(), timeout=timeout)
    TRANSCRIPT.append(result.stdout + result.stderr)
    return result


def start_cluster(orch_home: Path, *args: str) -> dict:
    env = shell_env(orch_home)
    result = orch(["cluster", "up", "--local", *args], env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((orch_home / "local" / "cluster.json").read_text())


def family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def stop_cluster(orch_home: Path, state: dict) -> None:
    """`orch cluster down`; whatever it left of what `up` started is killed here, by pid, and reported."""
    pids = [state["processes"]["ray"]["pid"], state["processes"]["mlflow"]["pid"]]
    processes = [p for pid in pids for p in family(pid)]
    if (orch_home / "local" / "cluster.json").exists():
        orch(["cluster", "down", "--force"], env=shell_env(orch_home), timeout=240)
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()
    shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    assert not alive, f"left running after down: {alive}"


def start_worker_node(gcs_address: str, token_path: str, temp_dir: Path, name: str, cpus: int) -> subprocess.Popen:
    """A second node joined the way a user joins one: `ray start --address`, in the foreground, on free ports."""
    from orchestrator.local_cluster import free_ports

    ray = str(Path(sys.executable).parent / "ray")  # the venv's, as `orch` is
    ports = free_ports("127.0.0.1", 6)
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    command = [ray, "start", "--address", gcs_address, "--block", "--num-cpus", str(cpus), "--node-name", name,
               "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    for flag, port in zip(flags, ports):
        command += [flag, str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    log = open(temp_dir.parent / f"{name}.log", "wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(process: subprocess.Popen, grace_s: float = 60) -> None:
    members = family(process.pid)
    process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for member in alive:
        member.kill()


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
