"""Rank 0's metrics into the driver's MLflow run, sent in batches from a background thread (no Lightning here).

Apart from the Lightning logger (logger.py) because the driver uses the sender too (recovery.AttemptLog), and a
cold start's driver imports no Lightning at all: the model is planned in a worker process (worker_plan.py).

In a job's workers the batches go to the driver, which logs them (relay.py), and the worker never imports MLflow.
Without a relay MLflow is imported off the training thread (by the sender's thread, or a node sampler's), through
import_mlflow(): importing it and opening a store costs ~2 s of CPU (mlflow ~1.1 s, the SQL store's schema check
~0.9 s on a small machine), and on the training thread that stood between the end of set-up and the first step
while every other rank waited at the first collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from orchestrator.tracking.gate import PendingMetric

log = logging.getLogger(__name__)

_MLFLOW_IMPORT_LOCK = threading.Lock()


def import_mlflow():
    """MLflow, imported by one thread at a time; every worker-side import of it goes through here.

    The metric sender's thread, the system sampler's and, at the end, the training thread may each be the first to
    need it, and two threads importing MLflow for the first time at once break it: its circular imports meet
    CPython's per-module locks (a _DeadlockError, "partially initialized module", or a protobuf descriptor pool
    left broken for the rest of the process; 6 of 6 tries with 4 threads).
    """
    with _MLFLOW_IMPORT_LOCK:
        import mlflow
        import mlflow.entities  # noqa: F401 - with the package, before the lock is let go
    return mlflow


RunId = str | Callable[[], str]  # the id, or a call that waits for it (worker.py: the driver posts it once open)


def resolve_run_id(run_id: RunId) -> str:
    return run_id() if callable(run_id) else run_id


BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch
MAX_RETRY_INTERVAL_S = 10.0


class MetricSender:
    """A bounded buffer drained by one thread; on errors it keeps the metrics and retries later.

    Only the sender thread talks to MLflow: a second sender racing it could post the same batch twice.
    At most one value per (key, step) is ever sent: later ones at a step already sent are dropped. With
    `resumed`, the steps an earlier attempt already recorded are looked up (per key, lazily, from this
    thread, so an outage at restart only delays them) and count as sent.
    """

    def __init__(self, tracking_uri: str, run_id: RunId, interval_s: float = 1.0, max_buffered: int = 200_000,
                 resumed: bool = False, relay=None):
        self.tracking_uri = tracking_uri
        # A worker of a job with a driver hands its batches to the driver, which logs them (relay.py); this
        # process then never imports MLflow. Without a relay (the driver's own senders, tests) it logs itself.
        self._relay = relay
        self._client = None
        self._client_lock = threading.Lock()
        self._run_id = run_id
        self.interval_s = interval_s
        self.max_buffered = max_buffered
        self._buffer: deque = deque()
        self._tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drained = threading.Event()
        self._deadline = float("inf")
        self._dropped = 0
        self._failing_since: float | None = None
        self._last_step: dict[str, int] = {}  # per key, the highest step MLflow holds
        self._look_up_steps = resumed
        self._thread = threading.Thread(target=self._run, name="orch-metric-sender", daemon=True)
        self._thread.start()

    @property
    def client(self):
        """MLflow's client, made on first use: by this sender's thread or the system sampler's, never a step.

        Not before the run exists: making a client opens its store, and a new sqlite store's schema is created by
        whoever opens it first. The driver does, while the workers start; a worker that got there too (a busy
        machine starves the driver's low-priority thread) ran the same migrations on the same file at once, and
        one of the two failed ("Online migration expected to match one row"). Once the run is open, the schema is.
        """
        self.run_id  # noqa: B018 - waits until the driver has opened the run
        with self._client_lock:
            if self._client is None:
                self._client = import_mlflow().MlflowClient(self.tracking_uri)
            return self._client

    @property
    def run_id(self) -> str:
        """Asked for only where MLflow is called (this sender's thread, the sampler's): waiting there costs no step."""
        return resolve_run_id(self._run_id)

    def run_start_s(self) -> float:
        """When the run started, in seconds since the epoch (a node sampler's steps count from it)."""
        run_id = self.run_id  # first: the run is open (and the driver has posted its start with the id)
        if self._relay is not None:
            return self._relay.run_start_ms() / 1000
        return self.client.get_run(run_id).info.start_time / 1000

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = timestamp_ms or int(time.time() * 1000)
        self.extend([PendingMetric(key, float(value), now, step) for key, value in metrics.items()])

    def extend(self, metrics: Iterable) -> None:
        with self._lock:
            for metric in metrics:
                if len(self._buffer) >= self.max_buffered:
                    self._buffer.popleft()  # the oldest go first; the newest say where training is
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("metric buffer full (%d); dropping the oldest until MLflow answers",
                                    self.max_buffered)
                self._buffer.append(metric)
            full = len(self._buffer) >= BATCH_LIMIT
        if full:
            self._wake.set()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._tags.update(tags)
        self._wake.set()

    def unsent(self) -> list:
        """What MLflow does not hold yet (a checkpoint keeps these, so a crash mid-outage loses nothing)."""
        with self._lock:
            return list(self._buffer)

    def flush_soon(self) -> None:
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything buffered is sent (True) or the timeout passes (False); the thread sends."""
        deadline = time.time() + timeout_s
        woken = 0.0
        while self.unsent() or self._tags:
            if time.time() > deadline or self._drained.is_set():
                return False
            if time.time() - woken > 1.0:  # a retry a second while MLflow is down, not a storm
                self._wake.set()
                woken = time.time()
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        wait = self.interval_s
        while True:
            self._wake.wait(wait)
            self._wake.clear()
            sent = self._send_all()
            if self._stop.is_set() and (sent or time.time() > self._deadline):
                break
            # Back off while MLflow is down, but never so long that a short outage delays the end of a job.
            wait = self.interval_s if sent else min(wait * 2, MAX_RETRY_INTERVAL_S)
            if self._stop.is_set():
                wait = min(wait, 1.0)
        self._drained.set()

    def _send_all(self) -> bool:
        while True:
            with self._lock:
                batch = [self._buffer[i] for i in range(min(BATCH_LIMIT, len(self._buffer)))]
                tags = dict(self._tags)
            if not batch and not tags:
                return True
            try:
                last_step = self._known_steps(batch)
                fresh = []
                for metric in batch:
                    if metric.step > last_step.get(metric.key, -1):
                        fresh.append(metric)
                        last_step[metric.key] = metric.step
                if fresh or tags:
                    self._log_batch(fresh, tags)
            except Exception as exc:  # the server may come back; keep the metrics
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning("MLflow unreachable (%s); buffering metrics and retrying", type(exc).__name__)
                return False
            if self._failing_since is not None:
                log.warning("MLflow reachable again after %.0f s; sending buffered metrics",
                            time.time() - self._failing_since)
                self._failing_since = None
            self._last_step = last_step
            with self._lock:
                for _ in batch:
                    self._buffer.popleft()
                for key, value in tags.items():
                    if self._tags.get(key) == value:
                        del self._tags[key]

    def _log_batch(self, metrics: list, tags: dict[str, str]) -> None:
        if self._relay is not None:
            self._relay.log_batch(self.run_id, metrics, tags)
            return
        entities = import_mlflow().entities
        self.client.log_batch(self.run_id, metrics=[entities.Metric(*metric) for metric in metrics],
                              tags=[entities.RunTag(k, v) for k, v in tags.items()])

    def _known_steps(self, batch: list) -> dict[str, int]:
        """Per key, the last step MLflow holds; asked of MLflow once per key after a restart (through a relay, the
        driver drops what MLflow holds already)."""
        last_step = dict(self._last_step)
        if self._look_up_steps and self._relay is None:
            for key in {m.key for m in batch} - set(last_step):
                history = self.client.get_metric_history(self.run_id, key)
                last_step[key] = max((m.step for m in history), default=-1)
                self._last_step[key] = last_step[key]
        return last_step

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is left, retrying until the timeout; True when all was sent."""
        self._deadline = time.time() + timeout_s
        self._stop.set()
        self._wake.set()
        self._drained.wait(timeout_s + MAX_RETRY_INTERVAL_S)
        left = len(self.unsent())
        if left:
            log.warning("MLflow still unreachable; %d metric values were not sent", left)
        return left == 0
