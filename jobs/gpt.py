"""Recipe: a GPT-style decoder language model whose size is set in the spec, from a CPU toy to 7B shapes."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # SDPA picks flash / memory-efficient kernels on CUDA and a fused kernel on CPU: no T x T matrix is kept.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """One transformer layer: the unit FSDP wraps, activation checkpointing recomputes and compile fuses."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(pl.LightningModule):
    """GPT-2 style decoder (pre-norm, learned positions, tied embeddings), trained on next-token prediction.

    Sizes: `n_layer`, `n_head`, `n_embd` (width), `block_size` (context). The default tokenizer is byte-level
    (vocab 256); a larger `vocab_size` gives the embedding the shape of a real tokenizer's.
    """

    block_classes = (Block,)  # read by the orchestrator: FSDP auto-wrap, activation checkpointing, compile

    def __init__(self, vocab_size: int = 256, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 block_size: int = 128, dropout: float = 0.0, bias: bool = True, lr: float = 6e-4,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.save_hyperparameters()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (GPT-2): one matrix for input and output
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def tokens_per_sample(self) -> int:
        return self.hparams.block_size

    def flops_per_sample(self) -> float:
        """Training FLOPs per sequence, forward + backward: 6N per token plus attention's 12·L·d·T (PaLM, app. B)."""
        h = self.hparams
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return h.block_size * (6 * n + 12 * h.n_layer * h.n_embd * h.block_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.hparams.block_size:
            raise ValueError(f"a sequence of {idx.shape[1]} tokens is longer than the model's context "
                             f"(block_size={self.hparams.block_size}); set data.init_args.block_size to at most "
                             f"model.init_args.block_size")
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def _loss(self, batch) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/bits_per_token", loss / math.log(2), on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        h = self.hparams
        # Weight decay on matrices only; biases, norms and (tied) embeddings' 1-D siblings are left alone.
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"  # one kernel for the whole update on GPUs
        optimizer = torch.optim.AdamW(groups, lr=h.lr, betas=tuple(h.betas), fused=fused)
        if self._trainer is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(h.warmup_steps, total, h.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _warmup_cosine(warmup: int, total: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
