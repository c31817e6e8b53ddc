"""Worker side of fault handling: NaN/inf losses, graceful stop requests, and each attempt's bookkeeping."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import lightning.pytorch as pl
import torch

from orchestrator.attempts import NonFiniteLossError

log = logging.getLogger(__name__)

STOP_POLL_INTERVAL_S = 0.5
NONFINITE_HINT = "set failure.nonfinite_loss=skip to skip such batches instead"


class StopRequested(Exception):
    """Ends fit() right after the stop checkpoint is reported; train_loop returns normally on it.

    Not `trainer.should_stop`: Lightning would first validate and close the cut-short epoch (a slow stop,
    and epoch metrics of half an epoch). Not a KeyboardInterrupt: Lightning answers that with sys.exit.
    """


class FaultGuard(pl.Callback):
    """One small all-reduce per optimizer step makes every rank agree on two things at the same step:
    whether any rank saw a non-finite loss or gradient, and whether the driver asked to stop (rank 0
    polls the progress board for that, without waiting). Agreeing matters: a rank that skips a step or
    stops alone leaves the others waiting in a collective, or silently out of sync.

    Under plain DDP the all-reduce starts, without waiting, as soon as the loss is known and runs beside the
    backward pass: DDP averages the gradients themselves, so every rank already holds the same ones and can
    judge them alone. Waiting for a collective after the backward pass cost a 2-worker CPU step ~5 % (a
    round trip of both ranks, which Lightning's `strategy.reduce` makes two by putting a barrier before it).
    Sharded strategies (FSDP, DeepSpeed), DDP with a communication hook (which may leave gradients unequal),
    gradient accumulation and manual optimization keep the reduction after the backward pass, gradients'
    verdicts included.

    Where every rank holds the same weights (one rank, or plain DDP) and a non-finite step stops the job
    (`stop`, the default), the gradients are not read at every step: a pass over all of them cost ~1 ms of a
    27 ms CPU step (3.5 %, the benchmark's MLP). A non-finite gradient makes the weights non-finite at the
    optimizer step, and the next step's loss with them, which stops the job one step later, naming the weights
    as the cause; the weights are checked before every checkpoint, so none is saved with them. `skip` must judge
    a step before it is taken, and sharded weights are not the same on every rank: both keep the check.
    """

    def __init__(self, board, nonfinite_loss: str, max_consecutive_skips: int, reporter, max_failures: int):
        self.board = board
        self.mode = nonfinite_loss
        self.max_consecutive_skips = max_consecutive_skips
        self.reporter = reporter
        self.max_failures = max_failures
        self.attempt = 1
        self._loss_bad: torch.Tensor | None = None
        self._early: tuple[torch.Tensor, object] | None = None  # the flags and their all-reduce in flight
        self._last_loss: float | None = None
        self._stop_seen = False
        self._stop_agreed = False
        self._stop_read = None  # a read of the stop flag in flight (a Future)
        self._stop_polled_at = 0.0
        self._skipped_in_a_row = 0
        self._skipped_total = 0
        self._gradients_every_step: bool | None = None  # decided at train start (_judges_gradients_every_step)
        reporter.before_save = self._weights_must_be_finite

    # ---- attempts -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _drop_idle_sigterm_broadcast(trainer)
        self._gradients_every_step = self._judges_gradients_every_step(trainer)
        if trainer.global_rank != 0 or self.board is None:
            return
        try:
            base, failures = self.board.get("attempt_base", 0), self.board.items("failures")
        except Exception as exc:  # bookkeeping must never stop training
            log.warning("could not read the attempt count from the driver: %s", exc)
            return
        self.attempt = base + len(failures) + 1
        # No retry left: what this attempt logs after its last checkpoint will never be re-run, so keep it.
        final = self.max_failures != -1 and len(failures) >= self.max_failures
        gate = getattr(trainer.logger, "gate", None)
        if gate is not None:
            gate.final = final
        self.board.append("attempts", {"attempt": self.attempt, "step": trainer.global_step, "time": time.time()})

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        gate = getattr(trainer.logger, "gate", None)
        if gate is not None and isinstance(exception, (NonFiniteLossError, StopRequested)):
            gate.final = True  # never retried (see AttemptRecorder), or the run ends here

    # ---- per step ---------------------------------------------------------------------------------------

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # accumulated micro-batches
        self._last_loss = loss.detach()
        if self._early is None and _gradients_replicated(trainer):
            device = trainer.strategy.root_device
            flags = torch.stack([self._loss_bad.to(device).float(),
                                 torch.tensor(float(self._poll_stop(trainer)), device=device)])
            self._early = (flags, torch.distributed.all_reduce(flags, async_op=True))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        device = trainer.strategy.root_device
        loss_bad = self._loss_bad.to(device) if self._loss_bad is not None else torch.tensor(False, device=device)
        self._loss_bad = None
        if self._gradients_every_step is False:  # judged through the weights instead (class docstring)
            grads_bad = torch.tensor(0.0, device=device)
        else:
            grads_bad = self._gradients_bad(trainer, optimizer, device).float()
        if self._early is not None:  # loss and stop flags summed over the ranks during the backward pass
            (flags, reduction), self._early = self._early, None
            reduction.wait()
            (ranks_with_bad_loss, stop), ranks_with_bad_grads = flags.tolist(), float(grads_bad)
        else:
            flags = torch.stack([loss_bad.float(), grads_bad, torch.tensor(float(self._poll_stop(trainer)),
                                                                           device=device)])
            if trainer.world_size > 1:
                flags = _sum_over_ranks(trainer, flags)
            ranks_with_bad_loss, ranks_with_bad_grads, stop = flags.tolist()  # the one host sync per step
        self._stop_agreed = self._stop_agreed or stop > 0
        if not ranks_with_bad_loss and not ranks_with_bad_grads:
            self._skipped_in_a_row = 0
            return
        message = self._describe(trainer, bool(loss_bad), int(ranks_with_bad_loss))
        if self.mode == "stop":
            self._fail(trainer, f"{message}; {NONFINITE_HINT}")
        self._skipped_in_a_row += 1
        self._skipped_total += 1
        if self._skipped_in_a_row > self.max_consecutive_skips:
            self._fail(trainer, f"{message}, the {self._skipped_in_a_row}th step in a row: giving up "
                                f"(failure.max_consecutive_skips={self.max_consecutive_skips})")
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
        if loss_bad or trainer.global_rank == 0:
            log.warning("skipped the optimizer step: %s", message)
        if trainer.global_rank == 0 and trainer.logger is not None:
            from orchestrator.callbacks import logged_step

            trainer.logger.log_metrics({"orch/nonfinite_skipped": self._skipped_total}, step=logged_step(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._stop_agreed and not self.reporter.stopping:
            log.warning("stop requested: checkpointing step %d and ending training", trainer.global_step)
            self.reporter.save_for_stop(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # The reporter, before this callback, has just reported the stop checkpoint with this step's metrics.
        if self.reporter.stopping:
            raise StopRequested(f"stopped at step {trainer.global_step} on request")

    def _judges_gradients_every_step(self, trainer: pl.Trainer) -> bool:
        """False where a non-finite gradient can wait for the weights to show it (class docstring)."""
        if self.mode != "stop" or str(trainer.precision) == "16-mixed":  # (16-mixed: no gradient check at all)
            return True
        return not (trainer.world_size == 1 or _gradients_replicated(trainer))

    def _weights_must_be_finite(self, trainer: pl.Trainer) -> None:
        """Before a checkpoint is written: weights a non-finite gradient reached are never saved. Every rank holds
        the same weights where this matters (_judges_gradients_every_step), so every rank fails here together."""
        if self._gradients_every_step is not False or _weights_finite(trainer.lightning_module):
            return
        self._fail(trainer, f"non-finite weights at step {trainer.global_step} (a non-finite gradient reached "
                            f"them since the last check); {NONFINITE_HINT}")

    def _fail(self, trainer: pl.Trainer, message: str) -> None:
        """Every rank raises together, but only after rank 0 has sent the metrics up to this step: this
        failure is final, and Ray stops the other ranks as soon as the first error reaches it."""
        gate = getattr(trainer.logger, "gate", None)
        if gate is not None:
            gate.final = True
            gate.flush(timeout_s=30)
        if trainer.world_size > 1:
            trainer.strategy.barrier("orch-nonfinite")
        raise NonFiniteLossError(message)

    def _gradients_bad(self, trainer: pl.Trainer, optimizer, device) -> torch.Tensor:
        # With 16-bit mixed precision, inf gradients are routine: the GradScaler skips those steps itself.
        if str(trainer.precision) == "16-mixed":
            return torch.tensor(False, device=device)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(False, device=device)
        try:
            return _any_nonfinite(grads, device)
        except Exception:  # exotic gradient layouts: the loss check still holds
            return torch.tensor(False, device=device)

    def _describe(self, trainer: pl.Trainer, mine: bool, ranks_with_bad_loss: int) -> str:
        step, rank = trainer.global_step, trainer.global_rank
        value = float(self._last_loss) if self._last_loss is not None and self._last_loss.numel() == 1 else None
        if mine:
            cause = ""
            if self._gradients_every_step is False and not _weights_finite(trainer.lightning_module):
                cause = " (the weights are non-finite: a non-finite gradient reached them at an earlier optimizer step)"
            return f"non-finite loss ({value}) at step {step} on rank {rank}{cause}"
        if ranks_with_bad_loss:
            return f"non-finite loss at step {step} on {ranks_with_bad_loss} other rank(s) (rank {rank}: {value})"
        return f"non-finite gradients at step {step} (the loss was finite on every rank)"

    def _poll_stop(self, trainer: pl.Trainer) -> bool:
        """Rank 0 asks the progress board at most every 0.5 s and never waits for the answer."""
        if trainer.global_rank != 0 or self.board is None or self._stop_seen:
            return self._stop_seen
        if self._stop_read is not None and self._stop_read.done():
            try:
                self._stop_seen = bool(self._stop_read.result())
            except Exception:  # the cluster is going away; Ray will end this attempt
                pass
            self._stop_read = None
        now = time.monotonic()
        if self._stop_read is None and not self._stop_seen and now - self._stop_polled_at >= STOP_POLL_INTERVAL_S:
            self._stop_read = self.board.get_later("stop_requested", False)
            self._stop_polled_at = now
        return self._stop_seen


def _gradients_replicated(trainer: pl.Trainer) -> bool:
    """Plain DDP over torch.distributed, one backward pass per step: after it every rank holds the same averaged
    gradients, so a verdict on them needs no collective of its own."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    return (trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
            and isinstance(strategy.model, DistributedDataParallel)
            and getattr(strategy, "_ddp_comm_hook", None) is None
            and trainer.accumulate_grad_batches == 1 and trainer.lightning_module.automatic_optimization)


def _any_nonfinite(tensors: list[torch.Tensor], device) -> torch.Tensor:
    """Whether any value is inf or NaN, as a tensor on `device`.

    The 2-norm runs as one fused pass (torch's foreach kernels), ~20x faster on a CPU than the max-abs norm, which
    took a third of a small model's step time. Any inf or NaN makes it non-finite; only then is the max-abs norm,
    which cannot overflow, asked whether huge finite values overflowed it."""
    if _finite(torch.nn.utils.get_total_norm(tensors, norm_type=2.0)):
        return torch.tensor(False, device=device)
    return (~_finite_tensor(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf))).to(device)


