"""Rank 0's metrics into the driver's MLflow run, sent in batches from a background thread.

Lightning's MLFlowLogger would open its own run and terminate it in `finalize`; the driver owns the
run's lifecycle here, and a slow or absent tracking server must never stall a training step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)

BATCH_LIMIT = 1000  # MLflow accepts at most 1000 metrics per log_batch


class MetricSender:
    """A bounded buffer drained by one thread; on errors it keeps the metrics and retries later."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float = 1.0, max_buffered: int = 200_000):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.interval_s = interval_s
        self.max_buffered = max_buffered
        self._buffer: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dropped = 0
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="orch-metric-sender", daemon=True)
        self._thread.start()

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                if len(self._buffer) >= self.max_buffered:
                    self._buffer.popleft()  # the oldest go first; the newest say where training is
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("metric buffer full (%d); dropping the oldest until MLflow answers",
                                    self.max_buffered)
                self._buffer.append(Metric(key, float(value), now, step))
        if len(self._buffer) >= BATCH_LIMIT:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            self._send_all()

    def _send_all(self) -> bool:
        while True:
            with self._lock:
                batch = [self._buffer[i] for i in range(min(BATCH_LIMIT, len(self._buffer)))]
            if not batch:
                return True
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:  # the server may come back; keep the metrics
                if self._failing_since is None:
                    self._failing_since = time.time()
                    log.warning("MLflow unreachable (%s); buffering metrics and retrying", type(exc).__name__)
                return False
            if self._failing_since is not None:
                log.warning("MLflow reachable again after %.0f s; sending buffered metrics",
                            time.time() - self._failing_since)
                self._failing_since = None
            with self._lock:
                for _ in batch:
                    self._buffer.popleft()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Stop the thread and send what is left, retrying until the timeout; True when all was sent."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        deadline = time.time() + timeout_s
        while not self._send_all():
            if time.time() > deadline:
                log.warning("MLflow still unreachable; %d metric values were not sent", len(self._buffer))
                return False
            time.sleep(1.0)
        return True


class MLflowRunLogger(Logger):
    """A Lightning logger that writes into an existing run and leaves its status to the driver."""

    def __init__(self, tracking_uri: str, run_id: str):
        super().__init__()
        self._tracking_uri = tracking_uri
        self._run_id = run_id
        self._sender: MetricSender | None = None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return self._run_id

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricSender:
        if self._sender is None:
            self._sender = MetricSender(self._tracking_uri, self._run_id)
        return self._sender

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment.add(metrics, step or 0)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The driver already logged the resolved spec, init_args included."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
