"""Plumbing for benchmarks/run.py: cases, timed subprocesses, orch runs and their MLflow records, a warm cluster.

Plain Python (subprocess, json, shutil) on purpose: a benchmark harness should not change what it measures, and
no benchmarking library runs whole programs as fresh processes with arms interleaved (pytest-benchmark and
asv time functions inside one process).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ORCH = str(Path(sys.executable).parent / "orch")  # the venv's console script, as a user runs it
# Set in a developer's shell, any of these would send a "cold" run to some cluster or store instead.
SHELL_ONLY = ("RAY_ADDRESS", "ORCH_CLUSTER", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
              "ORCH_HOME", "ORCH_STORAGE_PATH", "BENCH_STARTED_AT", "BENCH_EPOCHS")


@dataclass
class Metric:
    key: str
    label: str
    digits: int = 2
    ratio: bool = True  # print its ratio to the baseline arm (and to any other reference arm)
    readme: bool = True  # in the --markdown table


@dataclass
class Target:
    """An issue 7 target: median(arm) / median(reference) of a metric within a limit."""
    arm: str
    key: str
    limit: float
    reference: str | None = None  # default: the case's baseline arm
    at_least: bool = False  # for rates (samples/s): the ratio must be >= limit
    note: str = ""


@dataclass
class Case:
    name: str
    title: str
    arms: dict[str, str]  # arm key -> label, in the order they run
    baseline: str
    metrics: list[Metric]
    measure: Callable[[str, "Context"], dict[str, Any]]  # one measurement, in fresh subprocess(es)
    also_vs: list[str] = field(default_factory=list)  # more reference arms for ratios
    targets: list[Target] = field(default_factory=list)
    describe: Callable[["Context"], str] = lambda ctx: ""
    prepare: Callable[["Context"], contextlib.AbstractContextManager] | None = None  # once per case (warm cluster)
    checks: Callable[[list[dict]], list[str]] | None = None  # e.g. the losses agree
    breakdown: list[str] = field(default_factory=list)  # row keys shown as a phase table (medians)
    whole_case: Callable[["Context"], list[dict]] | None = None  # a case that interleaves arms itself


@dataclass
class Context:
    args: Any
    scratch: Path  # this harness run's temporary folder
    state: dict[str, Any] = field(default_factory=dict)  # what prepare() set up (cluster address, store template)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHELL_ONLY}
    env.update({"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}, **extra)
    return env


def with_repo_on_path(env: dict[str, str]) -> dict[str, str]:
    """benchmarks.step_model is imported by class path: the driver and (via cluster.worker_env) the workers."""
    parts = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}


class RunFailed(RuntimeError):
    pass


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path, timeout_s: float) -> tuple[float, float]:
    """Run to exit; returns (started_at, wall seconds). Output goes to a file, not a pipe: Ray's daemons may
    inherit a pipe and hold it open after the command exits, which would stretch the measured wall time."""
    with open(log, "wb") as out:
        started_at = time.time()
        process = subprocess.Popen(command, env=env | {"BENCH_STARTED_AT": repr(started_at)}, cwd=cwd,
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            code = process.wait(timeout=timeout_s)
        except BaseException:  # timeout or Ctrl-C: orch closes its run on SIGINT, as for a user's Ctrl-C
            stop(process)
            raise
        wall = time.time() - started_at
    if code != 0:
        raise RunFailed(f"exit status {code}: {' '.join(command[:4])} …\n{tail(log)}")
    return started_at, wall


def wait_until_quiet(max_s: float = 120, busy_percent: float = 15, quiet_samples: int = 3) -> float:
    """Seconds until the machine's CPU use stays under `busy_percent` for `quiet_samples` half-second samples.

    A job on a warm-pool cluster ends by asking Ray for fresh processes that import PyTorch and Lightning in the
    background (orchestrator/warm_pool.py): tens of CPU-seconds that would land on the next arm's run and make it
    look slow. The time is the cost a user pays between jobs, and is reported as such."""
    import psutil

    started, quiet = time.time(), 0
    psutil.cpu_percent(interval=None)
    while quiet < quiet_samples and time.time() - started < max_s:
        quiet = quiet + 1 if psutil.cpu_percent(interval=0.5) < busy_percent else 0
    return time.time() - started


def stop(process: subprocess.Popen, grace_s: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def json_line(log: Path) -> dict[str, Any]:
    """The last line of a program's output that is a JSON object."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RunFailed(f"no JSON line in the output:\n{tail(log)}")


