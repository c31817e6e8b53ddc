"""relay: a worker's metric batches logged by the driver, through the suite's real Ray cluster and a real sqlite store.
The whole path (rank 0's logger and its node's sampler, the driver's relay) runs in every `orch submit` of the suite;
here its promises one at a time: acknowledged only once logged, nothing logged twice, and no MLflow in the worker."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import REPO
from orchestrator.progress import ProgressBoard
from orchestrator.tracking.relay import MetricRelay, RelaySink, relay_prefix
from orchestrator.tracking.sender import MetricSender


@pytest.fixture
def run(tracking_uri):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment("relay"))
    return client, run.info.run_id


@pytest.fixture
def board(ray_address):
    board = ProgressBoard(sweep=False)
    yield board
    board.close()
    MetricRelay(relay_prefix(board), "unused").close()


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_batches_are_logged_by_the_driver_and_acknowledged_once_logged(tracking_uri, run, board):
    client, run_id = run
    relay = MetricRelay(relay_prefix(board), tracking_uri).start()
    sender = MetricSender(tracking_uri, run_id, interval_s=0.05, relay=RelaySink(board))
    for step in range(5):
        sender.add({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    sender.set_tags({"orch.hostnames": "a,b"})
    assert sender.flush(30), "the relay did not acknowledge"
    assert not sender.unsent()  # acknowledged means logged: MLflow holds every value now
    assert _history(client, run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert client.get_run(run_id).data.tags["orch.hostnames"] == "a,b"
    assert sender.close(10) and relay.stop(10)
    assert relay.logged_batches >= 1


def test_a_batch_the_driver_has_not_taken_yet_is_sent_again_and_logged_once(tracking_uri, run, board):
    """The driver is slow (or MLflow is down): the worker's wait runs out and its sender, which kept the metrics,
    sends them again under a new key. The driver later finds both batches and logs each (metric, step) once."""
    client, run_id = run
    sink = RelaySink(board, ack_timeout_s=0.3)
    sender = MetricSender(tracking_uri, run_id, interval_s=0.1, relay=sink)
    sender.add({"loss": 0.5}, step=1)
    sender.add({"loss": 0.25}, step=2)
    assert not sender.flush(1.5)  # no driver yet: not acknowledged, still buffered
    assert len(sender.unsent()) == 2
    relay = MetricRelay(relay_prefix(board), tracking_uri).start()
    assert sender.flush(30)
    assert sender.close(10) and relay.stop(10)
    assert relay.logged_batches >= 2  # the first try's batch and at least one resend
    assert _history(client, run_id, "loss") == [(1, 0.5), (2, 0.25)]


def test_a_resumed_run_drops_the_steps_mlflow_already_holds(tracking_uri, run, board):
    """`orch resume`: a new driver, a run with history; the restored checkpoint replays steps 3-4 again."""
    from mlflow.entities import Metric

    client, run_id = run
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("loss", 1.0, now, step) for step in range(5)])
    relay = MetricRelay(relay_prefix(board), tracking_uri, resumed=True).start()
    sender = MetricSender(tracking_uri, run_id, interval_s=0.05, resumed=True, relay=RelaySink(board))
    for step in range(3, 8):
        sender.add({"loss": 2.0}, step=step)
    assert sender.close(30) and relay.stop(10)
    assert _history(client, run_id, "loss") == [(s, 1.0) for s in range(5)] + [(s, 2.0) for s in range(5, 8)]


def test_what_is_left_when_the_job_ends_is_logged_by_the_drivers_last_pass(tracking_uri, run, board):
    client, run_id = run
    relay = MetricRelay(relay_prefix(board), tracking_uri)  # never started: stop() alone must drain
    sink = RelaySink(board, ack_timeout_s=0.2)
    with pytest.raises(TimeoutError, match="did not log a metric batch"):
        sink.log_batch(run_id, [("acc", 0.9, int(time.time() * 1000), 3)], {"orch.devices": "2 x cpu"})
    assert relay.stop(10)
    assert _history(client, run_id, "acc") == [(3, 0.9)]
    assert client.get_run(run_id).data.tags["orch.devices"] == "2 x cpu"


def test_a_worker_process_sends_through_the_relay_without_importing_mlflow(tracking_uri, run, board, ray_address):
    """The reason for the relay: rank 0 and its node's sampler never import MLflow (~2 s of CPU in a worker).
    A fresh interpreter joins the suite's cluster, as a worker is, and sends metrics, tags, and asks the run's start."""
    client, run_id = run
    board.update({"run_start_ms": 1_700_000_000_000, "run_id": run_id})
    relay = MetricRelay(relay_prefix(board), tracking_uri).start()
    script = f"""
import sys
from orchestrator.cluster import connect
connect({ray_address!r}, verbose=False)  # as the CLI joins a cluster
from orchestrator.progress import ProgressBoard
from orchestrator.tracking.relay import RelaySink
from orchestrator.tracking.sender import MetricSender
board = ProgressBoard.__new__(ProgressBoard)
board.prefix, board.timeout_s = {board.prefix!r}, 10.0
sender = MetricSender("sqlite:///nowhere/mlflow.db", lambda: board.get("run_id"), interval_s=0.05,
                      relay=RelaySink(board))
sender.add({{"perf/samples_per_s": 100.0}}, step=7)
sender.set_tags({{"orch.stragglers": "none"}})
assert sender.run_start_s() == 1_700_000_000.0
assert sender.close(30), "not acknowledged"
assert "mlflow" not in sys.modules, sorted(m for m in sys.modules if m.startswith("mlflow"))[:5]
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert relay.stop(10)
    assert _history(client, run_id, "perf/samples_per_s") == [(7, 100.0)]
    assert client.get_run(run_id).data.tags["orch.stragglers"] == "none"
