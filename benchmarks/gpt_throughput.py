"""Tokens/s and MFU of the GPT recipe: the Lightning recipe as the worker runs it vs a plain PyTorch loop.

Run: .venv/bin/python benchmarks/gpt_throughput.py [--spec jobs/gpt-125m.yaml] [--steps 5] [--batch-size 1]
     [--precision 32-true|bf16-mixed] [--gpu] [overrides...]
Both arms train the same model (same init, same batches) in this process, one after the other, timing steps
after warm-up. MFU = model FLOPs/s (the module's flops_per_sample: 6N + 12·L·d·T per token) over the device's
peak: on CPU the peak is *measured* here (a large matmul in the same dtype), which flatters MFU compared
with a vendor table; on a GPU pass --peak-tflops (H100 SXM bf16 dense: 989).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measured_peak_flops(device, dtype, size: int = 2048, repeats: int = 5) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def batches(spec, count: int, batch_size: int):
    import torch

    from orchestrator.classpath import instantiate

    data = instantiate({**spec.data.model_dump(), "init_args": {**spec.data.init_args, "batch_size": batch_size}})
    data.setup("fit")
    loader = iter(data.train_dataloader())
    out = [next(loader) for _ in range(count)]
    torch.manual_seed(0)
    return out


def plain_pytorch(spec, data, warmup: int, device, precision: str) -> float:
    """The model's own nn layers and the recipe's AdamW, no Lightning: the floor of what the framework costs."""
    import torch
    from torch.nn import functional as F

    from orchestrator.classpath import instantiate

    torch.manual_seed(0)
    model = instantiate(spec.model.model_dump()).to(device)
    optimizer = model.configure_optimizers()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    times = []
    for index, (x, y) in enumerate(data):
        x, y = x.to(device), y.to(device)
        _sync(device)
        started = time.perf_counter()
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))
        loss.backward()
        if spec.trainer.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


def lightning_recipe(spec, data, warmup: int, device, precision: str) -> float:
    """The recipe through Lightning's Trainer with the worker's model preparation (checkpointing, compile)."""
    import lightning.pytorch as pl
    import torch

    from orchestrator.classpath import instantiate
    from orchestrator.distributed import prepare_model

    times: list[float] = []

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            if batch_idx >= warmup:
                times.append(time.perf_counter() - self.started)

    torch.manual_seed(0)
    model = instantiate(spec.model.model_dump())
    prepare_model(spec, model)
    trainer = pl.Trainer(accelerator=device.type if device.type == "cuda" else "cpu", devices=1,
                         precision=precision, max_steps=len(data), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer()],
                         gradient_clip_val=spec.trainer.gradient_clip_val, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=_Iterable(data))  # a bare list would mean several dataloaders
    return sum(times) / len(times)


class _Iterable:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def main() -> None:
    import torch

    from orchestrator.classpath import instantiate
    from orchestrator.loader import load_spec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="jobs/gpt-125m.yaml")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak instead of measuring")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    device = torch.device("cuda" if args.gpu else "cpu")
    spec = load_spec(REPO / args.spec, [*args.overrides, f"trainer.precision={args.precision}",
                                        "trainer.compile=false" if not args.gpu else "trainer.compile=true"])
    warmup = 2
    data = batches(spec, warmup + args.steps, args.batch_size)
    with torch.device("meta"):
        meta = instantiate(spec.model.model_dump())
    flops_per_sample, tokens_per_sample = meta.flops_per_sample(), meta.tokens_per_sample
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak_flops(device, dtype)
    label = "given" if args.peak_tflops else f"measured {dtype} matmul on this {device.type}"
    h = spec.model.init_args
    print(f"GPT {h.get('n_layer')} layers x {h.get('n_embd')} wide, context {h.get('block_size')}, "
          f"{sum(p.numel() for p in meta.parameters()) / 1e6:.1f} M parameters; micro-batch {args.batch_size}, "
          f"{args.precision}, {torch.get_num_threads()} threads; peak {peak / 1e12:.3f} TFLOP/s ({label})")
    results = {}
    for arm, run in (("plain PyTorch", plain_pytorch), ("Lightning recipe", lightning_recipe)):
        seconds = run(spec, data, warmup, device, args.precision)
        samples = args.batch_size / seconds
        results[arm] = samples * tokens_per_sample
        mfu = samples * flops_per_sample / peak
        print(f"{arm:18} {seconds * 1000:9.1f} ms/step  {samples * tokens_per_sample:10.1f} tokens/s  MFU {mfu:6.1%}",
              flush=True)
    print(f"Lightning recipe / plain PyTorch tokens/s: {results['Lightning recipe'] / results['plain PyTorch']:.3f}")


if __name__ == "__main__":
    main()
