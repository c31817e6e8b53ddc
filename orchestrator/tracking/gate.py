"""Rank 0's metrics wait here until a committed checkpoint covers their step: restarts never log a step twice.

MLflow has no API to delete or overwrite a metric value: a value logged for step 120 by an attempt that
dies at step 130 after checkpointing at step 100 would sit beside the value the next attempt logs for
step 120 after resuming from step 100. So nothing is sent before it is safe:

- A metric whose step is above the last *committed* checkpoint is held in memory. "Committed" means
  Ray Train's controller registered the checkpoint (and wrote its snapshot, which is what a restart or
  `orch resume` resumes from): `ray.train.get_all_reported_checkpoints(COMMITTED)` waits for exactly
  that, from a background thread so training never waits. Then the held metrics up to the checkpoint's
  step go to the MetricSender. If the attempt dies first, they die with it, and the re-run logs them.
- Metrics of steps a committed checkpoint already covers are sent at once.
- A checkpoint also carries, as a small JSON file beside Lightning's, every metric of a step it covers
  that MLflow may not hold yet (still held here, or buffered in the sender during a tracking outage).
  A restarted attempt replays them; the sender drops any (key, step) MLflow already has. So a worker
  killed between the checkpoint and the send, even during an outage, loses nothing.
- On the final attempt (no retry left) or a fatal error, the held metrics are sent anyway: nothing will
  re-run those steps, and the curve up to the failure is what one looks at to understand it.

Cost: the live MLflow view lags training by one checkpoint interval (the progress display does not).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

log = logging.getLogger(__name__)

SIDECAR_FILE = "orch_metrics.json"
EVERYTHING = math.inf  # the final checkpoint covers every step


class PendingMetric(NamedTuple):
    """A metric value on its way to MLflow: mlflow.entities.Metric's fields without importing MLflow, which is left
    to threads other than the training thread (sender.import_mlflow): there the import held up rank 0's first step."""

    key: str
    value: float
    timestamp: int  # ms since the epoch
    step: int


class MetricGate:
    def __init__(self, sender, max_held: int = 200_000):
        self.sender = sender
        self.max_held = max_held
        # This attempt ends the run (no retry left, a fatal error, or a stop): on failure the held metrics are
        # sent too, since nothing will re-run their steps, and the sender is given time to deliver everything.
        self.final = False
        self._held: list = []
        self._watermark: float = -1  # the highest step a committed checkpoint covers
        self._lock = threading.Lock()
        self._commits: queue.Queue = queue.Queue()
        self._committer: threading.Thread | None = None
        self._warned_full = False

    def add(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        now = timestamp_ms or int(time.time() * 1000)
        items = [PendingMetric(key, float(value), now, step) for key, value in metrics.items()]
        with self._lock:
            if step <= self._watermark:
                self.sender.extend(items)
                return
            self._held.extend(items)
            overflow = len(self._held) - self.max_held
            if overflow > 0:
                # No checkpoint for a very long time: memory wins; a restart may then repeat these steps.
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("%d metric values wait for a checkpoint; sending the oldest before one commits "
                                "(checkpoint more often to keep restarts free of repeated steps)", self.max_held)
                self.sender.extend(self._held[:overflow])
                del self._held[:overflow]

    def replay(self, metrics: Iterable) -> None:
        """Metrics a restored checkpoint carried: its steps are covered, so they go straight out."""
        items = list(metrics)
        if items:
            self.sender.extend(items)
            self.sender.flush_soon()

    def durable(self, covered_step: float) -> list:
        """What a checkpoint covering `covered_step` must carry: every such metric MLflow may not hold yet."""
        with self._lock:
            held = [m for m in self._held if m.step <= covered_step]
        return self.sender.unsent() + held

    def commit_when(self, covered_step: float, wait: Callable[[], object]) -> None:
        """Release up to `covered_step` once `wait()` returns (Ray committed the checkpoint)."""
        if self._committer is None:
            self._committer = threading.Thread(target=self._commit_loop, name="orch-metric-commit", daemon=True)
            self._committer.start()
        self._commits.put((covered_step, wait))

    def _commit_loop(self) -> None:
        while True:
            covered_step, wait = self._commits.get()
            try:
                wait()
            except Exception as exc:  # the controller is gone: this attempt is ending; keep the metrics held
                log.warning("could not confirm checkpoint commit (%s); holding metrics", exc)
            else:
                self.commit(covered_step)
            finally:
                self._commits.task_done()

    def commit(self, covered_step: float) -> None:
        with self._lock:
            self._watermark = max(self._watermark, covered_step)
            ready = [m for m in self._held if m.step <= self._watermark]
            self._held = [m for m in self._held if m.step > self._watermark]
        if ready:
            self.sender.extend(ready)
            self.sender.flush_soon()

    def flush(self, timeout_s: float) -> bool:
        """Before a final failure: send everything held now, and wait until MLflow has it (or the timeout)."""
        self.commit(EVERYTHING)
        return self.sender.flush(timeout_s)

    def finish(self, success: bool, timeout_s: float = 60.0) -> None:
        """At the end of fit: wait for the last commits; on a final failure send what is held too."""
        if self._committer is not None:
            done = threading.Thread(target=self._commits.join, daemon=True)
            done.start()
            done.join(timeout_s)
        if not success and self.final:
            self.commit(EVERYTHING)
        elif not success:
            with self._lock:
                dropped, self._held = len(self._held), []
            if dropped:
                log.info("%d metric values after the last checkpoint are left to the restarted attempt", dropped)


def write_sidecar(folder: Path, metrics: list) -> None:
    rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
    (folder / SIDECAR_FILE).write_text(json.dumps(rows))


def read_sidecar(folder: str | Path) -> list:
    path = Path(folder, SIDECAR_FILE)
    if not path.exists():
        return []
    return [PendingMetric(key, float(value), int(timestamp), int(step)) for key, value, timestamp, step in
            json.loads(path.read_text())]
