"""Helper of memory_plan.py: train a recipe a few steps with plain Lightning and print rank 0's peak tensor bytes.

CPU: torch's profiler records every allocation with the allocator's running total; the peak is its maximum,
from before the model is built (the dataset is loaded first and not counted, as on a GPU it stays on the host).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def walk(nodes):
    for node in nodes:
        yield node
        yield from walk(node.children)


def main() -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from orchestrator.classpath import instantiate
    from orchestrator.distributed import (
        fsdp_any_device, prepare_model, scale_callbacks, trainer_gradient_clip, wrap_and_checkpoint_blocks,
    )
    from orchestrator.loader import load_spec
    from orchestrator.strategies import strategy_kwargs

    spec = load_spec(REPO / os.environ["BENCH_JOB"], json.loads(os.environ["BENCH_OVERRIDES"]))
    gpu = bool(os.environ.get("BENCH_GPU"))
    steps = int(os.environ["BENCH_STEPS"])
    data = instantiate(spec.data.model_dump())
    data.setup("fit")
    pl.seed_everything(0, verbose=False)
    profiler = None if gpu else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    if profiler:
        profiler.__enter__()
    model = instantiate(spec.model.model_dump())
    wrap, checkpoint = wrap_and_checkpoint_blocks(spec, model)
    kwargs = strategy_kwargs(spec.scaling.strategy, spec.scaling.options, wrap,
                             checkpoint if spec.scaling.strategy == "fsdp" else None)
    base = DDPStrategy if spec.scaling.strategy == "ddp" else fsdp_any_device(FSDPStrategy)
    prepare_model(spec, model)
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=spec.scaling.num_workers,
                         strategy=base(process_group_backend="nccl" if gpu else "gloo", **kwargs),
                         precision=spec.trainer.precision, max_steps=steps, limit_val_batches=0,
                         accumulate_grad_batches=spec.trainer.accumulate_grad_batches,
                         gradient_clip_val=trainer_gradient_clip(spec), callbacks=scale_callbacks(spec), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    if gpu:
        peak = torch.cuda.max_memory_allocated()
    else:
        profiler.__exit__(None, None, None)
        tree = profiler.profiler.kineto_results.experimental_event_tree()
        peak = max((n.extra_fields.total_allocated for n in walk(tree) if n.tag == _EventType.Allocation), default=0)
    if trainer.global_rank == 0:
        print(f"PEAK {peak}", flush=True)


if __name__ == "__main__":
    main()
