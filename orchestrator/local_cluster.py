"""`orch cluster up --local | down`: a persistent Ray head and an MLflow server on this machine, stopped by pid.

`ray start --head --block` is the head: it stays in the foreground of a process we own and, on SIGTERM,
stops every Ray process it started, so `down` never needs `ray stop` (which would also stop every other
Ray cluster on the machine). Pids, ports, URLs and the token's path live in $ORCH_HOME/local/cluster.json.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator.jobs_client import MLFLOW_PORT_LABEL
from orchestrator.warm_pool import WARM_POOL_LABEL, warm_pool_env

# Seconds Ray's stop_job waits between SIGTERM and SIGKILL: time for the driver to checkpoint and close its run.
STOP_GRACE_S = 60
RAY_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                  "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
                  "--node-manager-port", "--object-manager-port")


def orch_home() -> Path:
    return Path(os.environ.get("ORCH_HOME") or Path.home() / ".orch")


def state_file() -> Path:
    return orch_home() / "local" / "cluster.json"


def load_state() -> dict[str, Any] | None:
    """The running local cluster, or None; a state whose head process is gone counts as none."""
    path = state_file()
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return state if _alive(state["processes"]["ray"]) else None


def free_ports(host: str, count: int) -> list[int]:
    """Held open together so they are distinct; a port can still be taken before Ray binds it (then `up` fails)."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            probe.bind((host, 0))
            sockets.append(probe)
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def up(console, host: str = "127.0.0.1", dashboard_host: str = "127.0.0.1", num_cpus: float | None = None,
       num_gpus: int | None = None, warm_s: int = 600, timeout_s: float = 180) -> dict[str, Any]:
    existing = load_state()
    _clear_stale()
    if existing:
        console.print(f"a local cluster is already up (dashboard {existing['dashboard_url']}); `orch cluster down` "
                      f"stops it")
        return existing
    home = orch_home() / "local"
    home.mkdir(parents=True, exist_ok=True)
    token_path = home / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))  # 256 bits, as Ray's own generator
    ports = dict(zip(("gcs", "dashboard", "client", "agent", "agent_grpc", "metrics", "runtime_env", "node_manager",
                      "object_manager", "autoscaler_metrics", "dashboard_metrics"), free_ports(host, 11)))
    mlflow_port = free_ports(host, 1)[0]
    state = {
        "host": host,
        "gcs_address": f"{_url_host(host)}:{ports['gcs']}",
        "dashboard_url": f"http://{_url_host(dashboard_host)}:{ports['dashboard']}",
        "mlflow_url": f"http://{_url_host(host)}:{mlflow_port}",
        "token_path": str(token_path),
        # Ray's unix sockets live under its temp dir, and their paths must stay under ~107 characters.
        "ray_temp_dir": tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp"),
        "storage_path": str(home / "orch_runs"),
        "logs": {"ray": str(home / "ray-head.log"), "mlflow": str(home / "mlflow.log")},
        "started_at": time.time(),
        "warm_s": warm_s,
        "processes": {},
    }
    env = _head_env(state, ports)
    started: list[subprocess.Popen] = []
    try:
        mlflow = _start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                         f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "mlartifacts"),
                         "--host", host, "--port", str(mlflow_port), "--workers", "1",
                         # MLflow answers only the Host names it expects (DNS-rebinding guard): this address too.
                         "--allowed-hosts", f"{_url_host(host)}:{mlflow_port},localhost:*,127.0.0.1:*"],
                        env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, state["logs"]["mlflow"], started)
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                   "--node-ip-address", host, "--node-name", "head", "--dashboard-host", dashboard_host,
                   "--temp-dir", state["ray_temp_dir"],
                   "--labels", f"{MLFLOW_PORT_LABEL}={mlflow_port},{WARM_POOL_LABEL}={warm_s}"]
        for flag, port in zip(RAY_PORT_FLAGS, ports.values()):
            command += [flag, str(port)]
        if num_cpus is not None:
            command += ["--num-cpus", f"{num_cpus:g}"]
        if num_gpus is not None:
            command += ["--num-gpus", str(num_gpus)]
        ray = _start(command, env, state["logs"]["ray"], started)
        state["processes"] = {"ray": _identity(ray.pid), "mlflow": _identity(mlflow.pid)}
        _wait_ready(state, ray, mlflow, timeout_s)
    except BaseException:
        for process in started:
            if process.poll() is None:
                _stop_tree({"pid": process.pid, "create_time": _identity(process.pid)["create_time"]}, grace_s=10,
                           whole_family=True)
        token_path.unlink(missing_ok=True)
        raise
    state_file().write_text(json.dumps(state, indent=2))
    return state


