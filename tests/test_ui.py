"""`orch ui` serves the MLflow UI over the default store, on loopback only."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import psutil

from conftest import ORCH, wait_for_line


def test_ui_listens_on_loopback_and_serves_the_store(orch_env, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(orch_env["MLFLOW_TRACKING_URI"])
    run = client.create_run(client.create_experiment("ui-check"))
    process = subprocess.Popen([ORCH, "ui", "--run", run.info.run_id, "--port", "5123"], env=orch_env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = wait_for_line(process, "MLflow UI on", timeout=90)
        url = line.split("http://", 1)[1].split()[0]
        assert url.startswith("127.0.0.1:")
        assert f"/runs/{run.info.run_id}" in url
        base = "http://" + url.split("#")[0]
        with urllib.request.urlopen(base + "health", timeout=10) as response:
            assert response.status == 200
        listening = [c.laddr for p in [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
        server_tree = psutil.Process(process.pid).children(recursive=True)
        assert server_tree
        process.terminate()  # SIGTERM to `orch ui` alone: it must take the server and its workers with it
        assert process.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(server_tree, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.1)
