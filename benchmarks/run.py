"""Issue 7's benchmarks in one command: every measurement a fresh subprocess, arms interleaved, medians and ratios.

Run (from the repository root, on a quiet machine):
  .venv/bin/python benchmarks/run.py [--cases step,digits,digits_warm,ddp,tracking] [--repeats 5] [--arms ARM,ARM]
                                     [--out benchmarks/results/latest.json] [--markdown] [--quick]
Cases (benchmarks/cases.py):
  step      ms per training step of the same model and per-worker batch: plain PyTorch loop, plain Lightning,
            `orch submit` with 1 worker; the per-step losses must agree to 5 decimals.
  digits    jobs/digits.yaml with 2 workers: plain Lightning DDP (2 processes) and `orch submit` cold (Ray started by
            the command, no other Ray on the machine): time from process start to the first optimizer step with
            its phases, wall time, val/acc.
  digits_warm  the same, plain Lightning DDP and `orch submit` warm (a local cluster `orch cluster up --local`
            started once for the case, up beside both arms).
  ddp       2 workers: torchrun + DistributedDataParallel, torchrun + Lightning DDP, `orch submit` of the step
            model: global samples/s.
  tracking  benchmarks/tracking_overhead.py (its arms interleave inside one process): tracking off / metrics / all.
Each round runs every arm once (A B C A B C …, --repeats rounds). The first --warmup steps of a run are dropped.
A machine line (CPU, cores, memory, versions, date, load) comes first; results go to --out (JSON, merged per case
with what an earlier run left there) and a CSV beside it; --markdown prints a README-ready table.

Plain Python on purpose (argparse, subprocess, statistics, json, csv): the harness must not change what it
measures, and benchmarking libraries time functions inside one process rather than whole programs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.*` as a namespace package, from any working folder

from benchmarks.cases import CASES  # noqa: E402
from benchmarks.harness import Context, RunFailed  # noqa: E402
from benchmarks.summary import markdown, summarize, target_text, text_block, write_files  # noqa: E402

DEFAULTS = {"steps": 400, "warmup": 50, "epochs": 10, "tracking_steps": 800}
QUICK = {"steps": 60, "warmup": 10, "epochs": 1, "tracking_steps": 80}  # proves a case runs; numbers mean little


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    memory_gib = None
    with contextlib.suppress(OSError, StopIteration, ValueError):
        kib = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory_gib = int(kib.split()[1]) / 2**20
    versions = {}
    for package in ("torch", "lightning", "ray", "mlflow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory_gib, "python": platform.python_version(),
            **versions, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def machine_line(m: dict[str, object]) -> str:
    memory = f"{m['memory_gib']:.0f} GiB" if m["memory_gib"] else "? GiB"
    load = f", load {m['load_1min']:.2f} at start" if m["load_1min"] is not None else ""
    return (f"{m['date']} on {m['cpu']} ({m['cores']} cores), {memory}; Python {m['python']}, torch {m['torch']}, "
            f"lightning {m['lightning']}, ray {m['ray']}, mlflow {m['mlflow']}{load}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="step,digits,digits_warm,ddp,tracking",
                        help=f"comma-separated, run in this order; of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each runs every arm once (default 5)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latest.json",
                        help="JSON results (default benchmarks/results/latest.json); a CSV is written beside it")
    parser.add_argument("--markdown", action="store_true", help="also print a README-ready markdown table")
    parser.add_argument("--quick", action="store_true",
                        help=f"short runs to prove the cases work: {', '.join(f'{k} {v}' for k, v in QUICK.items())}")
    parser.add_argument("--steps", type=int, help=f"step, ddp: training steps per run (default {DEFAULTS['steps']})")
    parser.add_argument("--warmup", type=int, help=f"step, ddp: steps dropped (default {DEFAULTS['warmup']})")
    parser.add_argument("--batch-size", type=int, default=64, help="step, ddp: per worker (default 64)")
    parser.add_argument("--epochs", type=int, help=f"digits: epochs (default {DEFAULTS['epochs']}, as digits.yaml)")
    parser.add_argument("--tracking-steps", type=int,
                        help=f"tracking: steps per fit, > its 50 warm-up steps (default {DEFAULTS['tracking_steps']})")
    parser.add_argument("--tracking-workload", default="digits", choices=["digits", "tiny-transformer"])
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one measurement may take")
    parser.add_argument("--arms", help="only these arms (comma-separated keys, e.g. `--cases step --arms orch`: "
                                       "plain Lightning against orch); a case's baseline always runs, and a case "
                                       "none of whose arms is named runs whole")
    args = parser.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else default)
    args.case_names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in args.case_names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; allowed: {', '.join(CASES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.arm_names = None
    if args.arms:
        args.arm_names = {name.strip() for name in args.arms.split(",") if name.strip()}
        known = {arm for name in args.case_names for arm in CASES[name].arms}
        unknown = sorted(args.arm_names - known)
        if unknown:
            parser.error(f"unknown arm(s) {', '.join(unknown)} for case(s) {args.cases}; allowed: "
                         f"{', '.join(sorted(known))}")
    return args


def selected(case, arm_names: set[str] | None):
    """The case with only the chosen arms (and its baseline), its targets and references cut to match; a case
    none of whose arms was named runs whole."""
    if arm_names is None or case.whole_case is not None or not arm_names & set(case.arms):
        return case
    keep = {arm: label for arm, label in case.arms.items() if arm in arm_names or arm == case.baseline}
    return dataclasses.replace(case, arms=keep, also_vs=[a for a in case.also_vs if a in keep],
                               targets=[t for t in case.targets if t.arm in keep
                                        and (t.reference or case.baseline) in keep])


def run_case(case, ctx: Context, rows: list[dict]) -> None:
    ctx.state["arms"] = set(case.arms)  # prepare() sets up only what the chosen arms use
    with case.prepare(ctx) if case.prepare else contextlib.nullcontext():
        if case.whole_case is not None:
            rows += [{"case": case.name, **row} for row in case.whole_case(ctx)]
            return
        first = case.metrics[0]
        for repeat in range(1, ctx.args.repeats + 1):
            for arm, label in case.arms.items():
                started = time.time()
                try:
                    row = case.measure(arm, ctx)
                    shown = f"{first.label} {row[first.key]:.{first.digits}f}" if first.key in row else ""
                except (RunFailed, OSError, ValueError, KeyError) as exc:  # one bad run is a row, not the end
                    text = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
                    row, shown = {"error": text}, f"FAILED: {text.splitlines()[0]}"
                rows.append({"case": case.name, "arm": arm, "repeat": repeat, **row})
                print(f"  [{repeat}/{ctx.args.repeats}] {label:20s} {shown}  ({time.time() - started:.0f} s)",
                      flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def compile_project() -> None:
    """Byte-compile the project's own modules once, before any arm runs, as pip does for an installed package and
    Python does on a user's first run. An editable install (the README's) ships no .pyc, and with
    PYTHONDONTWRITEBYTECODE set (some shells and containers) every process of every run would compile orch's
    modules from source again, ~1 s of the driver's and the workers' start-up on 2 cores, which no user pays
    twice. The plain scripts and the recipe are compiled the same way."""
    import compileall

    for folder in ("orchestrator", "jobs", "benchmarks"):
        compileall.compile_dir(str(REPO / folder), quiet=2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a killed harness still tears its cluster down and writes results
    compile_project()
    info = machine()
    line = machine_line(info)
    print(f"machine: {line}", flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/run.py", *map(shlex.quote, given)])
    ctx = Context(args=args, scratch=Path(tempfile.mkdtemp(prefix="orch-bench-")))
    done: dict[str, dict] = {}
    interrupted = False
    try:
        for name in args.case_names:
            case, rows = selected(CASES[name], args.arm_names), []
            rounds = "its own rounds" if case.whole_case else f"{args.repeats} round(s) of {len(case.arms)} arms"
            print(f"\n{name}: {rounds} …", flush=True)
            case_error = None
            try:
                run_case(case, ctx, rows)
            except KeyboardInterrupt:
                interrupted = True
            except Exception as exc:  # e.g. the warm cluster would not start: report it, go on with the next case
                case_error = f"{type(exc).__name__}: {exc}"
            result = summarize(case, rows)
            print("\n".join(text_block(case, case.describe(ctx), result, interrupted)), flush=True)
            if case_error:
                print(f"  CASE FAILED: {case_error}", flush=True)
            settings = {k: v for k, v in vars(args).items()
                        if k not in ("out", "cases", "case_names", "arm_names", "markdown")}
            done[name] = {"date": info["date"], "machine_line": line, "command": command, "settings": settings,
                          "title": case.title, "description": case.describe(ctx), "arms": case.arms,
                          "baseline": case.baseline, "metrics": [asdict(m) for m in case.metrics], "rows": rows,
                          "interrupted": interrupted, "case_error": case_error,
                          "target_lines": [target_text(case, t) for t in result["targets"]],
                          "notes": ctx.state.pop("notes", {}), **result}
            if interrupted:
                break
    finally:
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        if done:
            out, table = write_files(args.out, {"machine": info, "machine_line": line, "command": command,
                                                "cases": done})
            print(f"\nwrote {out} and {table}", flush=True)
            if args.markdown:
                print("\n" + markdown(done, line, command))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
