"""What tracking costs per training step: the same training with tracking off and on, interleaved in one run.

Run: .venv/bin/python benchmarks/tracking_overhead.py [--rounds 6] [--steps 800] [--workload digits tiny-transformer]
                                                     [--path relay|direct]

Three arms, each round running all three in a rotating order:
  off      no logger, no tracking callbacks;
  metrics  only the per-step metrics: the MLflow logger writing what the module logs to a real sqlite store;
  all      what a worker runs with the default spec and hardware sampling at 1 s: the logger, the throughput
           monitor (FLOP count on the first step, step timing, live perf/ metrics, the end-of-run summary) and
           the node's hardware sampler.
One process plays rank 0, which carries all of it (other ranks carry only the step timing), and torch uses one
thread, as in a one-CPU Ray worker. Step time is the mean over the steps after a warm-up, so background work
(sends, samples) counts in full. For each arm it reports wall time, the CPU time of the whole process and of the
training thread alone (CPU time is less disturbed by other programs on a busy machine), and the CPU time of
tracking's background threads. The target is all/off <= 1.01 in wall time; the spread over rounds is the noise.

--path relay (the default) is what a job's workers do: the logger and the sampler hand their batches to a driver
process through Ray's key-value store (orchestrator/tracking/relay.py), and that process logs them into MLflow;
here a local Ray is started as `orch submit` starts it, and a second process plays the driver. Every arm runs
with both up. --path direct: the logger and the sampler talk to MLflow themselves, in this process (what workers
did before 12-06; an upper bound for the relay path).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests/assets/telemetry_project"))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

WARMUP_STEPS = 50
ARMS = ("off", "metrics", "all")
KEYS = ("wall", "cpu", "thread_cpu", "background_cpu")


class StepClock(pl.Callback):
    """The measuring stick, identical in every arm: per optimizer step after the warm-up."""

    def __init__(self) -> None:
        self.steps = 0
        self.start: tuple[float, ...] | None = None
        self.end: tuple[float, ...] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.steps in (WARMUP_STEPS, trainer.max_steps):  # the same few instructions per step in every arm
            # Tracking's threads end at teardown: read their clocks while they still run.
            now = (time.perf_counter(), time.process_time(), time.thread_time(), tracking_threads_cpu())
            self.start = self.start or now
            self.end = now

    def per_step(self) -> dict[str, float]:
        n = self.steps - WARMUP_STEPS
        figures = {key: (self.end[i] - self.start[i]) / n for i, key in enumerate(KEYS[:3])}
        figures["background_cpu"] = sum(cpu - self.start[3].get(ident, 0.0) for ident, cpu in self.end[3].items()) / n
        return figures


class EpochCommit(pl.Callback):
    """Rank 0's logger holds metrics until a checkpoint commits (tracking/gate.py); the jobs measured here
    checkpoint every epoch, so each epoch's end releases them, as a committed checkpoint would."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        gate = getattr(trainer.logger, "gate", None)
        if gate is not None:
            gate.commit(trainer.global_step)


def tracking_threads_cpu() -> dict[int, float]:
    """CPU seconds used so far by each of tracking's background threads (metric senders, the hardware sampler)."""
    used = {}
    for thread in threading.enumerate():
        if thread.name.startswith("orch-") and thread.ident is not None:
            try:
                used[thread.ident] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # the thread just ended, or not Linux
                pass
    return used


def workload(name: str):
    if name == "digits":
        from jobs.digits import DigitsCNN, DigitsDataModule

        return DigitsCNN(channels=32, hidden=128, lr=0.002), DigitsDataModule(batch_size=32), 5  # digits.yaml
    from tiny_lm import RandomTokens, TinyLM

    return TinyLM(), RandomTokens(n=2048, batch_size=16), 10  # the spec's default log_every_n_steps


# The driver's side of --path relay: a process joined to this one's Ray that logs what the relay brings, until its
# standard input closes (what launch.py does for a job, beside its progress display).
DRIVER = """
import sys
from orchestrator.cluster import connect
connect(sys.argv[1], verbose=False)  # first: it sets Ray's environment (token auth) before Ray is imported
from orchestrator.tracking.relay import MetricRelay
relay = MetricRelay(sys.argv[2], sys.argv[3]).start()
print("relay up", flush=True)
sys.stdin.read()
relay.stop(60)
"""


def start_relay(store: str):
    """A local Ray as `orch submit` starts one, a progress board and a driver process running the metric relay."""
    from orchestrator.cluster import connect

    connect(None, verbose=False)  # before anything imports Ray: it sets Ray's environment (token auth) first
    import ray

    from orchestrator.progress import ProgressBoard
    from orchestrator.tracking.relay import RelaySink, relay_prefix

    board = ProgressBoard(sweep=False)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address,
                               relay_prefix(board), store], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO)  # inherits the Ray environment connect() set
    if driver.stdout.readline().strip() != "relay up":
        raise RuntimeError("the driver process running the metric relay did not start")
    return RelaySink(board), driver


