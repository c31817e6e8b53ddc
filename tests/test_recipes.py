"""The ResNet and GPT recipes in-process: shapes match the literature, data modules read real data, they learn."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from jobs.gpt import GPT
from jobs.images import ImageDataModule
from jobs.resnet import ResNet
from jobs.text import TextDataModule, default_corpus

# Parameter counts of the ImageNet models (torchvision's, from the paper's table 1) and forward GMACs at 224 px.
RESNETS = {18: (11_689_512, 1.81), 34: (21_797_672, 3.66), 50: (25_557_032, 4.09), 101: (44_549_160, 7.80),
           152: (60_192_808, 11.51)}


@pytest.mark.parametrize("depth", sorted(RESNETS))
def test_resnet_depths_match_the_paper(depth):
    with torch.device("meta"):
        model = ResNet(depth=depth, num_classes=1000, in_channels=3, small_inputs=False, image_size=224)
    params, gmacs = RESNETS[depth]
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.num_layers == depth
    assert model.flops_per_sample() / 6 / 1e9 == pytest.approx(gmacs, abs=0.01)


def test_resnet_rejects_unknown_depths():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=20)


def test_gpt_shapes_and_flops():
    with torch.device("meta"):
        model = GPT(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    n = sum(p.numel() for p in model.parameters())
    assert n == 124_439_808  # GPT-2 small, tied embeddings
    assert model.tokens_per_sample == 1024
    non_embedding = n - 1024 * 768
    assert model.flops_per_sample() == 1024 * (6 * non_embedding + 12 * 12 * 768 * 1024)


def test_gpt_learns_python_from_the_standard_library():
    pl.seed_everything(0, verbose=False)
    data = TextDataModule(block_size=32, batch_size=16, max_bytes=300_000)
    model = GPT(n_layer=2, n_head=2, n_embd=64, block_size=32, lr=3e-3, warmup_steps=5)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record()])
    trainer.fit(model, datamodule=data)
    assert default_corpus().is_dir()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.5  # ~ln(256) before learning anything
    assert last < first - 1.5, (first, last)


def test_gpt_says_when_the_context_is_too_long():
    model = GPT(n_layer=1, n_head=1, n_embd=8, block_size=16)
    with pytest.raises(ValueError, match="data.init_args.block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_text_data_reads_a_given_file(tmp_path):
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    data = TextDataModule(path=str(corpus), block_size=16, batch_size=4, val_fraction=0.1)
    data.setup("fit")
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the inputs shifted by one
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        TextDataModule(path=str(tmp_path / "missing")).setup("fit")


def test_image_folder_and_resnet_step(tmp_path):
    from PIL import Image

    for label, colour in (("cats", 30), ("dogs", 220)):
        (tmp_path / label).mkdir()
        for index in range(6):
            Image.new("RGB", (20, 14), (colour, index * 10, 0)).save(tmp_path / label / f"{index}.png")
    data = ImageDataModule(path=str(tmp_path), image_size=16, channels=3, batch_size=4, val_fraction=0.25)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and set(labels.tolist()) <= {0, 1}
    model = ResNet(depth=18, width=8, num_classes=2, in_channels=3, image_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_digits_default_for_resnet():
    data = ImageDataModule(image_size=16, channels=1, batch_size=8)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (8, 1, 16, 16) and labels.max() < 10
    assert len(data.train_set) + len(data.val_set) == 1797
