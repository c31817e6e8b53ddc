"""Image data for classification: a folder of class sub-folders by path, or by default scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """`root/<class>/<image>`: classes are the sub-folder names in sorted order, as torchvision's ImageFolder."""

    def __init__(self, root: Path, image_size: int, channels: int):
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.classes:
            raise FileNotFoundError(f"image folder {str(root)!r} has no class sub-folders (root/<class>/<image>)")
        self.items = [(path, label) for label, name in enumerate(self.classes)
                      for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.items:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}")
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image  # Pillow ships with matplotlib/scikit-learn's stack; only folders need it

        path, label = self.items[index]
        with Image.open(path) as image:
            image = image.convert("L" if self.channels == 1 else "RGB").resize((self.image_size, self.image_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(self.image_size, self.image_size, self.channels).permute(2, 0, 1).float() / 255.0
        return (pixels - 0.5) / 0.5, label


def digits_dataset(image_size: int, channels: int) -> TensorDataset:
    """1,797 8x8 digits shipped with scikit-learn, upsampled (bilinear) to the network's input size."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.repeat(1, channels, 1, 1) - 0.5) / 0.5
    return TensorDataset(images, torch.tensor(digits.target, dtype=torch.long))


class ImageDataModule(pl.LightningDataModule):
    """`path`: a folder of class sub-folders; none means scikit-learn's digits. A fixed split for every worker."""

    def __init__(self, path: str | None = None, image_size: int = 32, channels: int = 1, batch_size: int = 64,
                 val_fraction: float = 0.2, split_seed: int = 0, num_workers: int = 0, augment: bool = True):
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return  # loaded once, even when Lightning sets up again
        h = self.hparams
        if h.path:
            dataset = ImageFolder(Path(h.path).expanduser(), h.image_size, h.channels)
        else:
            dataset = digits_dataset(h.image_size, h.channels)
        n_val = max(1, int(len(dataset) * h.val_fraction))
        generator = torch.Generator().manual_seed(h.split_seed)
        self.train_set, self.val_set = random_split(dataset, [len(dataset) - n_val, n_val], generator=generator)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Random shifts of up to 1/8 of the image, on the device (cheap), for training batches only."""
        images, labels = batch
        if self.hparams.augment and self.trainer is not None and self.trainer.training:
            pad = max(1, self.hparams.image_size // 8)
            padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
            dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            images = padded[..., dy: dy + images.shape[-2], dx: dx + images.shape[-1]]
        return images, labels

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.hparams.num_workers)
