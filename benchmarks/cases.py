"""The cases benchmarks/run.py measures (step, digits, ddp, tracking): each arm's one measurement as fresh processes."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from benchmarks.harness import (ORCH, PYTHON, REPO, Case, Context, Metric, RunFailed, Target, clean_env,
                                json_line, mlflow_store, orch_run_metrics, step_metrics, timed, wait_until_quiet,
                                warm_cluster, with_repo_on_path, workdir)

STEP_YAML = REPO / "benchmarks" / "step.yaml"
DIGITS_YAML = REPO / "jobs" / "digits.yaml"
LOSS_DECIMALS = 5
# The start-up phases orch records (launch.py, in run order), then what follows the first step.
PHASES = ("startup/imports_s", "startup/preflight_s", "startup/ray_start_s", "startup/launch_s",
          "startup/workers_start_s", "startup/setup_s", "startup/first_step_s", "train_s", "teardown_s", "run_open_s")


# ---------------------------------------------------------------- step: per-step overhead, 1 process / 1 worker

def _step_sizes(ctx: Context, workers: int) -> tuple[int, int, int]:
    steps, batch = ctx.args.steps, ctx.args.batch_size
    return steps, batch, steps * batch * workers  # one epoch of exactly `steps` steps per worker


def _orch_step(ctx: Context, folder, workers: int) -> dict[str, Any]:
    steps, batch, samples = _step_sizes(ctx, workers)
    record = folder / "steps.json"
    uri = mlflow_store(ctx, folder)
    command = [ORCH, "submit", str(STEP_YAML), f"scaling.num_workers={workers}", f"trainer.max_steps={steps}",
               f"data.init_args.samples={samples}", f"data.init_args.batch_size={batch}",
               f"model.init_args.record_path={record}"]
    _, wall = timed(command, with_repo_on_path(clean_env(MLFLOW_TRACKING_URI=uri)), folder, folder / "out.log",
                    ctx.args.timeout)
    return {"wall_s": wall, **step_metrics(json.loads(record.read_text()), ctx.args.warmup)}


def _plain_step(ctx: Context, folder, arm: str, torchrun: bool = False) -> dict[str, Any]:
    steps, batch, samples = _step_sizes(ctx, 2 if torchrun else 1)
    record = folder / "steps.json"
    script = [str(REPO / "benchmarks" / "step_plain.py"), arm, "--steps", str(steps), "--batch-size", str(batch),
              "--samples", str(samples), "--record", str(record)]
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [PYTHON]
    _, wall = timed(launcher + script, clean_env(), folder, folder / "out.log", ctx.args.timeout)
    return {"wall_s": wall, **step_metrics(json.loads(record.read_text()), ctx.args.warmup)}


def measure_step(arm: str, ctx: Context) -> dict[str, Any]:
    with workdir(ctx, f"step-{arm}") as folder:
        return _orch_step(ctx, folder, 1) if arm == "orch" else _plain_step(ctx, folder, arm)


def check_losses(rows: list[dict]) -> list[str]:
    """Every run's per-step losses against the first run of the first arm, to LOSS_DECIMALS decimals."""
    runs = [r for r in rows if r.get("losses")]
    if len(runs) < 2:
        return ["losses: nothing to compare"]
    reference = runs[0]
    tolerance = 0.5 * 10 ** -LOSS_DECIMALS
    lines, worst = [], 0.0
    for row in runs[1:]:
        a, b = reference["losses"], row["losses"]
        if len(a) != len(b):
            lines.append(f"losses: MISMATCH {row['arm']} run {row['repeat']}: {len(b)} steps vs {len(a)}")
            continue
        for step, (x, y) in enumerate(zip(a, b)):
            worst = max(worst, abs(x - y))
            if abs(x - y) > tolerance:
                lines.append(f"losses: MISMATCH {row['arm']} run {row['repeat']} vs {reference['arm']} run "
                             f"{reference['repeat']}: first at step {step}: {y:.{LOSS_DECIMALS + 2}f} vs "
                             f"{x:.{LOSS_DECIMALS + 2}f} (initial weights/first batch: {row.get('fingerprint')} vs "
                             f"{reference.get('fingerprint')})")
                break
    if not lines:
        arms = sorted({r["arm"] for r in runs})
        lines.append(f"losses: OK — {len(runs)} runs ({', '.join(arms)}) agree to {LOSS_DECIMALS} decimals at every "
                     f"one of {len(reference['losses'])} steps (largest difference {worst:.1e})")
    return lines


STEP = Case(
    name="step",
    title="per-step overhead, 1 process / 1 worker",
    arms={"torch": "plain PyTorch", "lightning": "plain Lightning", "orch": "orch, 1 worker"},
    baseline="lightning",
    also_vs=["torch"],
    metrics=[Metric("ms_per_step", "ms/step (mean)"), Metric("step_median_ms", "ms/step (median)"),
             Metric("wall_s", "process wall s", 1, ratio=False, readme=False)],
    measure=measure_step,
    checks=check_losses,
    targets=[Target("orch", "ms_per_step", 1.02, note="Ray claims within 2.5 %")],
    describe=lambda ctx: (f"StepMLP, batch {ctx.args.batch_size}, {ctx.args.steps} steps, first {ctx.args.warmup} "
                          f"dropped, torch on 1 thread; period between consecutive step starts"),
)


