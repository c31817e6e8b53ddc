"""Run by tests/test_fault_units.py under torchrun, 2 ranks: where orch drops Lightning's per-step SIGTERM broadcast.

Three fits in the same ranks: both in a thread (as under Ray Train: dropped), both in the main thread (kept:
Lightning's SIGTERM handler is there), and rank 0 in a thread with rank 1 in the main thread (the ranks disagree,
so both keep it; a rank that dropped it alone would leave the other waiting in a broadcast). Prints one JSON line.
"""

import json
import os
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).parent / "faults_project"))
from faulty import Blobs, NoisyMLP  # noqa: E402

from orchestrator.faults import _drop_idle_sigterm_broadcast, _no_sigterm_broadcast  # noqa: E402


class Decide(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.dropped = _drop_idle_sigterm_broadcast(trainer)


class CountBroadcasts(pl.Callback):
    """Counts Lightning's per-step SIGTERM broadcasts: its method, or the stand-in, is called before each step."""

    def on_train_start(self, trainer, pl_module):
        loop = trainer.fit_loop.epoch_loop
        inner = loop._broadcast_sigterm_tensor
        self.calls = 0

        def counted():
            self.calls += 1
            inner()
        self.real = inner is not _no_sigterm_broadcast
        loop._broadcast_sigterm_tensor = counted


def fit(in_thread: bool) -> dict:
    decide, count = Decide(), CountBroadcasts()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[decide, count])

    def run():
        trainer.fit(NoisyMLP(), datamodule=Blobs(n=128, batch_size=8))
    if in_thread:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    else:
        run()
    return {"dropped": decide.dropped, "real_broadcasts": count.calls if count.real else 0,
            "steps": trainer.global_step}


rank = int(os.environ["RANK"])
results = {"threads": fit(True), "main": fit(False), "mixed": fit(rank == 0)}
if rank == 0:
    print("RESULT " + json.dumps(results), flush=True)
