"""A user's own module, outside jobs/: a linear classifier on random blobs, named by class_path."""

import os

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
        features = torch.randn(self.n, self.dim, generator=generator) + labels[:, None] * 2.0
        self.train_set = TensorDataset(features, labels)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.train_set, batch_size=64)


class LinearClassifier(pl.LightningModule):
    def __init__(self, dim: int = 8, lr: float = 0.1, fail_at_step: int = -1, sleep_per_step: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(dim, 2)

    def on_train_start(self):
        # What the tests check: a one-worker job trains unwrapped, a wider one inside DistributedDataParallel.
        wrapped = isinstance(self.trainer.strategy.model, nn.parallel.DistributedDataParallel)
        self.log("debug/wrapped_in_ddp", float(wrapped), on_step=False, on_epoch=True)
        self.log("debug/niceness", float(os.nice(0)), on_step=False, on_epoch=True)  # Ray's default for workers: 15

    def training_step(self, batch, batch_idx):
        import time

        if self.global_step == self.hparams.fail_at_step:
            raise RuntimeError(f"user code failed on purpose at step {self.global_step}")
        if self.hparams.sleep_per_step:
            time.sleep(self.hparams.sleep_per_step)
        features, labels = batch
        loss = nn.functional.cross_entropy(self.linear(features), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        features, labels = batch
        accuracy = (self.linear(features).argmax(-1) == labels).float().mean()
        self.log("val/acc", accuracy, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
