"""Predicted vs measured peak memory per worker for the shipped recipes (target: within ±20 %).

Run: .venv/bin/python benchmarks/memory_plan.py [--steps N] [--only NAME]
Each case trains a few steps with plain Lightning (CPU, gloo; 2 processes for the distributed cases) using
the same strategy options the worker builds, and measures rank 0's peak of live tensor bytes with torch's
profiler (CPU allocations, from before the model is built). The prediction is `orch plan`'s, from the
meta-device model. On a GPU run the same cases with --gpu: the measure is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (spec file, overrides). Small shapes that train in seconds on a CPU; the same code paths as the large ones.
CASES = {
    "digits-cnn ddp": ("jobs/digits.yaml", ["scaling.num_workers=1"]),
    "resnet18 ddp": ("jobs/resnet.yaml", ["scaling.num_workers=1"]),
    "resnet50 ddp": ("jobs/resnet.yaml", ["scaling.num_workers=1", "model.init_args.depth=50"]),
    "gpt-tiny ddp": ("jobs/gpt.yaml", ["scaling.num_workers=1"]),
    "gpt-tiny ddp bf16": ("jobs/gpt.yaml", ["scaling.num_workers=1", "trainer.precision=bf16-mixed"]),
    "gpt-tiny ddp ckpt": ("jobs/gpt.yaml", ["scaling.num_workers=1", "trainer.activation_checkpointing=true"]),
    "gpt-wide ddp": ("jobs/gpt.yaml", ["scaling.num_workers=1", "model.init_args.n_embd=384",
                                       "model.init_args.n_head=6", "model.init_args.n_layer=6"]),
    "gpt-wide ddp x2": ("jobs/gpt.yaml", ["model.init_args.n_embd=384", "model.init_args.n_head=6",
                                          "model.init_args.n_layer=6"]),
    "gpt-wide fsdp x2": ("jobs/gpt.yaml", ["model.init_args.n_embd=384", "model.init_args.n_head=6",
                                           "model.init_args.n_layer=6", "scaling.strategy=fsdp"]),
    "gpt-wide fsdp x2 ckpt": ("jobs/gpt.yaml", ["model.init_args.n_embd=384", "model.init_args.n_head=6",
                                                "model.init_args.n_layer=6", "scaling.strategy=fsdp",
                                                "trainer.activation_checkpointing=true"]),
}


def predicted(job: str, overrides: list[str]) -> tuple[int, dict]:
    from orchestrator.loader import load_spec
    from orchestrator.plan import build_plan

    spec = load_spec(REPO / job, overrides)
    plan = build_plan(spec, job, check_fit=False)
    m = plan.memory
    parts = {"params": m.parameters_bytes, "grads": m.gradients_bytes, "optimizer": m.optimizer_bytes,
             "activations": m.activations_bytes, "other": m.temporaries_bytes}
    return m.peak_bytes, parts


def measured(job: str, overrides: list[str], steps: int, gpu: bool) -> int:
    """Train in fresh processes (1 or 2 ranks, like the Ray workers), return rank 0's peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_JOB": job, "BENCH_OVERRIDES": json.dumps(overrides),
           "BENCH_STEPS": str(steps), "BENCH_GPU": "1" if gpu else ""}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_measure_memory.py"))], env=env,
                         capture_output=True, text=True, cwd=REPO, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("PEAK ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return int(lines[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA, measure max_memory_allocated")
    args = parser.parse_args()
    mib = 1024 ** 2
    print(f"{'case':24} {'predicted':>11} {'measured':>11} {'error':>8}   breakdown of the prediction (MiB)")
    worst = 0.0
    for name, (job, overrides) in CASES.items():
        if args.only and args.only not in name:
            continue
        overrides = overrides + (["scaling.use_gpu=true"] if args.gpu else [])
        guess, parts = predicted(job, overrides)
        real = measured(job, overrides, args.steps, args.gpu)
        error = (guess - real) / real
        worst = max(worst, abs(error))
        detail = ", ".join(f"{k} {v / mib:.1f}" for k, v in parts.items() if v is not None)
        print(f"{name:24} {guess / mib:9.1f}Mi {real / mib:9.1f}Mi {error:+8.1%}   {detail}", flush=True)
    print(f"worst error {worst:.1%} (target ±20 %)")


if __name__ == "__main__":
    main()