def down(console, stop_jobs: bool = True) -> bool:
    state = load_state()
    path = state_file()
    if state is None:
        _clear_stale()
        console.print("no local cluster is running")
        return False
    if stop_jobs:
        _stop_running_jobs(console, state)
    # `ray start --block` stops the Ray processes it started itself, gracefully, on SIGTERM.
    _stop_tree(state["processes"]["ray"], grace_s=90)
    _stop_tree(state["processes"]["mlflow"], grace_s=15, whole_family=True)
    Path(state["token_path"]).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    console.print(f"stopped the local cluster (Ray head pid {state['processes']['ray']['pid']}, MLflow server pid "
                  f"{state['processes']['mlflow']['pid']}); logs kept in {Path(state['logs']['ray']).parent}")
    return True


def _clear_stale() -> None:
    """A head that died on its own leaves its state file and maybe its MLflow server: clean both up."""
    path = state_file()
    if path.is_file() and load_state() is None:
        stale = json.loads(path.read_text())
        _stop_tree(stale["processes"].get("mlflow"), grace_s=10, whole_family=True)
        Path(stale["token_path"]).unlink(missing_ok=True)
        path.unlink()


def _head_env(state: dict[str, Any], ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "ORCH_CLUSTER")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_GRACE_S)),
        # Ray's metrics servers default to fixed ports; two clusters on one machine would collide.
        "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]),
        "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
        "RAY_USAGE_STATS_ENABLED": "0",
        # `down` stops the jobs gracefully itself; Ray's own drain on SIGTERM (for Serve) only adds 30 s.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        # What jobs on this cluster use when their spec names no tracking URI or checkpoint folder.
        "MLFLOW_TRACKING_URI": state["mlflow_url"],
        "ORCH_STORAGE_PATH": state["storage_path"],
        # Job entrypoints run `python -m orchestrator`: the same interpreter as this CLI.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **(warm_pool_env() if state["warm_s"] else {}),
    })
    if state["host"] in ("127.0.0.1", "localhost", "::1"):
        # Ray rewrites 127.0.0.1 to the machine's LAN address, and then listens on every interface,
        # unless it believes it is a single-node (laptop) cluster: that keeps every port on loopback.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def _start(command: list[str], env: dict[str, str], log: str, started: list) -> subprocess.Popen:
    with open(log, "ab") as out:
        # A session of its own: Ctrl-C in the user's terminal must not reach the cluster.
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    started.append(process)
    return process


def _wait_ready(state: dict[str, Any], ray: subprocess.Popen, mlflow: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    token = Path(state["token_path"]).read_text().strip()
    checks = {"MLflow server": (state["mlflow_url"] + "/health", mlflow, None, state["logs"]["mlflow"]),
              "Ray head": (state["dashboard_url"] + "/api/v0/nodes?limit=1", ray, token, state["logs"]["ray"])}
    for name, (url, process, bearer, log) in checks.items():
        while not _answers(url, bearer):
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited during start-up (code {process.returncode}); "
                                   f"the end of {log}:\n{_tail(log)}")
            if time.time() > deadline:
                raise RuntimeError(f"the {name} did not answer at {url} within {timeout_s:.0f} s; "
                                   f"the end of {log}:\n{_tail(log)}")
            time.sleep(0.5)


def _answers(url: str, bearer: str | None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200 and (bearer is None or b'"ALIVE"' in response.read())
    except (OSError, ValueError):
        return False


def _tail(log: str) -> str:
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-15:])


def _stop_running_jobs(console, state: dict[str, Any]) -> None:
    """Drivers close their MLflow runs as KILLED on SIGTERM; stopping the head first would SIGKILL them."""
    from orchestrator.job_commands import settle_run
    from orchestrator.jobs_client import ClusterClient

    try:
        client = ClusterClient(state["dashboard_url"])
        running = [job for job in client.jobs() if job.status in ("PENDING", "RUNNING")]
    except Exception as exc:  # a broken dashboard must not keep the cluster up
        console.print(f"[yellow]could not list the cluster's jobs ({exc}); stopping it anyway[/]")
        return
    for job in running:
        console.print(f"stopping job {job.id} first")
        client.stop(job.id)
    for job in running:
        settle_run(client.wait(job.id, timeout_s=STOP_GRACE_S + 30))


def _identity(pid: int) -> dict[str, Any]:
    import psutil

    return {"pid": pid, "create_time": psutil.Process(pid).create_time()}


def _alive(identity: dict[str, Any] | None) -> bool:
    """The same process as recorded: a pid alone may have been reused by an unrelated program."""
    import psutil

    if not identity:
        return False
    try:
        process = psutil.Process(identity["pid"])
        return abs(process.create_time() - identity["create_time"]) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_tree(identity: dict[str, Any] | None, grace_s: float, whole_family: bool = False) -> None:
    """SIGTERM the recorded process (and its children too when `whole_family`: the MLflow server's launcher
    does not pass the signal on), then SIGKILL whatever of them outlives the grace period."""
    import psutil

    if not _alive(identity):
        return
    root = psutil.Process(identity["pid"])
    family = [root, *root.children(recursive=True)]
    for process in family if whole_family else [root]:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
