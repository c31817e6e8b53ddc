"""Baseline: the digits job as a plain Lightning script with 2-process DDP on CPU (gloo), no Ray, no MLflow.

Prints one JSON line (rank 0): time from process start to the first optimizer step, the start-up broken down like
orch's `orch/startup/*` metrics where a phase exists here (imports_s: process start -> Lightning imported and the
model built; setup_s: -> on_train_start on rank 0, i.e. rank 1 spawned, process group, DDP wrap; first_step_s:
-> the first optimizer step done), fit_end_s (-> fit returned), final val/acc. Process start is BENCH_STARTED_AT
(a harness passes the time it took just before Popen), else the time this script starts.
"""

from __future__ import annotations

import os
import time


def _process_started_at() -> float:
    """The harness's timestamp if given (DDP's rank 1 inherits it, so both ranks measure from the same start)."""
    if os.environ.get("BENCH_STARTED_AT"):
        return float(os.environ["BENCH_STARTED_AT"])
    # Run by hand: now, which leaves out Python's own start-up (~0.03 s). Not psutil's create_time(): it is early
    # by up to a second (orchestrator/cli.py says why), which would make plain Lightning look slower than it is.
    return time.time()


STARTED_AT = _process_started_at()

import json  # noqa: E402
import sys  # noqa: E402

import lightning.pytorch as pl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs.digits import DigitsCNN, DigitsDataModule  # noqa: E402


class StartupClock(pl.Callback):
    """Absolute times of the marks orch also records: train start and the first optimizer step's end."""

    def __init__(self):
        self.train_start_at: float | None = None
        self.first_step_at: float | None = None

    def on_train_start(self, trainer, pl_module):
        self.train_start_at = time.time()

    def on_train_batch_end(self, trainer, *args):
        if self.first_step_at is None:
            self.first_step_at = time.time()


def main() -> None:
    epochs = int(os.environ.get("BENCH_EPOCHS", "10"))
    os.environ["BENCH_STARTED_AT"] = repr(STARTED_AT)  # the DDP child re-runs this script: same origin
    pl.seed_everything(42, workers=True, verbose=False)  # as digits.yaml's trainer.seed
    model = DigitsCNN(channels=32, hidden=128, lr=0.002)
    data = DigitsDataModule(batch_size=32)
    built_at = time.time()
    clock = StartupClock()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, log_every_n_steps=5,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(model, datamodule=data)
    fit_end = time.time()
    if trainer.global_rank == 0:
        print(json.dumps({
            "arm": "plain_lightning_ddp",
            "first_step_s": clock.first_step_at - STARTED_AT,
            "startup": {"imports_s": built_at - STARTED_AT, "setup_s": clock.train_start_at - built_at,
                        "first_step_s": clock.first_step_at - clock.train_start_at},
            "fit_end_s": fit_end - STARTED_AT,
            "wall_s": fit_end - STARTED_AT,  # kept for older readers; a harness measures the real exit itself
            "val_acc": float(trainer.callback_metrics["val/acc"]),
        }), flush=True)


if __name__ == "__main__":
    main()
