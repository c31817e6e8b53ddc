"""The `orch` command line; heavy imports (torch, Ray, MLflow) wait until a command needs them."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from orchestrator.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TRAINING_FAILED, SpecError


EXEC_WAIT_ALLOWANCE_S = 2.0  # Python's start-up may wait this long for a core (a loaded machine) beyond its CPU


def _kernel_process_start() -> float:
    """When the kernel created this process, on the wall clock, to one clock tick (Linux; else psutil's figure).

    psutil's `create_time()` adds the tick count in /proc/self/stat to /proc/stat's `btime`, which the kernel
    rounds down to whole seconds, so its answer is early by the fraction of a second that rounding dropped (0.77 s
    on a machine of CI's kind on 12-03; psutil issue #877), and every start-up phase counted from it grew by that much.
    Measuring how long ago the process started on the clock the tick count runs on (CLOCK_BOOTTIME) and taking
    that from the wall clock now has no rounding in it. Hand-written because no library we use exposes it."""
    try:
        with open("/proc/self/stat") as stat:
            text = stat.read()
        # Fields after the command name (which may hold spaces, so split after its closing parenthesis) start at
        # field 3; starttime is field 22 (proc_pid_stat(5)).
        start_ticks = int(text[text.rindex(")") + 2:].split()[22 - 3])
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age_s
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: psutil knows the other systems
        import psutil

        return psutil.Process().create_time()


def _process_started_at() -> float:
    """When this process began (Python's own start-up and imports count in what a user waits for).

    The kernel records a process's creation (its fork), not its exec: a shell that runs `orch` as its last
    command (`bash -c "pip install … && orch submit …"`, a `( … )` subshell, `exec orch`) becomes orch under the same
    pid, and the phases would count the commands before it. Python's start-up up to this package's import is CPU
    work, so a process that waited much longer than the CPU it used had been something else first: then the
    start is put back from the package's import by that CPU time.
    """
    from orchestrator import FIRST_IMPORT

    imported_at, cpu_used = FIRST_IMPORT
    exec_estimate = imported_at - cpu_used
    try:
        created = _kernel_process_start()
    except Exception:  # no psutil and no /proc: the next best is the package's import
        return exec_estimate
    # A start after this package's import cannot be (a clock stepped between the two readings): trust the import.
    waited = imported_at - created
    return exec_estimate if waited < 0 or waited > cpu_used + EXEC_WAIT_ALLOWANCE_S else created


STARTED_AT = _process_started_at()
app = typer.Typer(
    name="orch",
    help="Train Lightning jobs data-parallel on Ray Train, with every run recorded in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

OverridesArg = typer.Argument(None, help="Dotted overrides typed by the schema, e.g. trainer.max_epochs=5")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Show Ray's and Lightning's own output too.")


def _fail_on_spec_error(exc: SpecError) -> None:
    for problem in exc.problems:
        from rich.markup import escape  # messages quote user input and lists such as [jobs.gpt.Block]

        err_console.print(f"[bold red]error:[/] {escape(problem.render())}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _prepare(job: Path, overrides: list[str] | None, check_fit: bool = True, check_memory: bool = False,
             start_early=None):
    """spec -> plan, in the driver (or, on a cold start, in a worker process); the project folder is importable
    as with `python -m`.

    `start_early(spec, source)` may start something (local Ray) once the spec is valid, to run while the model is
    imported and planned; it is returned third, and cancelled if the job is refused after all."""
    from orchestrator.loader import load_spec
    from orchestrator.plan import build_plan

    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    source = str(job)
    started = None
    try:
        spec = load_spec(job, overrides or [])
        started = start_early(spec, source) if start_early else None
        facts = _model_planned_by_a_worker(started)
        if facts is None:
            _check_classes(spec, source, started)
        return spec, build_plan(spec, source, check_fit=check_fit, check_memory=check_memory, facts=facts), started
    except BaseException as exc:
        if started is not None:
            started.cancel()
        if isinstance(exc, SpecError):
            _fail_on_spec_error(exc)
        raise


def _model_planned_by_a_worker(started):
    """On a cold start: the model's plan, made by a process prestarted for the job (worker_plan.py); else None."""
    worker_plan = getattr(started, "worker_plan", None)
    if worker_plan is None:
        return None
    from orchestrator.launch import import_trainer, interrupt_on_sigterm

    started.wait()
    interrupt_on_sigterm()  # over the handler ray.init put on SIGTERM in its thread (see launch.submit)
    return worker_plan.facts(started, meanwhile=import_trainer)


def _check_classes(spec, source: str, started) -> None:
    from orchestrator.classpath import check_spec_classes
    from orchestrator.errors import is_import_deadlock

    try:
        check_spec_classes(spec, source)
    except RuntimeError as exc:  # this thread's imports and Ray's start collided on module locks: once more, alone
        if started is None or not is_import_deadlock(exc):
            raise
        started.settle()
        check_spec_classes(spec, source)


@app.command()
def submit(
    job: Path = typer.Argument(..., help="The job spec (YAML)."),
    overrides: Optional[List[str]] = OverridesArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved spec and the plan; start nothing."),
    force: bool = typer.Option(False, "--force", help="Run even when the planned peak memory per worker does not fit."),
    verbose: bool = VerboseOpt,
    cluster: Optional[str] = typer.Option(
        None, "--cluster", "-c", help="Where to run; sets cluster.address. http://HOST:PORT (a Ray dashboard): sent "
        "as a Ray job. HOST:PORT or auto: joined directly. Default: cluster.address, ORCH_CLUSTER, RAY_ADDRESS, "
        "else Ray in this process."),
    detach: bool = typer.Option(False, "--detach", "-d", help="With a dashboard address: print the job id and return."),
    attach_run: Optional[str] = typer.Option(None, "--attach-run", hidden=True,
                                             help="Record into this MLflow run (set by --cluster http://...)."),
) -> None:
    """Train a job: validate, plan, run on Ray Train, record in MLflow."""
    user_overrides = list(overrides or [])
    all_overrides = user_overrides + ([f"cluster.address={cluster}"] if cluster else [])
    if not dry_run:
        from orchestrator.cli_cluster import preflight

        preflight(job, all_overrides)  # a cluster that cannot take the job says so before torch is even imported
    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.tracking.run import TrackingUnavailable

    def start_ray_early(spec, source):
        from orchestrator.launch import start_local_ray_early

        return start_local_ray_early(spec, source, console, verbose) if not (dry_run or attach_run) else None

    try:
        spec, plan, ray_start = _prepare(job, all_overrides, check_memory=not force, start_early=start_ray_early)
    except TrackingUnavailable as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        err_console.print("interrupted before training started")
        raise typer.Exit(EXIT_INTERRUPTED)
    if dry_run:
        from orchestrator.report import print_plan

        print_plan(console, spec, plan)
        console.print("[dim]dry run: nothing was started and no MLflow run was opened.[/]")
        return
    from orchestrator.cluster import requested_address
    from orchestrator.jobs_client import is_jobs_address

    address = requested_address(spec.cluster.address)
    if is_jobs_address(address):
        from orchestrator.cli_cluster import submit_to_cluster

        raise typer.Exit(submit_to_cluster(spec, plan, job, user_overrides, address, detach, verbose))
    from orchestrator.launch import submit as launch_submit
    from orchestrator.report import print_outcome

    try:
        outcome = launch_submit(spec, plan, str(job), console, verbose=verbose, started_at=STARTED_AT,
                                run_id=attach_run, ray_start=ray_start)
    except SpecError as exc:
        _fail_on_spec_error(exc)
    except (TrackingUnavailable, ClusterUnavailable) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt as exc:
        from orchestrator.launch import interrupted_message

        err_console.print(interrupted_message(exc))
        raise typer.Exit(EXIT_INTERRUPTED)
    print_outcome(console, spec, outcome)
    _exit_now({"FINISHED": 0, "KILLED": EXIT_INTERRUPTED}.get(outcome.status, EXIT_TRAINING_FAILED))


def _exit_now(code: int) -> None:
    """Leave once the job is recorded and Ray is left: exit handlers run, the interpreter's teardown does not.

    Tearing down the modules a driver has loaded (PyTorch, Lightning, Ray's core, MLflow) takes ~1-2 s on a small
    machine, after everything is recorded and printed, for nothing a user sees but the wait for the prompt.
    It could also crash: when Ray's fit() did not return after the shutdown, a thread is still inside Ray's C++
    core. What the interpreter does first is still done: non-daemon threads are joined and the exit handlers
    (Ray's, MLflow's, logging's) run.
    """
    import atexit
    import logging

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(timeout=30)
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter would run first; no public way to run them
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def plan(
    job: Path = typer.Argument(..., help="The job spec (YAML)."),
    overrides: Optional[List[str]] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show what `submit` would send: resolved spec, workers, resources, parameter counts, memory."""
    spec, job_plan, _ = _prepare(job, overrides)
    if as_json:
        import json

        from orchestrator.launch import ray_configs, ray_run_name_placeholder

        data = job_plan.to_dict() | {"ray": ray_configs(spec, job_plan, ray_run_name_placeholder(spec))}
        print(json.dumps(data, indent=2))
        return
    from orchestrator.report import print_plan

    print_plan(console, spec, job_plan)


@app.command()
def resume(
    run: str = typer.Argument(..., help="The MLflow run id (or Ray job id) of a stopped, failed or orphaned job."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db"),
    force: bool = typer.Option(False, "--force", help="Resume a run marked RUNNING whose driver ran on another machine."),
    verbose: bool = VerboseOpt,
) -> None:
    """Continue a job from its latest checkpoint, into the same MLflow run, with the same resolved spec."""
    from orchestrator.resume import resume_job

    _exit_now(resume_job(run, tracking_uri, force, console, err_console, verbose, STARTED_AT))


@app.command()
def ui(
    run: Optional[str] = typer.Option(None, "--run", help="Print the address of this run's page."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: MLFLOW_TRACKING_URI or ./mlflow.db"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; loopback unless you name another."),
    port: int = typer.Option(5000, help="Port; the next free one is taken when it is busy."),
) -> None:
    """Start the MLflow UI on the same store `submit` writes to."""
    from orchestrator.tracking.ui import serve_ui

    raise typer.Exit(serve_ui(console, tracking_uri, host, port, run))


from orchestrator.cli_cluster import register  # noqa: E402  (cluster and job commands; imports only typer)

register(app)

if __name__ == "__main__":
    app()
