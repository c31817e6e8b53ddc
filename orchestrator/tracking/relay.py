"""Workers' metrics into MLflow through the driver: batches handed over in Ray's key-value store, logged by the driver.

Why not MLflow in the workers: a worker that talks to MLflow imports it and opens its store, ~2 s of CPU on a small
machine (the package ~1.1 s, a sqlite store's schema check ~0.9 s), twice on rank 0 (the logger's sender and its
node's hardware sampler). On a 2-core machine that CPU came out of rank 0's first seconds of training, while the
other ranks waited for it at every collective: the digits job's training phase took 6.6-8.2 s with it and
5.4-6.4 s without (3 interleaved pairs). The driver has MLflow imported and the store open already: it opened the
run. And a worker on another node reaches the driver's store through it (a sqlite file on the driver's machine).

How: a worker's MetricSender hands each batch to RelaySink, which puts it under one key of its own, next to the
job's progress board (progress.py), and waits until the key is gone. The driver's MetricRelay lists those keys,
logs each batch and only then deletes its key: the deletion is the acknowledgement, so a sender's "sent" still
means "MLflow holds it", which the checkpoint gate relies on (gate.py). While MLflow is down the driver keeps the
batches and retries; a worker's wait runs out meanwhile and its sender, which kept the metrics, sends them again
under a new key. The driver logs at most one value per (metric, step), the rule MetricSender keeps per process,
here across the batches sent twice and across attempts (and, for a resumed run, what MLflow held before).
Ray's key-value API is internal (ray.experimental.internal_kv), as the progress board's is.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import threading
import time

from orchestrator import gcs_kv
from orchestrator.gcs_kv import NAMESPACE

log = logging.getLogger(__name__)

_batch_numbers = itertools.count()  # with the time and pid, part of each batch's key (next() is atomic in CPython)


def relay_prefix(board) -> str:
    """Beside the board's own keys, not under them: the driver's frequent board reads never carry metric batches.
    Under the same job's root, so a sweep of a dead driver's boards (progress.py) takes them too."""
    return board.prefix.rstrip("/") + ".metrics/"


def _kv():
    return gcs_kv.client("the metric relay")


class RelaySink:
    """A worker's end: log_batch returns once the driver has logged the batch, and raises if it has not in time."""

    def __init__(self, board, ack_timeout_s: float = 30.0, rpc_timeout_s: float = 10.0):
        self.board = board
        self.prefix = relay_prefix(board)
        self.ack_timeout_s = ack_timeout_s
        self.rpc_timeout_s = rpc_timeout_s

    def run_start_ms(self) -> int:
        """The run's start time, which the driver posts with the run's id (asked for once the id is known)."""
        start = self.board.get("run_start_ms")
        if start is None:
            raise LookupError("the driver posted no run start time")
        return start

    def log_batch(self, run_id: str, metrics: list, tags: dict[str, str]) -> None:
        client = _kv()
        key = f"{self.prefix}{time.time_ns():020d}-{os.getpid()}-{next(_batch_numbers)}".encode()
        value = pickle.dumps((run_id, [tuple(metric) for metric in metrics], dict(tags)))
        client.internal_kv_put(key, value, True, NAMESPACE, timeout=self.rpc_timeout_s)
        deadline = time.monotonic() + self.ack_timeout_s
        pause = 0.01
        while client.internal_kv_exists(key, NAMESPACE, timeout=self.rpc_timeout_s):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the driver did not log a metric batch within {self.ack_timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.1)


class MetricRelay:
    """The driver's end: a thread that logs the workers' batches into MLflow, oldest first, and deletes each once
    logged. `resumed`: the run has metrics from before this driver, looked up once per metric to drop repeats."""

    MAX_RETRY_INTERVAL_S = 10.0

    def __init__(self, prefix: str, tracking_uri: str, resumed: bool = False, interval_s: float = 0.2,
                 rpc_timeout_s: float = 10.0):
        self.prefix = prefix
        self.tracking_uri = tracking_uri
        self.resumed = resumed
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self.logged_batches = 0
        self._client = None
        self._last_step: dict[tuple[str, str], int] = {}  # (run, metric) -> the highest step logged
        self._stop = threading.Event()
        self._draining = threading.Lock()  # stop()'s last pass and a thread that outlived its join never race
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="orch-metric-relay", daemon=True)

    def start(self) -> MetricRelay:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread, then log what is left, retrying until `timeout_s`; True when nothing is left."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.drain_once():
                    return True
            except Exception as exc:  # the cluster went first: nothing more can be read from it
                log.warning("could not read the workers' last metric batches: %s", exc)
                return False
            if time.monotonic() > deadline:
                log.warning("MLflow still unreachable; the workers' last metric batches were not logged")
                return False
            time.sleep(1.0)

    def close(self) -> None:
        """Delete what no one will log any more (after stop())."""
        _kv().internal_kv_del(self.prefix.encode(), True, NAMESPACE, timeout=self.rpc_timeout_s)

    def _run(self) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            try:
                logged = self.drain_once()
            except Exception as exc:  # a slow GCS: the next round catches up
                log.debug("metric relay: %s", exc)
                logged = False
            # Back off while MLflow is down; the batches wait in the store meanwhile.
            wait = self.interval_s if logged else min(max(wait * 2, 0.5), self.MAX_RETRY_INTERVAL_S)

    def drain_once(self) -> bool:
        """Log every batch waiting now; False when MLflow refused one (it and the later ones stay for next time)."""
        with self._draining:
            return self._drain()

    def _drain(self) -> bool:
        kv = _kv()
        keys = kv.internal_kv_keys(self.prefix.encode(), NAMESPACE, timeout=self.rpc_timeout_s)
        if not keys:
            return True
        values = kv.internal_kv_multi_get(keys, NAMESPACE, timeout=self.rpc_timeout_s)
        for key in sorted(values):  # time first in the key: oldest first
            run_id, metrics, tags = pickle.loads(values[key])
            try:
                self._log(run_id, metrics, tags)
            except Exception as exc:
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning("MLflow unreachable (%s); the workers' metrics wait and are retried",
                                type(exc).__name__)
                return False
            if self._failing_since is not None:
                log.warning("MLflow reachable again after %.0f s; logging the workers' waiting metrics",
                            time.time() - self._failing_since)
                self._failing_since = None
            kv.internal_kv_del(key, False, NAMESPACE, timeout=self.rpc_timeout_s)
            self.logged_batches += 1
        return True

    def _log(self, run_id: str, metrics: list[tuple], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        client = self._mlflow()
        fresh, seen = [], {}
        for key, value, timestamp, step in metrics:
            last = seen.get(key)
            if last is None:
                last = self._known_step(client, run_id, key)
            if step > last:
                fresh.append(Metric(key, value, timestamp, step))
                last = step
            seen[key] = last
        if fresh or tags:
            client.log_batch(run_id, metrics=fresh, tags=[RunTag(k, v) for k, v in tags.items()])
        for key, step in seen.items():  # only once MLflow holds them
            self._last_step[(run_id, key)] = step

    def _known_step(self, client, run_id: str, key: str) -> int:
        if (run_id, key) not in self._last_step:
            history = client.get_metric_history(run_id, key) if self.resumed else []
            self._last_step[(run_id, key)] = max((m.step for m in history), default=-1)
        return self._last_step[(run_id, key)]

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)  # the driver opened this store already: no schema work
        return self._client
