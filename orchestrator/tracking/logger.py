"""Lightning's side of rank 0's metrics: a Logger that writes into the driver's MLflow run through MetricSender.

Lightning's MLFlowLogger would open its own run and terminate it in `finalize`; the driver owns the
run's lifecycle here, and a slow or absent tracking server must never stall a training step.
Metrics pass through a MetricGate (gate.py) that holds each one back until a committed checkpoint
covers its step, so that steps re-run after a restart are never logged twice.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from orchestrator.tracking.gate import MetricGate
from orchestrator.tracking.sender import MetricSender, RunId, resolve_run_id


class MLflowRunLogger(Logger):
    """A Lightning logger that writes into an existing run and leaves its status to the driver."""

    def __init__(self, tracking_uri: str, run_id: RunId, resumed: bool = False, replay: list | None = None,
                 relay=None):
        super().__init__()
        self._relay = relay  # relay.RelaySink: the driver logs the batches
        self._tracking_uri = tracking_uri
        self._run_id = run_id
        self._resumed = resumed
        self._replay = replay or []
        self._sender: MetricSender | None = None
        self.gate: MetricGate | None = None

    @property
    def name(self) -> str:
        return "mlflow"

    @property
    def version(self) -> str:
        return resolve_run_id(self._run_id)

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricSender:
        if self._sender is None:
            self._sender = MetricSender(self._tracking_uri, self._run_id, resumed=self._resumed, relay=self._relay)
            self.gate = MetricGate(self._sender)
            self.gate.replay(self._replay)  # what the restored checkpoint carried that MLflow may lack
        return self._sender

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.experiment  # noqa: B018 - creates the sender and gate on first use
        self.gate.add(metrics, step or 0)

    @rank_zero_only
    def set_tags(self, tags: dict[str, str]) -> None:
        """Tags for the run, sent with the metrics (the throughput summary's)."""
        self.experiment.set_tags(tags)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The driver already logged the resolved spec, init_args included."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._sender is not None:
            ends_run = status == "success" or self.gate.final
            self.gate.finish(success=status == "success")
            # When the run ends here, wait for a tracking server that is down rather than lose metrics; when a
            # retry follows, the last checkpoint carries what is unsent and the next attempt sends it.
            self._sender.close(timeout_s=120 if ends_run else 5)
            self._sender = None
