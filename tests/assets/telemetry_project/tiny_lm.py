"""A tiny causal transformer on random tokens: says how many tokens a sample holds; one rank can be slowed down."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(pl.LightningModule):
    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 2, seq_len: int = 32,
                 lr: float = 3e-3, slow_rank: int = -1, sleep_s: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    @property
    def tokens_per_sample(self) -> int:
        return self.hparams.seq_len

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens) + self.position[: tokens.shape[1]]))

    def training_step(self, batch, batch_idx):
        if self.hparams.sleep_s and self.global_rank == self.hparams.slow_rank:
            time.sleep(self.hparams.sleep_s)  # a straggler: its forward pass takes longer than the others'
        (tokens,) = batch  # seq_len + 1 tokens: seq_len inputs, each predicting the next
        logits = self(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        self.log("val/loss", F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)),
                 sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class TinyLMWithFormula(TinyLM):
    """The recipe gives its own FLOPs: 6 N per token for the matmul weights, plus causal attention."""

    def flops_per_sample(self) -> float:
        h = self.hparams
        matmul_params = sum(p.numel() for name, p in self.named_parameters()
                            if p.dim() == 2 and not name.startswith(("embed", "position")))
        tokens = h.seq_len
        attention = 12 * h.layers * tokens * tokens * h.dim  # QK^T and AV: 4 t^2 d forward, twice that backward
        return 6 * matmul_params * tokens + attention


class RandomTokens(pl.LightningDataModule):
    def __init__(self, n: int = 512, vocab: int = 64, sample_tokens: int = 33, batch_size: int = 16):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.hparams.vocab, (self.hparams.n, self.hparams.sample_tokens), generator=generator)
        self.train_set = TensorDataset(tokens)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.train_set, batch_size=64)