def fit(name: str, steps: int, arm: str, store: str, metric_flush_s: float | None = None,
        relay=None) -> dict[str, float]:
    from mlflow import MlflowClient

    from orchestrator.spec import TrackingSpec
    from orchestrator.tracking.logger import MLflowRunLogger
    from orchestrator.tracking.throughput import telemetry_callbacks

    pl.seed_everything(0, verbose=False)
    model, data, log_every = workload(name)
    clock = StepClock()
    callbacks: list[pl.Callback] = [clock]
    logger = False
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(name) or client.get_experiment(client.create_experiment(name))
    run = client.create_run(experiment.experiment_id).info
    run_id = run.run_id
    if relay is not None:  # as the driver does once the run is open (launch.py): the sampler counts from its start
        relay.board.update({"run_start_ms": run.start_time, "run_id": run_id})
    if arm != "off":
        logger = MLflowRunLogger(store, run_id, relay=relay)
        callbacks.append(EpochCommit())
        if metric_flush_s is not None:  # what-if: the logger's sender flushing less often than it ships with
            from orchestrator.tracking.sender import MetricSender

            logger._sender = MetricSender(store, run_id, interval_s=metric_flush_s, relay=relay)
    if arm == "all":
        callbacks += telemetry_callbacks(TrackingSpec(system_metrics_interval=1.0), store, run_id, relay)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0,
                         log_every_n_steps=log_every, logger=logger, callbacks=callbacks, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    client.set_terminated(run_id)
    return clock.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--workload", nargs="+", default=["digits", "tiny-transformer"],
                        choices=["digits", "tiny-transformer"])
    parser.add_argument("--metric-flush-s", type=float, default=None,
                        help="what-if: the per-step metrics' sender flushes every N s (default: as shipped)")
    parser.add_argument("--path", choices=["relay", "direct"], default="relay",
                        help="how metrics reach MLflow: through a driver process, as in a job (default), or from "
                             "this process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    report = {}
    with tempfile.TemporaryDirectory() as folder:
        store = f"sqlite:///{folder}/mlflow.db"
        relay, driver = start_relay(store) if args.path == "relay" else (None, None)
        try:
            for name in args.workload:
                report[name] = measure(name, args, store, relay)
        finally:
            if driver is not None:
                driver.communicate(timeout=120)  # closes its stdin: the relay drains and stops
    report["path"] = args.path
    print(json.dumps(report))


def measure(name: str, args: argparse.Namespace, store: str, relay) -> dict:
    fit(name, WARMUP_STEPS + 20, "all", store, relay=relay)  # first-use costs (imports, store) in no arm
    rounds = []
    for index in range(args.rounds):
        order = ARMS[index % 3:] + ARMS[:index % 3]
        rounds.append({arm: fit(name, args.steps, arm, store, args.metric_flush_s, relay) for arm in order})
        print(f"{name:16s} round {index + 1}: " + "  ".join(
            f"{arm} {rounds[-1][arm]['wall'] * 1e3:.3f} ms" for arm in ARMS)
            + f"  all/off {rounds[-1]['all']['wall'] / rounds[-1]['off']['wall']:.4f}", flush=True)
    return summarize(name, rounds)


def summarize(name: str, rounds: list[dict[str, dict[str, float]]]) -> dict:
    """Per arm and measure, the median over rounds of the per-round ratio to the off arm of the same round."""
    out: dict = {"rounds": rounds}
    base = {key: statistics.median(r["off"][key] for r in rounds) for key in KEYS[:3]}
    print(f"{name}: off arm {base['wall'] * 1e3:.3f} ms/step wall, {base['cpu'] * 1e3:.3f} ms/step CPU (medians)")
    for arm in ARMS[1:]:
        line = []
        for key in KEYS[:3]:
            ratios = [r[arm][key] / r["off"][key] for r in rounds]
            out[f"{arm}/off {key}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
            line.append(f"{key} {statistics.median(ratios):.4f} ({min(ratios):.4f}..{max(ratios):.4f})")
        # Per step of the off arm's CPU time (its median), which a busy machine disturbs least.
        background = statistics.median(r[arm]["background_cpu"] for r in rounds) / base["cpu"]
        out[f"{arm} background_cpu_fraction"] = background
        line.append(f"background threads' CPU {background:.2%} of a step")
        print(f"  {arm:7s}/off  " + "  ".join(line), flush=True)
    return out


if __name__ == "__main__":
    main()