# ---------------------------------------------------------------- ddp: 2 workers, torchrun + DDP vs orch

def measure_ddp(arm: str, ctx: Context) -> dict[str, Any]:
    with workdir(ctx, f"ddp-{arm}") as folder:
        if arm == "orch":
            return _orch_step(ctx, folder, 2)
        return _plain_step(ctx, folder, "lightning" if arm == "lightning" else "torch", torchrun=True)


DDP = Case(
    name="ddp",
    title="DDP parity, 2 workers (gloo)",
    # Lightning DDP under torchrun shows how much of orch's gap to plain PyTorch is Lightning's own.
    arms={"torchrun": "torchrun + DDP", "lightning": "torchrun + Lightning DDP", "orch": "orch, 2 workers"},
    baseline="torchrun",
    metrics=[Metric("samples_per_s", "global samples/s", 0), Metric("ms_per_step", "ms/step (mean)"),
             Metric("wall_s", "process wall s", 1, ratio=False, readme=False)],
    measure=measure_ddp,
    checks=check_losses,
    targets=[Target("orch", "samples_per_s", 0.98, at_least=True, note="parity: within 2 %, as the step target")],
    describe=lambda ctx: (f"StepMLP, batch {ctx.args.batch_size} per worker, {ctx.args.steps} steps, first "
                          f"{ctx.args.warmup} dropped; rank 0's step periods"),
)


# ---------------------------------------------------------------- digits: start-up and end to end, the real job

def measure_digits(arm: str, ctx: Context) -> dict[str, Any]:
    epochs = ctx.args.epochs
    with workdir(ctx, f"digits-{arm}") as folder:
        log = folder / "out.log"
        if arm == "plain_ddp":
            env = clean_env(BENCH_EPOCHS=str(epochs))
            _, wall = timed([PYTHON, str(REPO / "benchmarks" / "plain_lightning_digits.py")], env, folder, log,
                            ctx.args.timeout)
            out = json_line(log)
            row = {"wall_s": wall, "first_step_s": out["first_step_s"], "val_acc": out["val_acc"],
                   **{f"startup/{k}": v for k, v in out["startup"].items()},
                   "train_s": out["fit_end_s"] - out["first_step_s"], "teardown_s": wall - out["fit_end_s"]}
            return row
        # Cold: Ray is started by the command; warm: it joins the cluster prepare() started, as a driver.
        uri = mlflow_store(ctx, folder)
        env = clean_env(MLFLOW_TRACKING_URI=uri)
        command = [ORCH, "submit", str(DIGITS_YAML), f"trainer.max_epochs={epochs}"]
        cwd = folder
        if arm == "orch_warm":
            cluster = ctx.state["cluster"]
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster["token_path"]}
            command += ["--cluster", cluster["gcs_address"], f"checkpoint.storage_path={folder / 'orch_runs'}"]
            # A user resubmits from their project folder; the folder is part of the workers' environment, so a
            # new folder per run would never find the warm processes the last run left.
            cwd = ctx.scratch / "warm-project"
            cwd.mkdir(exist_ok=True)
        _, wall = timed(command, env, cwd, log, ctx.args.timeout)
        run = orch_run_metrics(uri, "digits")
        if run["status"] != "FINISHED":
            raise RunFailed(f"the MLflow run ended {run['status']}")
        row = {"wall_s": wall, **{k: v for k, v in run.items() if k != "status"}}
        if arm == "orch_warm":
            row["refill_settle_s"] = wait_until_quiet()  # after the exit, not in wall_s
        if "total_s" in row and "first_step_s" in row:
            row["train_s"] = row["total_s"] - row["first_step_s"]
            row["teardown_s"] = wall - row["total_s"]
        return row


@contextlib.contextmanager
def digits_cold_prepare(ctx: Context):
    """Cold means Ray is not running: another cluster on the machine (a warm arm's, a user's) slowed the cold
    arm by 1-3 s a run here (12-06, 4 rounds each: first step 1.319x plain DDP alone, 1.464x beside one)."""
    import psutil

    raylets = []
    for process in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.Error):
            if process.info["name"] == "raylet":
                raylets.append(process.info["pid"])
    if raylets:
        print(f"  WARNING: Ray is already running on this machine (raylet pid {', '.join(map(str, raylets))}): the "
              f"cold arm will not be cold, and its ratios will not be comparable", flush=True)
    ctx.state["notes"] = {"other_raylets_at_start": raylets}
    yield