@contextlib.contextmanager
def workdir(ctx: Context, name: str) -> Iterator[Path]:
    """A fresh working folder per measurement (its MLflow store, checkpoints, log), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=ctx.scratch))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def mlflow_store(ctx: Context, folder: Path) -> str:
    """A new, empty sqlite store in `folder`, copied from a template made once: MLflow's one-time table creation
    (~3 s, paid once by a user's first run in a folder) would otherwise count in every run's start-up."""
    template = ctx.scratch / "template-mlflow.db"
    if not template.exists():
        import logging

        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its table-creation notes would interleave our output
        MlflowClient(f"sqlite:///{template}").search_experiments()  # creates the tables
    shutil.copy(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def orch_run_metrics(tracking_uri: str, experiment: str) -> dict[str, Any]:
    """The latest run's status, metrics and the start-up phases (`orch/startup/*`, in order of the run path)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) \
        if found else []
    if not runs:
        raise RunFailed(f"no MLflow run in experiment {experiment!r} at {tracking_uri}")
    run = runs[0]
    metrics = run.data.metrics
    row: dict[str, Any] = {"status": run.info.status}
    for key in ("orch/first_step_s", "orch/total_s", "orch/ray_ready_s", "orch/run_open_s", "orch/warm_workers"):
        if key in metrics:
            row[key.removeprefix("orch/")] = metrics[key]
    for key, value in metrics.items():
        if key.startswith("orch/startup/"):
            row["startup/" + key.removeprefix("orch/startup/")] = value
    if "val/acc" in metrics:
        row["val_acc"] = metrics["val/acc"]
    return row


@contextlib.contextmanager
def warm_cluster(ctx: Context) -> Iterator[dict[str, Any]]:
    """`orch cluster up --local` under a private ORCH_HOME, torn down with `orch cluster down` on every exit path;
    whatever `down` leaves of what `up` started is killed by pid (as tests/cluster_helpers.py does)."""
    import psutil

    home = ctx.scratch / "orch-home"
    env = clean_env(ORCH_HOME=str(home))
    log = ctx.scratch / "cluster-up.log"
    print("  starting a local cluster for the warm arm (orch cluster up --local) …", flush=True)
    state = None
    try:
        timed([ORCH, "cluster", "up", "--local"], env, ctx.scratch, log, timeout_s=300)
        state = json.loads((home / "local" / "cluster.json").read_text())
        yield state
    finally:
        members = []
        if state is None and (home / "local" / "cluster.json").exists():
            state = json.loads((home / "local" / "cluster.json").read_text())
        if state is not None:
            for name in ("ray", "mlflow"):
                with contextlib.suppress(psutil.Error):
                    root = psutil.Process(state["processes"][name]["pid"])
                    members += [root, *root.children(recursive=True)]
        if (home / "local" / "cluster.json").exists():
            print("  stopping the local cluster (orch cluster down) …", flush=True)
            with contextlib.suppress(Exception):
                timed([ORCH, "cluster", "down", "--force"], env, ctx.scratch, ctx.scratch / "cluster-down.log",
                      timeout_s=240)
        _, alive = psutil.wait_procs(members, timeout=30)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        if alive:
            print(f"  killed {len(alive)} process(es) `orch cluster down` left running", flush=True)
        if state is not None:
            shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)


def step_metrics(record: dict[str, Any], warmup: int) -> dict[str, Any]:
    """From a StepRecorder file: the periods between consecutive step starts after `warmup` steps.

    ms_per_step is their mean, so work a framework does every N steps (logging, metric flushes) counts in full;
    step_median_ms shows the typical step without it."""
    import statistics

    starts = record["starts"]
    periods = [b - a for a, b in zip(starts, starts[1:])][warmup:]
    if len(periods) < 5:
        raise RunFailed(f"only {len(periods)} steps after a warm-up of {warmup}: raise --steps")
    mean = sum(periods) / len(periods)
    return {"ms_per_step": mean * 1e3, "step_median_ms": statistics.median(periods) * 1e3,
            "samples_per_s": record["world_size"] * record["batch_size"] / mean,
            "steps_timed": len(periods), "torch_threads": record.get("threads"), "losses": record["losses"],
            "fingerprint": record.get("fingerprint")}
