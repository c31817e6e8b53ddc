"""The training function every Ray Train worker runs: build the job from its spec and fit it with Lightning."""

from __future__ import annotations

import logging
import socket
import warnings
from typing import Any


def train_loop(config: dict[str, Any]) -> None:
    """Entry point handed to TorchTrainer; `config` holds only plain data and an actor handle."""
    import sys
    import time

    # Set by Ray's preload hook in a process prestarted for the next job (preload.py, warm_pool.py).
    warm = getattr(sys.modules.get("orchestrator.preload"), "warmed", False)
    import ray.train

    if config.get("board") is not None:
        rank = ray.train.get_context().get_world_rank()
        if rank == 0:
            config["board"].update({"worker_entered_at": time.time()})  # start-up phases (launch.py)
        if warm:
            config["board"].append("warm_ranks", rank)
    if warm:
        _match_cold_threads()
    import lightning.pytorch as pl

    from orchestrator.callbacks import ProgressReporter, RayCheckpointReporter, checkpoint_path
    from orchestrator.classpath import instantiate
    from orchestrator.distributed import build_strategy, prepare_model, scale_callbacks, trainer_gradient_clip
    from orchestrator.determinism import ExactResume
    from orchestrator.faults import FaultGuard, StopRequested, restored_metrics
    from orchestrator.spec import JobSpec
    from orchestrator.tracking.logger import MLflowRunLogger
    from orchestrator.tracking.relay import RelaySink

    spec = JobSpec.model_validate(config["spec"])
    if not config.get("verbose"):
        _quiet()
    context = ray.train.get_context()
    from orchestrator.output_labels import label_worker_output, node_name

    label_worker_output(context.get_world_rank(), node_name())  # `orch logs` tells ranks and nodes apart
    if spec.trainer.seed is not None:
        pl.seed_everything(spec.trainer.seed, workers=True, verbose=False)

    model = instantiate(spec.model.model_dump())
    data = instantiate(spec.data.model_dump())
    strategy = build_strategy(spec, model)
    prepare_model(spec, model)  # activation checkpointing and torch.compile, per the spec
    restored = ray.train.get_checkpoint()  # a restarted attempt, or `orch resume`
    run_id = config.get("run_id") or RunIdFromBoard(config["board"])  # the driver opens the run meanwhile
    relay = RelaySink(config["board"]) if config.get("board") is not None else None  # the driver logs (relay.py)
    logger = MLflowRunLogger(config["tracking_uri"], run_id, resumed=restored is not None,
                             replay=restored_metrics(restored) if context.get_world_rank() == 0 else None,
                             relay=relay)
    reporter = RayCheckpointReporter(spec.checkpoint.every_n_epochs, spec.checkpoint.every_n_train_steps)
    callbacks: list[pl.Callback] = [
        reporter,
        FaultGuard(config.get("board"), spec.failure.nonfinite_loss, spec.failure.max_consecutive_skips, reporter,
                   spec.failure.max_failures),
    ]
    if spec.trainer.seed is not None:
        callbacks.append(ExactResume(spec.trainer.seed))
    if config.get("board") is not None:
        callbacks.append(ProgressReporter(config["board"], context.get_world_size()))
    callbacks += scale_callbacks(spec)
    from orchestrator.tracking.throughput import telemetry_callbacks

    callbacks += telemetry_callbacks(spec.tracking, config["tracking_uri"], run_id, relay)

    trainer = pl.Trainer(
        accelerator="gpu" if spec.scaling.use_gpu else "cpu",
        devices="auto",
        strategy=strategy,
        plugins=[_ray_environment()],
        precision=spec.trainer.precision,
        max_epochs=spec.trainer.max_epochs if spec.trainer.max_epochs is not None else -1,
        max_steps=spec.trainer.max_steps,
        accumulate_grad_batches=spec.trainer.accumulate_grad_batches,
        gradient_clip_val=trainer_gradient_clip(spec),
        val_check_interval=spec.trainer.val_check_interval,
        check_val_every_n_epoch=spec.trainer.check_val_every_n_epoch,
        log_every_n_steps=spec.trainer.log_every_n_steps,
        limit_train_batches=spec.trainer.limit_train_batches,
        limit_val_batches=spec.trainer.limit_val_batches,
        deterministic=spec.trainer.deterministic,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,  # the driver draws one display for the whole job
        enable_checkpointing=False,  # Ray Train keeps checkpoints (RayCheckpointReporter)
        enable_model_summary=False,  # the driver logs the summary from the meta-device model
        default_root_dir=None,
    )
    from ray.train.lightning import prepare_trainer

    trainer = prepare_trainer(trainer)
    _record_hosts(logger, context)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=checkpoint_path(restored))
    except StopRequested:  # Ctrl-C / `orch stop`: the checkpoint is reported; a clean end for Ray Train
        return


class RunIdFromBoard:
    """The MLflow run's id, which the driver posts on the progress board once the run is open (launch.py).

    The driver opens the run while the workers start, so nothing waits for it at start-up; the metric sender's
    and the sampler's threads ask for it when they first talk to MLflow, by when it is almost always there.
    If the driver cannot open the run it ends the job, and this wait ends with it.
    """

    def __init__(self, board, timeout_s: float = 600.0):
        self.board = board
        self.timeout_s = timeout_s
        self._run_id: str | None = None  # once posted: the logger, the sampler and the throughput monitor share it

    def __call__(self) -> str:
        if self._run_id is None:
            self._run_id = self._wait_for_run_id()
        return self._run_id

    def _wait_for_run_id(self) -> str:
        import time

        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            run_id = self.board.get("run_id")
            if run_id:
                return run_id
            time.sleep(0.1)
        raise TimeoutError(f"the driver did not open the MLflow run within {self.timeout_s:.0f} s")


def _match_cold_threads() -> None:
    """A warm process imported PyTorch before Ray set OMP_NUM_THREADS to this worker's CPUs, so torch sized its
    thread pool for the whole machine: workers sharing a node would oversubscribe its cores (measured: training
    2-3x slower with 2 workers on 2 cores). Give torch the count a fresh process would have read."""
    import os

    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def _ray_environment():
    from ray.train.lightning import RayLightningEnvironment

    return RayLightningEnvironment()


def _record_hosts(logger, context) -> None:
    """Every rank's hostname and PyTorch thread count, gathered once so rank 0 can tag the run with where it ran
    (orch.hostnames) and how many threads each rank computed with (orch.torch_threads, in rank order)."""
    import torch
    import torch.distributed as dist

    mine = (socket.gethostname(), torch.get_num_threads())
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if context.get_world_rank() == 0:  # sent by the metric sender's thread: a tracking outage stops nothing
        logger.experiment.set_tags({"orch.hostnames": ",".join(sorted({host for host, _ in ranks})),
                                    "orch.torch_threads": ",".join(str(threads) for _, threads in ranks)})


def _quiet() -> None:
    """Lightning's start-up banners and known deprecation chatter; `--verbose` keeps them."""
    from ray.train.v2._internal.execution import context as train_context

    # Ray Train logs every report at INFO, a line per rank per checkpoint, on a logger named by its file path.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", train_context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
