"""Baseline: the digits job as a plain Lightning script with 2-process DDP on CPU (gloo), no Ray, no MLflow.

Prints one JSON line: wall time, time from process start to the first optimizer step, final val/acc.
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTED_AT = float(os.environ.get("BENCH_STARTED_AT", time.time()))

import lightning.pytorch as pl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jobs.digits import DigitsCNN, DigitsDataModule  # noqa: E402


class FirstStep(pl.Callback):
    def __init__(self):
        self.first_step_s = None

    def on_train_batch_end(self, trainer, *args):
        if self.first_step_s is None:
            self.first_step_s = time.time() - STARTED_AT


def main() -> None:
    epochs = int(os.environ.get("BENCH_EPOCHS", "10"))
    os.environ.setdefault("BENCH_STARTED_AT", str(STARTED_AT))  # child DDP processes measure from our start
    pl.seed_everything(42, workers=True, verbose=False)
    first = FirstStep()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, log_every_n_steps=5,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[first])
    trainer.fit(DigitsCNN(channels=32, hidden=128, lr=0.002), datamodule=DigitsDataModule(batch_size=32))
    if trainer.global_rank == 0:
        print(json.dumps({"arm": "plain_lightning_ddp", "first_step_s": first.first_step_s,
                          "wall_s": time.time() - STARTED_AT,
                          "val_acc": float(trainer.callback_metrics["val/acc"])}))


if __name__ == "__main__":
    main()
