"""Text corpus for language models: any file or folder, by default the Python standard library's own sources.

Tokens are bytes (vocab 256): no tokenizer to download or train, and every machine has the default corpus
offline. A byte-level model reads UTF-8 of any language unchanged.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".toml", ".cfg", ".html", ".c", ".h")


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """One file as given, or a folder's text files in a stable order (sorted), skipping hidden and caches."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"text corpus {str(path)!r} is neither a file nor a folder")
    files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in suffixes
             and not any(part.startswith(".") or part in ("__pycache__", "site-packages")
                         for part in p.relative_to(path).parts)]
    if not files:
        raise FileNotFoundError(f"no text files ({', '.join(suffixes)}) under {str(path)!r}")
    return files


def read_bytes(files: list[Path], max_bytes: int | None) -> np.ndarray:
    chunks, total = [], 0
    for file in files:
        data = file.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8)


class TokenBlocks(Dataset):
    """Non-overlapping windows of `block_size + 1` tokens: input = first T, target = the same shifted by one."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        if len(tokens) <= block_size:
            raise ValueError(f"the corpus has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
        self.tokens = torch.from_numpy(tokens.copy())  # one byte per token in memory; int64 per sample only
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, index: int):
        start = index * self.block_size
        window = self.tokens[start: start + self.block_size + 1]
        window = window.long()
        return window[:-1], window[1:]


class TextDataModule(pl.LightningDataModule):
    """`path`: a text file or folder (default: the standard library). The last `val_fraction` is held out."""

    def __init__(self, path: str | None = None, block_size: int = 128, batch_size: int = 16,
                 val_fraction: float = 0.05, max_bytes: int | None = 8_000_000, num_workers: int = 0,
                 suffixes: list[str] | None = None):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1; got {val_fraction}")
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return  # read once, even when Lightning sets up again
        h = self.hparams
        path = Path(h.path).expanduser() if h.path else default_corpus()
        tokens = read_bytes(corpus_files(path, tuple(h.suffixes or TEXT_SUFFIXES)), h.max_bytes)
        split = int(len(tokens) * (1 - h.val_fraction))
        self.train_set = TokenBlocks(tokens[:split], h.block_size)
        self.val_set = TokenBlocks(tokens[split:], h.block_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
