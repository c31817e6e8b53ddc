"""The step benchmark's baselines without orch: a plain PyTorch loop (alone, or DDP under torchrun), plain Lightning.

Run by benchmarks/run.py, one fresh process per measurement:
  python benchmarks/step_plain.py torch     --steps N --record OUT.json     # one process, plain PyTorch
  python benchmarks/step_plain.py lightning --steps N --record OUT.json     # one process, plain Lightning
  python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/step_plain.py torch ...  # DDP, gloo
All arms build benchmarks.step_model.StepMLP / StepData from the same seed and record steps with its StepRecorder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.step_model`, as orch's workers import it

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.step_model import StepData, StepMLP, make_optimizer  # noqa: E402


def run_torch(args) -> None:
    """The loop a PyTorch user writes; under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP with torch's
    defaults; each rank reads the same shard, in the same order, as under Lightning (StepData.loader)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = StepMLP(record_path=args.record)
    data = StepData(samples=args.samples or args.steps * args.batch_size * world, batch_size=args.batch_size)
    data.setup("fit")
    model.setup("fit")
    loader = data.loader(world, rank)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model)
    recorder = model.recorder
    model.train()
    for step, (x, y) in enumerate(loader):
        if step >= args.steps:
            break
        recorder.step_started(model, (x, y))
        loss = torch.nn.functional.cross_entropy(net(x), y)  # through the DDP wrapper: its hooks reduce gradients
        recorder.step_loss(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recorder.write(rank, world, args.batch_size, arm="torch")
    if world > 1:
        dist.destroy_process_group()


def run_lightning(args) -> None:
    """Plain Lightning, none of the extras (no logger, checkpoints, progress bar or summary): one process, or
    DDP over the processes torchrun started (Lightning reads torchrun's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = StepMLP(record_path=args.record)
    data = StepData(samples=args.samples or args.steps * args.batch_size, batch_size=args.batch_size)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         max_epochs=1, max_steps=args.steps,
                         log_every_n_steps=args.log_every, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arm", choices=["torch", "lightning"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--samples", type=int, default=0, help="default: steps x batch size x processes")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--log-every", type=int, default=10, help="Lightning's log_every_n_steps (as step.yaml)")
    parser.add_argument("--record", required=True, help="rank 0 writes the step record (JSON) here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    (run_torch if args.arm == "torch" else run_lightning)(args)


if __name__ == "__main__":
    main()
