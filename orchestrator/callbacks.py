"""Lightning callbacks run on every Ray Train worker: live progress to the driver, checkpoints to Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

CHECKPOINT_FILE = "checkpoint.ckpt"


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 0


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = value.item()
        elif isinstance(value, (int, float)):
            metrics[key] = float(value)
    return metrics


class ProgressReporter(pl.Callback):
    """Rank 0 tells the driver's progress board where training is, at most every `interval_s`."""

    def __init__(self, board, world_size: int, interval_s: float = 0.5):
        self.board = board
        self.world_size = world_size
        self.interval_s = interval_s
        self._last_sent = 0.0
        self._window_start = 0.0
        self._window_samples = 0
        self._sent_first_step = False

    def _send(self, **update: Any) -> None:
        self.board.update.remote(update)  # fire and forget: never wait on the driver

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self._window_start = time.perf_counter()
            self._send(phase="training", max_epochs=trainer.max_epochs, total_steps=_total_steps(trainer),
                       step=trainer.global_step, epoch=trainer.current_epoch, started_at=time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank != 0:
            return
        self._window_samples += _batch_size(batch) * self.world_size
        if not self._sent_first_step:
            self._sent_first_step = True
            self._send(first_step_at=time.time())
        now = time.perf_counter()
        if now - self._last_sent < self.interval_s:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        elapsed = now - self._window_start
        self._send(epoch=trainer.current_epoch, step=trainer.global_step,
                   loss=float(loss.detach()) if isinstance(loss, torch.Tensor) else None,
                   samples_per_s=self._window_samples / elapsed if elapsed > 0 else None)
        self._last_sent, self._window_start, self._window_samples = now, now, 0

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            self._send(validation={"epoch": trainer.current_epoch, "step": trainer.global_step,
                                   "metrics": scalar_metrics(trainer)})


def _total_steps(trainer: pl.Trainer) -> int | None:
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:  # iterable datasets without a length cannot say
        return None


class RayCheckpointReporter(pl.Callback):
    """Save a Lightning checkpoint and report it, with the current metrics, to Ray Train.

    Ray keeps the best `num_to_keep` by the monitored metric; Ray Train V2 drops metrics reported
    without a checkpoint, so every report carries one.
    """

    def __init__(self, every_n_epochs: int | None, every_n_train_steps: int | None):
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self._last_reported_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._report(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self._report(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer)  # the final weights are always kept

    def _report(self, trainer: pl.Trainer) -> None:
        import ray.train

        if trainer.global_step == self._last_reported_step:
            return
        self._last_reported_step = trainer.global_step
        metrics = {**scalar_metrics(trainer), "epoch": trainer.current_epoch, "step": trainer.global_step}
        # One folder name for all ranks: FSDP broadcasts rank 0's path and every rank writes its shard there
        # (DDP: rank 0 alone writes). Each node's local rank 0 reports what its node wrote; Ray merges them.
        name = tempfile.mkdtemp(prefix="orch-ckpt-") if trainer.global_rank == 0 else None
        folder = Path(trainer.strategy.broadcast(name))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            trainer.save_checkpoint(folder / CHECKPOINT_FILE)
            wrote = trainer.local_rank == 0 and any(folder.iterdir())
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if wrote else None
            ray.train.report(metrics, checkpoint=checkpoint)
        finally:
            if trainer.local_rank == 0:
                shutil.rmtree(folder, ignore_errors=True)


def checkpoint_path(checkpoint) -> str | None:
    """The Lightning file inside a Ray checkpoint restored on this worker, if any."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            return None
        # as_directory may hand out a temporary copy; keep our own for Lightning to read after the block
        keep = tempfile.mkdtemp(prefix="orch-restore-")
        target = os.path.join(keep, CHECKPOINT_FILE)
        if os.path.isdir(path):
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
        return target
