"""A small MLP with dropout on shuffled blobs that can hurt itself on cue: SIGKILL its worker, or a NaN loss."""

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Blobs(pl.LightningDataModule):
    def __init__(self, n: int = 256, dim: int = 8, batch_size: int = 16):
        super().__init__()
        self.n, self.dim, self.batch_size = n, dim, batch_size

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 2, (self.n,), generator=generator)
        features = torch.randn(self.n, self.dim, generator=generator) + labels[:, None] * 1.5
        self.train_set = TensorDataset(features, labels)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.train_set, batch_size=64)


class NoisyMLP(pl.LightningModule):
    """Dropout draws random numbers every step: a resumed run matches only if its randomness is replayed."""

    def __init__(self, dim: int = 8, hidden: int = 32, lr: float = 0.05, dropout: float = 0.3,
                 sleep_per_step: float = 0.0, kill_at_step: int = -1, kill_rank: int = 0, kill_times: int = 1,
                 marker: str = "", nan_at_step: int = -1, nan_rank: int = 1, nan_gradients: bool = True,
                 nan_gradients_only: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 2))

    def training_step(self, batch, batch_idx):
        h = self.hparams
        if self.global_step == h.kill_at_step and self.global_rank == h.kill_rank and self._kills_left():
            with open(h.marker, "a") as f:
                f.write(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would
        if h.sleep_per_step:
            time.sleep(h.sleep_per_step)
        features, labels = batch
        loss = nn.functional.cross_entropy(self.net(features), labels)
        if self.global_step == h.nan_at_step and self.global_rank == h.nan_rank:
            # nan_gradients=false: a NaN loss whose gradients stay finite, so DDP's averaged gradients give no
            # sign of it and only the ranks' agreement on the loss can stop the other ranks at this step.
            if h.nan_gradients_only:
                # A finite loss whose gradients are NaN (0 x the infinite slope of sqrt at 0): DDP averages the NaN
                # into every rank's gradients, and the optimizer step into the weights.
                weight = self.net[0].weight
                loss = loss + 0.0 * torch.sqrt(weight - weight.detach()).sum()
            else:
                loss = loss * float("nan") if h.nan_gradients else loss + float("nan")
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def _kills_left(self) -> bool:
        marker = Path(self.hparams.marker)
        done = len(marker.read_text().splitlines()) if marker.exists() else 0
        return done < self.hparams.kill_times

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        accuracy = (self.net(features).argmax(-1) == labels).float().mean()
        self.log("val/acc", accuracy, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
