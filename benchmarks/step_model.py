"""The per-step benchmark's model and data, shared by every arm (plain PyTorch, plain Lightning, torchrun, orch).

Importable by class path (`benchmarks.step_model.StepMLP`, `benchmarks.step_model.StepData`) with the repository
root on PYTHONPATH. The measuring stick is `StepRecorder`, the same code in every arm: it notes the wall-clock
time at the start of every training step (so whatever a framework does between two steps counts in the period)
and the loss of every step, and the process of rank 0 writes both as JSON when training ends.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

RECORD_ENV = "BENCH_STEP_RECORD"  # where rank 0 writes the record when no `record_path` init_arg is given


def pin_threads() -> None:
    """A Ray worker with one CPU runs torch on one thread; every arm does the same so the step costs the same."""
    torch.set_num_threads(1)


class StepRecorder:
    """Step-start times and per-step losses; identical instructions per step in every arm."""

    def __init__(self, path: str | None):
        self.path = path or os.environ.get(RECORD_ENV)
        self.starts: list[float] = []
        self.losses: list[float] = []
        self.fingerprint: dict[str, float] = {}

    def step_started(self, model: nn.Module, batch) -> None:
        if not self.starts:
            # When losses differ between arms, these tell initial weights apart from data (once, before timing).
            self.fingerprint = {"weights": float(sum(p.double().sum() for p in model.parameters())),
                                "first_batch": float(batch[0].double().sum())}
        self.starts.append(time.perf_counter())

    def step_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(float(loss.detach()))

    def write(self, rank: int, world_size: int, batch_size: int, **extra) -> None:
        if rank != 0 or not self.path:
            return
        record = {"starts": self.starts, "losses": self.losses, "world_size": world_size, "batch_size": batch_size,
                  "threads": torch.get_num_threads(), "fingerprint": self.fingerprint, **extra}
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(json.dumps(record))


class StepMLP(pl.LightningModule):
    """An MLP sized for ~10-30 ms per step of batch 64 on one CPU thread; no dropout, so every arm computes the
    same numbers from the same seed."""

    def __init__(self, in_features: int = 512, hidden: int = 1024, depth: int = 3, classes: int = 10,
                 lr: float = 1e-3, record_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)
        self.recorder = StepRecorder(record_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def compute_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def setup(self, stage: str | None = None) -> None:
        pin_threads()

    def training_step(self, batch, batch_idx):
        self.recorder.step_started(self, batch)
        loss = self.compute_loss(batch)
        self.recorder.step_loss(loss)
        # A real module logs its loss; under orch the MLflow logger ships it, so tracking's per-step cost counts.
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return make_optimizer(self)

    def on_train_end(self) -> None:
        data = self.trainer.datamodule
        self.recorder.write(self.global_rank, self.trainer.world_size, data.hparams.batch_size if data else -1)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """One place, so the PyTorch loops step exactly as Lightning does."""
    return torch.optim.Adam(model.parameters(), lr=model.hparams.lr)


def synthetic_dataset(samples: int, in_features: int, classes: int, seed: int) -> TensorDataset:
    """Fixed data from a fixed generator: inputs ~ N(0, 1), labels from a fixed random linear teacher (learnable,
    so the loss falls and comparing losses across arms compares real training)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_features, generator=generator)
    teacher = torch.randn(in_features, classes, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


class StepData(pl.LightningDataModule):
    """`samples` rows split evenly over the ranks, batches in a fixed order (shuffle=False), no validation set."""

    def __init__(self, samples: int = 64 * 400, batch_size: int = 64, in_features: int = 512, classes: int = 10,
                 seed: int = 1234):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        pin_threads()
        if self.train_set is None:
            hp = self.hparams
            self.train_set = synthetic_dataset(hp.samples, hp.in_features, hp.classes, hp.seed)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        return self.loader(trainer.world_size, trainer.global_rank) if trainer is not None else self.loader()

    def loader(self, world_size: int = 1, rank: int = 0) -> DataLoader:
        """Each rank's shard in a fixed order. Lightning swaps a training loader's sampler for a *shuffling*
        DistributedSampler whenever it runs distributed (orch's one Ray worker too) but not in a single plain
        process, so the arms would read different batches; a DistributedSampler(shuffle=False) of our own, which
        Lightning keeps, gives every arm the same batches at negligible cost."""
        sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=0)
