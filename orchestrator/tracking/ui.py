"""`orch ui`: the MLflow UI over the same store `orch submit` writes to, on loopback by default."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from rich.console import Console

from orchestrator.tracking.uri import redact, resolve_tracking_uri


def free_port(host: str, start: int) -> int:
    for port in range(start, start + 100):
        with socket.socket() as probe:
            if probe.connect_ex((host, port)) != 0:
                return port
    raise RuntimeError(f"no free port on {host} between {start} and {start + 99}")


def run_page(tracking_uri: str, run_id: str) -> str:
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


def serve_ui(console: Console, tracking_uri: str | None, host: str, port: int, run_id: str | None) -> int:
    uri = resolve_tracking_uri(tracking_uri)
    page = ""
    if run_id:
        try:
            page = run_page(uri, run_id)
        except Exception as exc:  # a wrong id should not stop the UI from opening
            console.print(f"[yellow]run {run_id} not found in {redact(uri)}: {exc}[/]")
    port = free_port(host, port)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    # Its own process group: `mlflow server` starts uvicorn and a job runner beneath it, and stopping only the
    # top process left those running (and the port taken). The whole group is stopped on the way out.
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    url = f"http://{host}:{port}/"
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` or a service manager: stop the server too
    try:
        if not wait_until_up(url + "health", server, timeout_s=60):
            console.print(f"[red]the MLflow UI did not start:[/]\n{server.stderr.read() if server.stderr else ''}")
            return 1
        console.print(f"MLflow UI on {redact(uri)}: [bold]{url}{page}[/]  (Ctrl-C to stop)")
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_process_group(server)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_process_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM to the server's whole process group, SIGKILL to what is left after `timeout_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; its children may still be shutting down: give them the same time.
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False
