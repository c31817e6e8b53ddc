"""Which rank samples which node: every rank says where it runs, and each node's lowest rank starts its sampler."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from orchestrator.tracking.system import SystemSampler, safe_label

if TYPE_CHECKING:
    from orchestrator.tracking.sender import RunId

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 5.0  # the sampler's sends are batched: one MLflow call per 5 s whatever the sampling interval


class NodeSampling:
    """Called on every rank at set-up: finds this node's training processes and GPUs; the node's lowest rank samples.

    Not a Lightning callback of its own: Lightning calls every hook of every callback on every step, so the
    throughput monitor (one callback) drives it; `SystemMetricsCallback` does when throughput is switched off.
    """

    def __init__(self, tracking_uri: str, run_id: RunId, interval_s: float, relay=None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.interval_s = interval_s
        self.relay = relay  # relay.RelaySink: the driver logs the samples
        self.sampler: SystemSampler | None = None

    def start(self, trainer: pl.Trainer) -> None:
        if self.sampler is not None:
            return
        everyone = all_gather(describe_rank(trainer), trainer)
        me = everyone[trainer.global_rank]
        mine = [peer for peer in everyone if peer["node_key"] == me["node_key"]]
        if min(peer["rank"] for peer in mine) != trainer.global_rank:
            return
        try:
            from orchestrator.tracking.sender import MetricSender

            sender = MetricSender(self.tracking_uri, self.run_id, interval_s=max(FLUSH_EVERY_S, self.interval_s),
                                  relay=self.relay)
            self.sampler = SystemSampler(sender, node_label(me, everyone), self.interval_s,
                                         pids=[peer["pid"] for peer in mine],
                                         gpus=[peer["gpu"] for peer in mine if peer["gpu"]])
            self.sampler.start()
        except Exception as exc:  # no hardware metrics is a loss, not a reason to stop training
            log.warning("system metrics sampler did not start: %s", exc)
            self.sampler = None

    def stop(self, timeout_s: float = 30.0) -> None:
        sampler, self.sampler = self.sampler, None
        if sampler is not None:
            sampler.stop(timeout_s)


class SystemMetricsCallback(pl.Callback):
    """Hardware sampling alone, for jobs with `tracking.throughput: false`."""

    def __init__(self, tracking_uri: str, run_id: RunId, interval_s: float, relay=None):
        self.sampling = NodeSampling(tracking_uri, run_id, interval_s, relay)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.sampling.start(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.sampling.stop(30.0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.sampling.stop(10.0)  # teardown hooks are not called after an exception


def describe_rank(trainer: pl.Trainer) -> dict[str, Any]:
    """What the node's sampler needs from every rank: which node it is on, its process and its GPU."""
    # Every rank must reach the gather that follows, so nothing here may raise: what fails is left out.
    host = socket.gethostname()
    node_key = host
    gpu = None
    try:
        if "ray" in sys.modules:  # a Ray worker: Ray's node id tells apart hosts that share a name
            import ray

            if ray.is_initialized():
                node_key = ray.get_runtime_context().get_node_id()
        device = trainer.strategy.root_device
        if device.type == "cuda":
            import torch

            uuid = str(torch.cuda.get_device_properties(device).uuid)
            gpu = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    except Exception as exc:
        log.warning("could not tell this rank's node or GPU for hardware sampling: %s", exc)
    return {"rank": trainer.global_rank, "host": host, "node_key": node_key, "pid": os.getpid(), "gpu": gpu}


def node_label(me: dict[str, Any], everyone: list[dict[str, Any]]) -> str:
    """The host name; with a piece of the node id where two nodes share a host name (default container names)."""
    keys_with_my_host = {peer["node_key"] for peer in everyone if peer["host"] == me["host"]}
    if len(keys_with_my_host) > 1:
        return safe_label(f"{me['host']}-{me['node_key'][:8]}")
    return safe_label(me["host"])


def all_gather(obj: Any, trainer: pl.Trainer) -> list[Any]:
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