@contextlib.contextmanager
def digits_warm_prepare(ctx: Context):
    if "orch_warm" not in ctx.state.get("arms", ("orch_warm",)):  # no warm arm (--arms): no cluster to start
        yield
        return
    with warm_cluster(ctx) as cluster:
        ctx.state["cluster"] = cluster
        try:
            # A user's earlier job on this cluster: its end leaves warm processes (orchestrator/warm_pool.py), as
            # each measured warm round's end does for the next. Its own start-up is the cluster's first job's.
            first = measure_digits("orch_warm", ctx)
            print(f"  first job on the new cluster (no warm processes yet): first step {first['first_step_s']:.1f} s, "
                  f"wall {first['wall_s']:.1f} s", flush=True)
            ctx.state["notes"] = {"first_job_on_cluster": first}
            yield
        finally:
            ctx.state.pop("cluster", None)


def _digits_case(name: str, kind: str, arm: str, label: str, prepare, first_step_limit: float, setting: str) -> Case:
    """jobs/digits.yaml with 2 workers: plain Lightning DDP against one `orch` arm, first step and wall time."""
    return Case(
        name=name,
        title=f"start-up and end to end, jobs/digits.yaml, 2 workers, {kind}",
        arms={"plain_ddp": "plain Lightning DDP", arm: label},
        baseline="plain_ddp",
        metrics=[Metric("first_step_s", "first step s"), Metric("wall_s", "wall s"),
                 Metric("val_acc", "val/acc", 4, ratio=False)],
        measure=measure_digits,
        prepare=prepare,
        breakdown=list(PHASES),
        targets=[Target(arm, "first_step_s", first_step_limit), Target(arm, "wall_s", 1.2)],
        describe=lambda ctx: f"{ctx.args.epochs} epoch(s); times from process start; {setting}",
    )


# Cold and warm are two cases, each interleaved with its own plain DDP baseline: the warm arm needs a cluster up
# for the whole case, and a cold arm measured beside that cluster is not cold (digits_cold_prepare).
DIGITS = _digits_case("digits", "cold (no Ray running)", "orch_cold", "orch cold", digits_cold_prepare, 1.5,
                      "cold: Ray started by the command, no other Ray on the machine")
DIGITS_WARM = _digits_case(
    "digits_warm", "warm (a local cluster already up)", "orch_warm", "orch warm", digits_warm_prepare, 1.0,
    "warm: a local cluster already up (`orch cluster up --local`) for the whole case, its plain DDP runs included, "
    "joined as a driver, with the warm processes an earlier job on it left")


# ---------------------------------------------------------------- tracking: benchmarks/tracking_overhead.py

def tracking_rows(ctx: Context) -> list[dict]:
    """tracking_overhead.py interleaves its arms in one process (rotating order per round): run it once with
    --rounds = repeats and turn each round into one row per arm."""
    args = ctx.args
    with workdir(ctx, "tracking") as folder:
        log = folder / "out.log"
        command = [PYTHON, str(REPO / "benchmarks" / "tracking_overhead.py"), "--rounds", str(args.repeats),
                   "--steps", str(args.tracking_steps), "--workload", args.tracking_workload]
        print(f"  {' '.join(command[1:])}", flush=True)
        _, wall = timed(command, clean_env(), folder, log, args.timeout * max(1, args.repeats))
        report = json_line(log)
    result = report[args.tracking_workload]
    own = result.get("all/off wall", {}).get("median")
    return [{"arm": arm, "repeat": index + 1, "ms_per_step": figures["wall"] * 1e3,
             "cpu_ms_per_step": figures["cpu"] * 1e3, "background_cpu_ms_per_step": figures["background_cpu"] * 1e3,
             "own_all_off_median": own, "process_wall_s": wall}
            for index, round_ in enumerate(result["rounds"]) for arm, figures in round_.items()]


def tracking_checks(rows: list[dict]) -> list[str]:
    own = next((row["own_all_off_median"] for row in rows if row.get("own_all_off_median") is not None), None)
    return [] if own is None else [f"tracking_overhead.py's own figure: all/off wall = {own:.4f} (median of the "
                                   f"per-round ratios; rounds pair arms run back to back)"]


TRACKING = Case(
    name="tracking",
    title="tracking overhead, 1 process playing rank 0, a driver process logging (benchmarks/tracking_overhead.py)",
    arms={"off": "tracking off", "metrics": "metrics only", "all": "all (orch default)"},
    baseline="off",
    metrics=[Metric("ms_per_step", "ms/step (mean)", 3), Metric("cpu_ms_per_step", "CPU ms/step", 3),
             Metric("background_cpu_ms_per_step", "background CPU ms/step", 3, ratio=False, readme=False)],
    measure=lambda arm, ctx: {},  # not used: whole_case runs every arm
    whole_case=tracking_rows,
    checks=tracking_checks,
    targets=[Target("all", "ms_per_step", 1.01)],
    describe=lambda ctx: (f"{ctx.args.tracking_steps} steps per fit ({ctx.args.tracking_workload} workload), "
                          f"arms interleaved in one process, rotating order; metrics reach MLflow through the "
                          f"relay and a second process playing the driver, as in a job (since 12-06 04:50)"),
)

CASES = {case.name: case for case in (STEP, DIGITS, DIGITS_WARM, DDP, TRACKING)}
