"""The training function every Ray Train worker runs: build the job from its spec and fit it with Lightning."""

from __future__ import annotations

import logging
import socket
import warnings
from typing import Any


def train_loop(config: dict[str, Any]) -> None:
    """Entry point handed to TorchTrainer; `config` holds only plain data and an actor handle."""
    import lightning.pytorch as pl
    import ray.train

    from orchestrator.callbacks import ProgressReporter, RayCheckpointReporter, checkpoint_path
    from orchestrator.classpath import instantiate
    from orchestrator.spec import JobSpec
    from orchestrator.tracking.logger import MLflowRunLogger

    spec = JobSpec.model_validate(config["spec"])
    if not config.get("verbose"):
        _quiet()
    context = ray.train.get_context()
    if spec.trainer.seed is not None:
        pl.seed_everything(spec.trainer.seed, workers=True, verbose=False)

    model = instantiate(spec.model.model_dump())
    data = instantiate(spec.data.model_dump())
    logger = MLflowRunLogger(config["tracking_uri"], config["run_id"])
    callbacks: list[pl.Callback] = [
        RayCheckpointReporter(spec.checkpoint.every_n_epochs, spec.checkpoint.every_n_train_steps),
    ]
    if config.get("board") is not None:
        callbacks.append(ProgressReporter(config["board"], context.get_world_size()))
    from orchestrator.tracking.throughput import telemetry_callbacks

    callbacks += telemetry_callbacks(spec.tracking, config["tracking_uri"], config["run_id"])

    trainer = pl.Trainer(
        accelerator="gpu" if spec.scaling.use_gpu else "cpu",
        devices="auto",
        strategy=build_strategy(spec.scaling.strategy, spec.scaling.strategy_options),
        plugins=[_ray_environment()],
        precision=spec.trainer.precision,
        max_epochs=spec.trainer.max_epochs if spec.trainer.max_epochs is not None else -1,
        max_steps=spec.trainer.max_steps,
        accumulate_grad_batches=spec.trainer.accumulate_grad_batches,
        gradient_clip_val=spec.trainer.gradient_clip_val,
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
    _record_hosts(config, context)
    trainer.fit(model, datamodule=data, ckpt_path=checkpoint_path(ray.train.get_checkpoint()))


def build_strategy(name: str, options: dict[str, Any]):
    from ray.train import lightning as ray_lightning

    strategies = {
        "ddp": ray_lightning.RayDDPStrategy,
        "fsdp": ray_lightning.RayFSDPStrategy,
        "deepspeed": ray_lightning.RayDeepSpeedStrategy,
    }
    return strategies[name](**options)


def _ray_environment():
    from ray.train.lightning import RayLightningEnvironment

    return RayLightningEnvironment()


def _record_hosts(config: dict[str, Any], context) -> None:
    """Every rank's hostname, gathered once so rank 0 can tag the run with where it ran."""
    import torch.distributed as dist

    host = socket.gethostname()
    hosts = [host]
    if dist.is_available() and dist.is_initialized():
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, host)
    if context.get_world_rank() == 0:
        from mlflow import MlflowClient

        MlflowClient(config["tracking_uri"]).set_tag(config["run_id"], "orch.hostnames", ",".join(sorted(set(hosts))))


def _quiet() -> None:
    """Lightning's start-up banners and known deprecation chatter; `--verbose` keeps them."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
