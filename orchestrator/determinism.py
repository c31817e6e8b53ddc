"""Exact resumption: a run restored from any checkpoint, even mid-epoch, trains as if it had never stopped.

What Lightning 2.6 does by itself when it resumes from a checkpoint saved mid-epoch: it restores the
weights, the optimizer and the loop counters, then starts a *fresh* iterator over the train dataloader
and runs the remaining number of batches from its beginning, so the batches the failed attempt already
consumed are trained on twice and the rest of the epoch never (a "not resumable" warning says so; only
loaders with `state_dict()` like torchdata's StatefulDataLoader are restored). It saves no RNG state,
so dropout and random samplers draw differently after a restart. Measured on a small model: final
weights differ by ~0.1 after one restart.

This callback makes it exact (measured difference 0.0, see tests/test_faults.py):

1. Randomness is a function of the position in training, not of history. The global RNGs (torch, numpy,
   random) are reseeded from (seed, rank, epoch, batch) right before every training step, and from
   (seed, rank, epoch) before each epoch's dataloader iterator is created and when its sampler starts,
   so a sampler that draws from the global RNG (RandomSampler) shuffles each epoch the same way. This
   replaces Lightning's single seed_everything stream; runs with the same seed stay reproducible.
2. The resumed epoch skips what was consumed. The train loader's batch sampler gets a thin wrapper that
   drops the first k batches' indices (no sample is loaded for them), after the sampler's epoch is set;
   the iterator is then re-created, since a loader with worker processes pulls indices at creation.

Limits: random augmentation that runs inside DataLoader worker processes draws from the workers' own
streams and is not replayed; custom batch samplers (not torch's BatchSampler) are resumed by Lightning's
default behaviour, with a warning.
"""

from __future__ import annotations

import itertools
import logging
import random

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler

log = logging.getLogger(__name__)

# Distinct streams for the places randomness is drawn, so they never coincide.
ITERATOR, SAMPLER, FETCH, STEP = 1, 2, 3, 4


def reseed(*parts: int) -> None:
    value = int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0])
    random.seed(value)
    np.random.seed(value % 2**32)
    # torch.manual_seed also walks every other backend's generators (0.12 ms, twice a step); the CPU generator
    # and, once CUDA is up, its generators are all a training step draws from.
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_available():
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(value)
        else:
            torch.manual_seed(value)  # queued for CUDA's lazy start


class _SeededSampler:
    """Wraps a batch sampler's index sampler: reseeds per epoch and per batch, skips consumed batches once."""

    def __init__(self, inner, seed: int, rank: int, batch_size: int):
        self.inner, self.seed, self.rank, self.batch_size = inner, seed, rank, batch_size
        self.epoch = 0
        self.skip_batches = 0

    def __iter__(self):
        reseed(self.seed, self.rank, self.epoch, SAMPLER)
        indices = iter(self.inner)
        skip, self.skip_batches = self.skip_batches, 0
        if skip:
            next(itertools.islice(indices, skip * self.batch_size, skip * self.batch_size), None)
        for position, index in enumerate(indices):
            if position % self.batch_size == 0:
                # The samples of this batch are loaded right after: in-process augmentation is replayed too.
                reseed(self.seed, self.rank, self.epoch, FETCH, skip + position // self.batch_size)
            yield index

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)


class ExactResume(pl.Callback):
    def __init__(self, seed: int):
        self.seed = seed
        self._prepared_epoch: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.fabric.utilities.data import _set_sampler_epoch

        loop = trainer.fit_loop
        combined, fetcher = getattr(loop, "_combined_loader", None), getattr(loop, "_data_fetcher", None)
        if combined is None or fetcher is None:  # no train loader, or Lightning's internals moved
            return
        # After Lightning's own restore (fit_loop.reset ran): the epoch about to run and how many of its
        # batches the checkpoint had already consumed.
        epoch = loop.epoch_progress.current.processed
        consumed = loop.epoch_loop.batch_progress.current.ready if loop.restarting else 0
        if consumed >= trainer.num_training_batches:
            consumed = 0
        rank = trainer.global_rank
        for loader in combined.flattened:
            batch_sampler = getattr(loader, "batch_sampler", None)
            if isinstance(batch_sampler, BatchSampler) and batch_sampler.batch_size:
                if not isinstance(batch_sampler.sampler, _SeededSampler):
                    batch_sampler.sampler = _SeededSampler(batch_sampler.sampler, self.seed, rank,
                                                           batch_sampler.batch_size)
                batch_sampler.sampler.skip_batches = consumed
            elif consumed:
                log.warning("the train dataloader has no torch BatchSampler: the resumed epoch restarts its data "
                            "order instead of skipping the %d batches already trained on", consumed)
            _set_sampler_epoch(loader, epoch)
        if consumed:
            log.info("resuming epoch %d after its first %d batches", epoch, consumed)
        reseed(self.seed, rank, epoch, ITERATOR)
        iter(fetcher)  # re-create the iterators now that the epoch and the skip are set
        self._prepared_epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning creates this epoch's iterator right after this hook (loader workers draw their seeds then).
        if self._prepared_epoch != trainer.current_epoch:
            reseed(self.seed, trainer.global_rank, trainer.current_epoch, ITERATOR)
        self._prepared_epoch = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        reseed(self.seed, trainer.global_rank, trainer.current_epoch, STEP, batch_idx)
