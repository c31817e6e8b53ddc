"""Throughput on every rank: step time, data-loader wait, samples/s, tokens/s, MFU, peak memory; a summary at the end.

Timing uses the host clock at Lightning's hooks and never synchronizes the accelerator (that would cost the
overlap it measures); over many steps the host cannot run ahead of the device by more than its queue, so medians
and means hold. Rank 0 logs live figures at the trainer's `log_every_n_steps`, over windows of at least a second;
at the end every rank's figures are gathered to rank 0, which logs the summary and names stragglers.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from array import array
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from orchestrator.callbacks import _batch_size
from orchestrator.tracking.mfu import StepFlopCounter, mfu, peak_flops, recipe_flops_per_sample

if TYPE_CHECKING:
    from orchestrator.tracking.sender import RunId

log = logging.getLogger(__name__)

MB = 1e6
STRAGGLER_RATIO = 1.2
# Live perf/ figures cover at least this long: over a few millisecond steps a rate is noise, and each value logged
# costs the tracking store a write.
MIN_WINDOW_S = 1.0


class ThroughputMonitor(pl.Callback):
    """Also starts and stops the node's hardware sampling, so that all tracking costs one callback per hook."""

    def __init__(self, tracking_uri: str | None = None, run_id: RunId | None = None, node_sampling=None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.node_sampling = node_sampling
        self._created = time.time()  # device time counts from the worker's start, not the first step
        self.step_times = array("d")
        self.work_times = array("d")  # step time outside backward, where data-parallel ranks wait for each other
        self.total_time = self.total_wait = 0.0
        self.total_samples = 0
        self._anchor: float | None = None  # end of the previous optimizer step
        self._last_end: float | None = None
        self._last_global_step = -1
        self._wait = self._backward = self._backward_start = 0.0
        self._samples = 0
        self._window = [0.0, 0.0, 0, 0]  # time, data wait, samples, steps since the last log
        self.flops_per_sample: float | None = None
        self.flops_source: str | None = None
        self.tokens_per_sample: int | None = None
        self.device: str | None = None
        self.peak: float | None = None
        self.summary: dict[str, float] = {}
        self._counter: StepFlopCounter | None = None
        self._counting: StepFlopCounter | None = None
        self._counting_samples = 0
        self._cuda = None

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.node_sampling is not None:
            self.node_sampling.start(trainer)
        import torch

        tokens = getattr(pl_module, "tokens_per_sample", None)
        self.tokens_per_sample = int(tokens) if isinstance(tokens, (int, float)) and tokens > 0 else None
        root = trainer.strategy.root_device
        self._cuda = root if root.type == "cuda" else None
        self.device = self.device_name(trainer)
        self.peak = peak_flops(self.device, str(trainer.precision), torch.get_float32_matmul_precision())
        if trainer.global_rank == 0:
            self.flops_per_sample = recipe_flops_per_sample(pl_module)
            if self.flops_per_sample is not None:
                self.flops_source = "recipe"
            else:
                self._counter = StepFlopCounter()

    def device_name(self, trainer: pl.Trainer) -> str | None:
        """The accelerator's name for the peak-FLOPs table; None on a CPU (no peak is known)."""
        if self._cuda is None:
            return None
        import torch

        return torch.cuda.get_device_name(self._cuda)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_global_step = trainer.global_step

    # Anything between two steps other than fetching data (an epoch's start, validation) is not a step's time.
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._anchor = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._anchor = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._anchor = None

    # -- per step (keep cheap: a few clock reads and additions) -------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._anchor is not None and self._last_end is not None:
            self._wait += now - self._last_end
        samples = _batch_size(batch)
        self._samples += samples
        if self._counter is not None:  # once, on rank 0's first step
            counter, self._counter = self._counter, None
            if counter.start():
                self._counting, self._counting_samples = counter, samples

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._backward_start = time.perf_counter()

    def on_after_backward(self, trainer, pl_module) -> None:
        self._backward += time.perf_counter() - self._backward_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        counted, self._counting = self._counting, None
        if counted is not None:
            self.flops_per_sample = counted.stop(self._counting_samples)
            self.flops_source = "flop_counter" if self.flops_per_sample else None
            self._anchor = None  # the counted step ran slower than the others
        self._last_end = now
        step = trainer.global_step
        if step == self._last_global_step:
            return  # accumulating gradients: the optimizer step is not done yet
        self._last_global_step = step
        if self._anchor is not None:
            duration = now - self._anchor
            self.step_times.append(duration)
            self.work_times.append(duration - self._backward)
            self.total_time += duration
            self.total_wait += self._wait
            self.total_samples += self._samples
            if trainer.global_rank == 0 and trainer.loggers:
                window = self._window
                window[0] += duration
                window[1] += self._wait
                window[2] += self._samples
                window[3] += 1
                if step % trainer.log_every_n_steps == 0 and window[0] >= MIN_WINDOW_S:
                    self._log_window(trainer, step)
        self._anchor = now
        self._wait = self._backward = 0.0
        self._samples = 0

    def on_exception(self, trainer, pl_module, exception) -> None:
        counted, self._counting = self._counting, None
        if counted is not None:
            counted.stop(1)  # leave no FLOP counter installed behind a failed step
        if self.node_sampling is not None:
            self.node_sampling.stop(10.0)  # teardown hooks are not called after an exception

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.node_sampling is not None:
            self.node_sampling.stop(30.0)

    def _log_window(self, trainer: pl.Trainer, step: int) -> None:
        elapsed, wait, samples, steps = self._window
        self._window = [0.0, 0.0, 0, 0]
        if elapsed <= 0:
            return
        # Every rank takes the same number of samples per step (DistributedSampler), so rank 0's rate scales.
        samples_per_s = samples / elapsed * trainer.world_size
        metrics = {"perf/step_time_s": elapsed / steps, "perf/data_wait_fraction": wait / elapsed,
                   "perf/samples_per_s": samples_per_s}
        if self.tokens_per_sample:
            metrics["perf/tokens_per_s"] = samples_per_s * self.tokens_per_sample
        utilization = mfu(self.flops_per_sample, samples_per_s, self.peak * trainer.world_size if self.peak else None)
        if utilization is not None:
            metrics["perf/mfu"] = utilization
        if self._cuda is not None:
            import torch

            metrics["perf/peak_accelerator_memory_megabytes"] = torch.cuda.max_memory_allocated(self._cuda) / MB
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # -- the end of training: every rank's figures to rank 0 -----------------------------------------------------
    def rank_figures(self, rank: int) -> dict[str, Any]:
        figures: dict[str, Any] = {"rank": rank, "steps": len(self.step_times), "device": self.device,
                                   "peak_flops": self.peak, "device_seconds": time.time() - self._created,
                                   "peak_rss_megabytes": _peak_rss_bytes() / MB}
        if self.step_times:
            figures.update(step_time_median_s=statistics.median(self.step_times),
                           step_time_p95_s=percentile(self.step_times, 95),
                           work_time_median_s=statistics.median(self.work_times),
                           data_wait_fraction=self.total_wait / self.total_time if self.total_time else 0.0,
                           samples_per_s=self.total_samples / self.total_time if self.total_time else 0.0)
        if self._cuda is not None:
            import torch

            figures["peak_accelerator_memory_megabytes"] = torch.cuda.max_memory_allocated(self._cuda) / MB
        return figures

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from orchestrator.tracking.nodes import all_gather

        everyone = all_gather(self.rank_figures(trainer.global_rank), trainer)
        if trainer.global_rank != 0:
            return
        self.summary, stragglers = summarize(everyone, self.flops_per_sample, self.tokens_per_sample)
        for logger in trainer.loggers:
            logger.log_metrics(self.summary, step=trainer.global_step)
        if self.tracking_uri and self.run_id and trainer.loggers:
            self._tag_run(everyone, stragglers, trainer.loggers)

    def _tag_run(self, everyone: list[dict[str, Any]], stragglers: dict[int, float], loggers) -> None:
        devices = sorted({f["device"] or "cpu" for f in everyone})
        tags = {"orch.stragglers": describe_stragglers(stragglers),
                "orch.devices": ", ".join(f"{sum((f['device'] or 'cpu') == d for f in everyone)} x {d}"
                                          for d in devices)}
        if self.flops_source:
            tags["orch.flops_per_sample_source"] = self.flops_source
        ours = [logger for logger in loggers if hasattr(logger, "set_tags")]  # tracking/logger.py
        if ours:  # with the metrics, by their route (through the driver in a job): no MLflow in this process
            ours[0].set_tags(tags)
            return
        try:
            from orchestrator.tracking.sender import import_mlflow, resolve_run_id

            mlflow = import_mlflow()  # the sender's and the sampler's threads may be importing it right now
            run_id = resolve_run_id(self.run_id)  # first: the run open, its store's schema exists (sender.py)
            mlflow.MlflowClient(self.tracking_uri).log_batch(
                run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
        except Exception as exc:  # the metrics still went through the logger
            log.warning("could not tag the run with its throughput summary: %s", exc)


def summarize(everyone: list[dict[str, Any]], flops_per_sample: float | None, tokens_per_sample: int | None,
              ) -> tuple[dict[str, float], dict[int, float]]:
    """Run-wide figures under summary/, per-rank ones under summary/rank_<r>/, and the stragglers found."""
    metrics: dict[str, float] = {"summary/device_hours": sum(f["device_seconds"] for f in everyone) / 3600}
    measured = [f for f in everyone if f.get("steps")]
    for f in everyone:
        for key in ("step_time_median_s", "step_time_p95_s", "work_time_median_s", "data_wait_fraction",
                    "samples_per_s", "peak_accelerator_memory_megabytes", "peak_rss_megabytes"):
            if f.get(key) is not None:
                metrics[f"summary/rank_{f['rank']}/{key}"] = f[key]
    stragglers: dict[int, float] = {}
    if measured:
        samples_per_s = sum(f["samples_per_s"] for f in measured)
        metrics["summary/samples_per_s"] = samples_per_s
        if tokens_per_sample:
            metrics["summary/tokens_per_s"] = samples_per_s * tokens_per_sample
        if flops_per_sample:
            metrics["summary/flops_per_sample"] = flops_per_sample
        peaks = [f["peak_flops"] for f in measured]
        utilization = mfu(flops_per_sample, samples_per_s, sum(peaks) if all(peaks) else None)
        if utilization is not None:
            metrics["summary/mfu"] = utilization
        metrics["summary/step_time_median_s"] = statistics.median(f["step_time_median_s"] for f in measured)
        metrics["summary/step_time_p95_s"] = max(f["step_time_p95_s"] for f in measured)
        metrics["summary/data_wait_fraction"] = statistics.mean(f["data_wait_fraction"] for f in measured)
        # Data-parallel ranks wait for the slowest inside backward, so their step times come out equal; the time
        # outside backward is where a slow rank (slow data, slow device) stands out. Whole steps are checked too.
        for key in ("work_time_median_s", "step_time_median_s"):
            for rank, ratio in find_stragglers({f["rank"]: f[key] for f in measured}).items():
                stragglers[rank] = max(ratio, stragglers.get(rank, 0.0))
        metrics["summary/stragglers"] = float(len(stragglers))
    return metrics, stragglers


def find_stragglers(medians: dict[int, float], ratio: float = STRAGGLER_RATIO) -> dict[int, float]:
    """Ranks whose median exceeds `ratio` x the median over all ranks -> their multiple of it."""
    if len(medians) < 2:
        return {}
    middle = statistics.median(medians.values())
    if middle <= 0:
        return {}
    return {rank: value / middle for rank, value in sorted(medians.items()) if value > ratio * middle}


def describe_stragglers(stragglers: dict[int, float]) -> str:
    if not stragglers:
        return "none"
    return ", ".join(f"rank {rank} ({ratio:.2f}x the median)" for rank, ratio in sorted(stragglers.items()))


def percentile(values, q: float) -> float:
    """Nearest-rank percentile; statistics.quantiles needs two points and interpolates past the data."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def telemetry_callbacks(tracking, tracking_uri: str, run_id: RunId, relay=None) -> list[pl.Callback]:
    """What the worker adds to the trainer for the spec's `tracking` section; `relay`: the driver logs (relay.py)."""
    from orchestrator.tracking.nodes import NodeSampling, SystemMetricsCallback

    if tracking.throughput:
        sampling = NodeSampling(tracking_uri, run_id, tracking.system_metrics_interval, relay) \
            if tracking.system_metrics else None
        return [ThroughputMonitor(tracking_uri, run_id, node_sampling=sampling)]
    if tracking.system_metrics:
        return [SystemMetricsCallback(tracking_uri, run_id, tracking.system_metrics_interval, relay)]
    return []
