"""Lightning callbacks run on every Ray Train worker: live progress to the driver, checkpoints to Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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
        self.board.post(update)  # written by a thread of its own: a step never waits for the GCS

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

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.board.flush()  # the last epoch's validation is on the board before fit() returns


def _total_steps(trainer: pl.Trainer) -> int | None:
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:  # iterable datasets without a length cannot say
        return None


class RayCheckpointReporter(pl.Callback):
    """Save a Lightning checkpoint and report it, with the current metrics, to Ray Train.

    Ray keeps the best `num_to_keep` by the monitored metric, and always the latest; Ray Train V2 drops
    metrics reported without a checkpoint, so every report carries one. The file is written at the
    trigger, but reported at the next batch start (or train end): the metrics Lightning logs for the
    checkpointed step come after this hook, and the checkpoint carries them (tracking/gate.py).
    """

    def __init__(self, every_n_epochs: int | None, every_n_train_steps: int | None):
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.stopping = False  # a stop was requested: the checkpoint is written, the loop winds down
        self._last_saved_step = -1
        self._pending: tuple[Path, dict[str, Any], float] | None = None
        self.before_save: Callable[[pl.Trainer], None] | None = None  # FaultGuard: never save non-finite weights

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._send(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._save(trainer, covered_step=logged_step(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n = self.every_n_epochs
        # An epoch cut short by a stop request is no resumable epoch end: the stop checkpoint stands.
        if n and (trainer.current_epoch + 1) % n == 0 and not self.stopping:
            self._save(trainer, covered_step=logged_step(trainer) - 1)  # epoch metrics use the last batch's step

    def on_train_end(self, trainer, pl_module) -> None:
        from orchestrator.tracking.gate import EVERYTHING

        if not self.stopping:
            self._save(trainer, covered_step=EVERYTHING)  # the final weights are always kept
            if self._pending is not None:
                self._pending = (*self._pending[:2], EVERYTHING)  # nothing of this run follows it
        self._send(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._pending is not None:  # other ranks may be gone: no collective report now
            if trainer.local_rank == 0:
                _remove_node_folder(self._pending[0])
            self._pending = None

    def save_for_stop(self, trainer: pl.Trainer) -> None:
        """Ctrl-C / `orch stop` reached the workers: checkpoint this step; FaultGuard ends fit() after the report."""
        self._save(trainer, covered_step=logged_step(trainer))
        self.stopping = True

    def _save(self, trainer: pl.Trainer, covered_step: float) -> None:
        if trainer.global_step == self._last_saved_step:
            return
        self._send(trainer)  # (the earlier checkpoint first: it is sound whatever the check below finds)
        if self.before_save is not None:
            self.before_save(trainer)
        self._last_saved_step = trainer.global_step
        metrics = {**scalar_metrics(trainer), "epoch": trainer.current_epoch, "step": trainer.global_step}
        # One folder per node under a name all ranks share: Lightning's FSDP broadcasts rank 0's path and
        # every rank writes its shard there (DDP: rank 0 alone writes). Each node's local rank 0 reports
        # what its node wrote and Ray merges the uploads. The node sub-folder matters when two Ray nodes
        # share a /tmp (two nodes on one host): neither may upload, or delete, the other's files.
        name = tempfile.mkdtemp(prefix="orch-ckpt-") if trainer.global_rank == 0 else None
        folder = Path(trainer.strategy.broadcast(name)) / f"node-{trainer.node_rank}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            trainer.save_checkpoint(folder / CHECKPOINT_FILE)
        except BaseException:
            if trainer.local_rank == 0:
                _remove_node_folder(folder)
            raise
        self._pending = (folder, metrics, covered_step)

    def _send(self, trainer: pl.Trainer) -> None:
        import ray.train

        from orchestrator.tracking.gate import write_sidecar

        if self._pending is None:
            return
        folder, metrics, covered_step = self._pending
        self._pending = None
        gate = getattr(trainer.logger, "gate", None) if trainer.global_rank == 0 else None
        try:
            if gate is not None:
                write_sidecar(folder, gate.durable(covered_step))
            # Each node's local rank 0 reports what its node wrote (DDP: rank 0 alone; FSDP: every rank's shard);
            # report's own barrier across ranks runs before the upload, so every shard is on disk by then.
            wrote = trainer.local_rank == 0 and any(folder.iterdir())
            checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if wrote else None
            ray.train.report(metrics, checkpoint=checkpoint)
            if gate is not None and checkpoint is not None:
                gate.commit_when(covered_step, _wait_until_committed)
        finally:
            if trainer.local_rank == 0:
                _remove_node_folder(folder)


def _remove_node_folder(folder: Path) -> None:
    """Remove this node's checkpoint folder, and the shared parent once no other node's folder is left in it."""
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # fails while another node on this host is still uploading its folder
    except OSError:
        pass


def logged_step(trainer: pl.Trainer) -> int:
    """The step Lightning hands the loggers for the current batch (global_step - 1 with one optimizer)."""
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step - 1))


def _wait_until_committed() -> None:
    """Ray's controller has registered every checkpoint this worker reported (and saved its snapshot)."""
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


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