def _weights_finite(module: torch.nn.Module) -> bool:
    """One pass over the weights (rarely: before a checkpoint, or once the job is failing)."""
    weights = [p.detach() for p in module.parameters()]
    return not weights or not bool(_any_nonfinite(weights, weights[0].device))


def _drop_idle_sigterm_broadcast(trainer: pl.Trainer) -> bool:
    """Skip the SIGTERM flag Lightning broadcasts from rank 0 before every training step, where it can only be 0.

    Lightning (2.6, `_TrainingEpochLoop._broadcast_sigterm_tensor`) installs its SIGTERM handler only from the
    main thread; Ray Train runs the training function in a thread of its own, so under Ray the handler is never
    installed, the flag never set, and the broadcast is a blocking round trip of all ranks per step that says
    nothing (on a 2-worker CPU step it held the ranks in lock-step once more per step). Stopping keeps working:
    `orch stop` and Ctrl-C reach the ranks through this guard's stop flag, a killed worker through Ray Train.
    Every rank must decide alike, or one would wait in a broadcast the others never join: one all-reduce at the
    start of training settles it (dropped only if every rank can). ORCH_LIGHTNING_SIGTERM_BROADCAST=1 keeps
    Lightning's broadcast.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if (trainer.world_size < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized()
            or not hasattr(epoch_loop, "_broadcast_sigterm_tensor")):
        return False
    # Lightning registers its handler from the main thread only (signal_connector._register_signal).
    can_skip = (threading.current_thread() is not threading.main_thread() and not trainer.received_sigterm
                and os.environ.get("ORCH_LIGHTNING_SIGTERM_BROADCAST", "0") != "1")
    willing = _sum_over_ranks(trainer, torch.tensor([int(can_skip)], device=trainer.strategy.root_device))
    if int(willing.item()) != trainer.world_size:
        return False
    epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast  # this trainer's loop only
    return True


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast where no rank can receive one (above)."""


def _sum_over_ranks(trainer: pl.Trainer, flags: torch.Tensor) -> torch.Tensor:
    """One all-reduce; Lightning's `strategy.reduce` puts a barrier, a second round trip, before it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags)
        return flags
    return trainer.strategy.reduce(flags, reduce_op="sum")


def _finite_tensor(norm: torch.Tensor) -> torch.Tensor:
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 shards: the global norm
    return torch.isfinite(norm)


def _finite(norm: torch.Tensor) -> bool:
    return bool(_finite_tensor(norm))  # a host sync; the flags' tolist() makes one per step anyway


def restored_metrics(checkpoint) -> list:
    """The metrics a restored checkpoint carries (tracking/gate.py): MLflow may not have them yet."""
    from orchestrator.tracking.gate import read_sidecar

    if checkpoint is None:
        return []
    with checkpoint.as_directory() as folder:
        return read_sidecar(folder)
