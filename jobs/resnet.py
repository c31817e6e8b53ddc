"""Recipe: ResNet-18/34/50/101/152 (He et al. 2015) for image classification, written here (no torchvision)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

# depth -> (block kind, blocks per stage), as in the paper's table 1.
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(pl.LightningModule):
    """`depth` in 18/34/50/101/152; `width` = channels of the first stage (64 in the paper).

    `small_inputs` swaps the 7x7/2 stem and max-pool for a 3x3/1 stem, the usual choice for images of
    32 pixels or less (CIFAR, digits), which the ImageNet stem would shrink to nothing.
    """

    block_classes = (BasicBlock, Bottleneck)

    def __init__(self, depth: int = 18, num_classes: int = 10, in_channels: int = 1, width: int = 64,
                 small_inputs: bool = True, image_size: int = 32, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, label_smoothing: float = 0.0):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}; got {depth}")
        self.save_hyperparameters()
        kind, counts = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        if small_inputs:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, in_ch = [], width
        for index, count in enumerate(counts):
            stage_width = width * 2 ** index
            layers = []
            for i in range(count):
                layers.append(block(in_ch, stage_width, 2 if i == 0 and index > 0 else 1))
                in_ch = stage_width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():  # zero-init the last BN of each residual branch (Goyal et al. 2017)
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.bn2.weight if isinstance(module, BasicBlock) else module.bn3.weight)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    @property
    def num_layers(self) -> int:
        """Weighted layers, the number in the name: the stem, the convs of every block, the classifier."""
        shortcuts = {id(m) for block in self.modules() if isinstance(block, (BasicBlock, Bottleneck))
                     for m in block.shortcut.modules()}
        return sum(1 for m in self.modules() if isinstance(m, nn.Conv2d) and id(m) not in shortcuts) + 1

    def flops_per_sample(self) -> float:
        """Training FLOPs per image: 3x the forward's 2·MACs of every conv and linear layer (backward ≈ 2x forward)."""
        size = self.hparams.image_size
        macs = 0
        for module, spatial in _output_sizes(self, size):
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                macs += module.in_channels // module.groups * module.out_channels * k * spatial
            elif isinstance(module, nn.Linear):
                macs += module.in_features * module.out_features
        return 3 * 2 * macs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay,
                                    nesterov=True)
        if self._trainer is None:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=h.lr, total_steps=total, pct_start=0.15)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _output_sizes(model: nn.Module, image_size: int) -> list[tuple[nn.Module, int]]:
    """(layer, output height x width) for every conv and linear, from the layers' strides alone (no forward)."""
    sizes: list[tuple[nn.Module, int]] = []

    def conv_out(size: int, conv: nn.Conv2d) -> int:
        return (size + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1

    size = image_size
    for layer in model.stem:
        if isinstance(layer, nn.Conv2d):
            size = conv_out(size, layer)
            sizes.append((layer, size * size))
        elif isinstance(layer, nn.MaxPool2d):
            size = (size + 2 * layer.padding - layer.kernel_size) // layer.stride + 1
    for block in (b for stage in model.stages for b in stage):
        block_in = size
        for conv in (m for name, m in block.named_children() if isinstance(m, nn.Conv2d)):
            size = conv_out(size, conv)
            sizes.append((conv, size * size))
        for conv in (m for m in block.shortcut.modules() if isinstance(m, nn.Conv2d)):
            sizes.append((conv, conv_out(block_in, conv) ** 2))
    sizes.append((model.fc, 1))
    return sizes
