"""End to end on the digits job: `orch submit` (cold: Ray started by the command) vs plain Lightning DDP.

Run: .venv/bin/python benchmarks/digits_end_to_end.py [--repeats N]
Each arm runs in a fresh subprocess, arms interleaved; prints medians and the ratio orch / plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).parent / "orch")


def run_orch(epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        started = time.time()
        subprocess.run([ORCH, "submit", str(REPO / "jobs/digits.yaml"), f"trainer.max_epochs={epochs}"],
                       cwd=folder, env=env, check=True, capture_output=True, text=True)
        wall = time.time() - started
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        run = client.search_runs([client.get_experiment_by_name("digits").experiment_id])[0]
        return {"arm": "orch_submit", "wall_s": wall, "first_step_s": run.data.metrics.get("orch/first_step_s"),
                "ray_ready_s": run.data.metrics.get("orch/ray_ready_s"), "val_acc": run.data.metrics["val/acc"]}


def run_plain(epochs: int) -> dict:
    env = {**os.environ, "BENCH_EPOCHS": str(epochs), "BENCH_STARTED_AT": str(time.time())}
    started = time.time()
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/plain_lightning_digits.py")], env=env,
                         check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    line = next(line for line in out.stdout.splitlines() if line.startswith("{"))
    return {**json.loads(line), "wall_s": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"plain_lightning_ddp": [], "orch_submit": []}
    for _ in range(args.repeats):
        results["plain_lightning_ddp"].append(run_plain(args.epochs))
        results["orch_submit"].append(run_orch(args.epochs))
    medians = {}
    for arm, rows in results.items():
        medians[arm] = {key: statistics.median(r[key] for r in rows if r.get(key) is not None)
                        for key in ("wall_s", "first_step_s", "val_acc")}
        walls = [r["wall_s"] for r in rows]
        print(f"{arm:22s} wall {medians[arm]['wall_s']:6.1f} s (min {min(walls):.1f}, max {max(walls):.1f})  "
              f"first step {medians[arm]['first_step_s']:5.1f} s  val/acc {medians[arm]['val_acc']:.4f}")
    ratio = medians["orch_submit"]["wall_s"] / medians["plain_lightning_ddp"]["wall_s"]
    first = medians["orch_submit"]["first_step_s"] / medians["plain_lightning_ddp"]["first_step_s"]
    print(f"orch / plain: wall {ratio:.2f}x, first step {first:.2f}x")
    print(json.dumps({"results": results, "medians": medians}))


if __name__ == "__main__":
    main()
