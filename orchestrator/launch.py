"""The driver: open the MLflow run, run TorchTrainer.fit, follow it live, and close the run with its status."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from orchestrator.plan import Plan
from orchestrator.spec import JobSpec
from orchestrator.tracking.relay import MetricRelay, relay_prefix


@dataclass
class Outcome:
    status: str  # FINISHED | FAILED | KILLED
    run_id: str
    experiment_id: str
    tracking_uri: str
    ui_command: str
    metrics: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    last_checkpoint: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_tags(spec: JobSpec, plan: Plan, source: str) -> dict[str, str]:
    from orchestrator.tracking.run import environment_tags

    tags = {
        **environment_tags(),
        "orch.world_size": str(plan.world_size),
        "orch.strategy": plan.strategy,
        "orch.accelerator": plan.accelerator,
        "orch.precision": spec.trainer.precision,
        "orch.spec_file": source,
        "orch.planned_by": plan.planned_by,  # the driver, or on a cold start a worker process (worker_plan.py)
        "orch.job_name": spec.name,
        "mlflow.source.name": "orch submit",
        **spec.tracking.tags,
    }
    if os.environ.get("ORCH_RAY_JOB_ID"):  # the Ray job this driver runs as: the run names its job
        tags["orch.ray_job_id"] = os.environ["ORCH_RAY_JOB_ID"]
    return tags


def ray_configs(spec: JobSpec, plan: Plan, ray_run_name: str) -> dict[str, Any]:
    """The Ray Train request as plain data: what `plan` prints is exactly what `submit` sends."""
    return {
        "scaling": {
            "num_workers": plan.world_size,
            "use_gpu": spec.scaling.use_gpu,
            "resources_per_worker": plan.resources_per_worker,
            "placement_strategy": plan.placement,
        },
        "run": {"name": ray_run_name, "storage_path": plan.storage_path},
        "failure": {"max_failures": spec.failure.max_failures},
        "checkpoint": {
            "num_to_keep": spec.checkpoint.num_to_keep,
            "checkpoint_score_attribute": spec.checkpoint.monitor,
            "checkpoint_score_order": spec.checkpoint.mode,
        },
    }


def start_local_ray_early(spec: JobSpec, source: str, console: Console, verbose: bool):
    """For the local default: Ray starting in the background while the driver imports and plans the model.

    First what needs only the spec, so that input refused anyway starts nothing: the machine has the CPUs and
    GPUs asked for, the tracking store answers, and the model and data classes are found in their modules'
    sources (an init_args mistake is found only by importing them: then Ray is stopped again, cli.py).
    Returns None where Ray must not start yet: a cluster address, or a class path that looks wrong.
    The processes prestarted for the job also plan its model (worker_plan.py) unless ORCH_COLD_PRESTART=0 (no
    prestart) or ORCH_PLAN_IN_DRIVER=1 (for an A/B: the driver imports Lightning and plans, as before).
    """
    from orchestrator.classpath import looks_importable
    from orchestrator.cluster import LocalRayStart, requested_address
    from orchestrator.plan import check_local_fit
    from orchestrator.resources import local_resources
    from orchestrator.tracking.run import check_tracking
    from orchestrator.tracking.uri import resolve_tracking_uri
    from orchestrator.warm_pool import prestart_for_this_job

    if requested_address(spec.cluster.address) is not None:
        return None
    if not (looks_importable(spec.model.class_path) and looks_importable(spec.data.class_path)):
        return None  # the real check reports it, with Ray never started
    machine = local_resources()
    check_local_fit(spec, source, machine)
    tracking_uri = resolve_tracking_uri(spec.tracking.uri)
    check_tracking(tracking_uri)
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] starting Ray", highlight=False)
    interrupt_on_sigterm()  # ray.init off the main thread installs no SIGTERM handler of its own
    if os.environ.get("ORCH_COLD_PRESTART") == "0":
        return LocalRayStart(verbose)
    from orchestrator.plan import offered_resources
    from orchestrator.worker_plan import WorkerPlan

    # The model is planned by the first prestarted worker process to have imported Lightning, not in this one.
    worker_plan = None if os.environ.get("ORCH_PLAN_IN_DRIVER") == "1" else \
        WorkerPlan(spec, source, offered_resources(machine))
    prestart = functools.partial(prestart_for_this_job, spec.scaling.num_workers)
    return LocalRayStart(verbose, prestart=worker_plan.asking_with(prestart) if worker_plan else prestart,
                         worker_plan=worker_plan)


def import_trainer() -> None:
    """What building the trainer imports (Ray Train, with Ray Data and pandas: ~0.6 s of CPU on a small machine):
    for a driver that waits anyway, so that the launch does not wait for it after the plan."""
    import orchestrator.lean_train  # noqa: F401


def submit(spec: JobSpec, plan: Plan, source: str, console: Console, verbose: bool = False,
           started_at: float | None = None, resume=None, run_id: str | None = None, ray_start=None) -> Outcome:
    """`resume` (resume.ResumeTarget): continue that run's Ray Train run and MLflow run instead of new ones;
    `run_id`: record into a run the client opened before sending the job to a cluster (`--attach-run`);
    `ray_start` (cluster.LocalRayStart): the local Ray start_local_ray_early() began, to wait for."""
    from orchestrator.cluster import check_cluster_fit, connect, lean_loopback_cluster, requested_address
    from orchestrator.progress import ProgressView
    from orchestrator.recovery import check_storage
    from orchestrator.tracking.run import RunRecord, check_tracking

    started_at = started_at or time.time()
    marks = {"process_start": started_at, "submit": time.time()}  # start-up phases, see startup_phases()
    if not verbose:
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from orchestrator.cluster import disconnect, started_here
    from orchestrator.warm_pool import refill as refill_warm_pool

    try:
        check_tracking(plan.tracking_uri)
        check_storage(plan.storage_path, source)
    except BaseException:
        if ray_start is not None:
            ray_start.cancel()
        raise
    marks["preflight"] = time.time()
    address = requested_address(spec.cluster.address)
    ray_run_name = resume.ray_run_name if resume else new_ray_run_name(spec)
    opening = fit = view = interrupted = None
    timings: dict[str, float] = {}  # filled from the board (_poll) from the first poll on
    try:
        if ray_start is not None:
            ray_start.wait()
            # The core worker ray.init created in that thread put abseil's failure handler on SIGTERM, over ours:
            # it passes the signal on, but arms an alarm that aborts the process 3 s later, mid graceful stop.
            interrupt_on_sigterm()
        else:
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] starting Ray" if address is None
                          else f"[dim]{time.strftime('%H:%M:%S')}[/] joining the Ray cluster at {address}",
                          highlight=False)
            interrupt_on_sigterm()
            connect(address, verbose)
            interrupt_on_sigterm()  # ray.init installs its own SIGTERM handler, which would exit without closing the run
        if address is not None:
            waiting = check_cluster_fit(source, plan)  # before the run opens: a job it refuses leaves no run behind
            if waiting:
                console.print(f"[yellow]{waiting}[/]", highlight=False)
            lean_loopback_cluster()
        marks["ray"] = time.time()
        ray_ready_s = marks["ray"] - started_at
        # The workers start first and the MLflow run opens meanwhile: opening it is seconds of this process's own
        # work (importing MLflow, a new sqlite store's schema, params and artifacts), which no longer holds up the
        # controller and the worker processes. They read the run's id from the progress board (worker.py).
        fit = _start_fit(spec, ray_configs(spec, plan, ray_run_name), resume.run_id if resume else run_id,
                         plan.tracking_uri, verbose, resume)
        marks["launch"] = time.time()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orch-open-run")
        opening = pool.submit(_yielding(RunRecord.reopen), plan.tracking_uri, resume.run_id) if resume else \
            pool.submit(_yielding(_open_run), spec, plan, source, ray_run_name, run_id)
        # The view starts now, not once the run is open: on a new store (a user's first run) the run opens many
        # seconds into training, and the epochs trained meanwhile would otherwise all appear in the same second.
        view = ProgressView(console, spec.name, plan.world_size)
        view.start()
        view.set_status(f"starting {plan.world_size} workers")

        def poll_board() -> None:
            _poll(fit.board, view, timings, started_at, marks)

        try:
            record = _wait(opening, meanwhile=poll_board)
        except KeyboardInterrupt as first:
            if view.state.get("phase") != "training":  # (the board as last shown)
                raise  # nothing trained yet: stop at once, leaving nothing
            # Steps were trained (and metrics buffered on rank 0) before the run could record them: the run opens
            # first, then the workers checkpoint (_follow); a second Ctrl-C meanwhile still stops at once.
            view.set_status("stopping: opening the MLflow run to record what was trained (Ctrl-C again to stop at once)")
            record = _wait(opening, meanwhile=poll_board)
            interrupted = first
        pool.shutdown(wait=False)
        # The workers' metrics come through this process (tracking/relay.py): from now on they can be logged.
        relay = MetricRelay(relay_prefix(fit.board), plan.tracking_uri, resumed=resume is not None).start()
        fit.board.update({"run_start_ms": record.start_time_ms, "run_id": record.run_id})  # run_id last: workers
        run_open_s = time.time() - marks["launch"]  # while the workers started: not one of the phases
    except BaseException as exc:
        if view is not None:
            view.close()
        _close_board(fit)
        disconnect()  # leave nothing running: a controller and workers already started end with this driver's job
        _wait_for_fit_thread()
        trained = view is not None and view.state.get("phase") == "training"
        if opening is not None:  # a resumed run too: reopening marked it RUNNING
            _close_opened_run(opening, exc, trained=trained)
        if trained and isinstance(exc, KeyboardInterrupt):
            raise InterruptedWhileOpening(STOPPED_WHILE_OPENING) from None
        raise
    outcome = Outcome("RUNNING", record.run_id, record.experiment_id, plan.tracking_uri,
                      ui_command=ui_command(plan.tracking_uri, record.run_id))
    try:
        if resume:
            record.set_tags(resume.tags())
        record.set_tags({"orch.driver_pid": str(os.getpid()), "orch.project_dir": str(Path.cwd())})
        result, timings = _follow(spec, plan, fit, record, view, timings, started_at, resume, marks, interrupted)
        relay.stop()  # the workers waited for their metrics to be logged; anything left goes before the status
        outcome.timings = {"ray_ready_s": ray_ready_s, "run_open_s": run_open_s, **timings}
        _collect(outcome, result, spec)
        _record_outcome(record, outcome, step=resume.session if resume else 0)
        outcome.status = "FINISHED"
        record.finish("FINISHED")
    except KeyboardInterrupt as exc:
        from orchestrator.recovery import signals_held

        outcome.status = "KILLED"
        with signals_held():
            relay.stop(timeout_s=10.0)
            outcome.error = _record_stop(record, outcome, exc, spec, step=resume.session if resume else 0)
            record.finish("KILLED", outcome.error)
    except BaseException as exc:
        outcome.status = "FAILED"
        relay.stop(timeout_s=10.0)
        outcome.error = _describe_failure(exc, record.run_id)
        record.finish("FAILED", outcome.error)
    finally:
        view.close()  # _follow closed it, unless what came before _follow failed
        _close_relay(relay)
        _close_board(fit)
        try:
            if not started_here():  # a cluster that lives on: warm processes for the next job, where it keeps them
                refill_warm_pool()
        finally:  # a second Ctrl-C during the refill still leaves Ray
            disconnect()
            _wait_for_fit_thread()
    return outcome


def _close_relay(relay: MetricRelay) -> None:
    """A stop once more (it drains what is left; a second Ctrl-C may have cut the first short), then delete."""
    try:
        relay.stop(timeout_s=5.0)
        relay.close()
    except Exception:  # the cluster, and its store, went first
        pass


def _close_board(fit: _StartedFit | None) -> None:
    """A cluster that lives on keeps nothing of the job's progress board (keys in its GCS) once the job is over."""
    if fit is None:
        return
    try:
        fit.board.close()
    except Exception:  # the cluster, and its store, went first
        pass


def _wait(future: concurrent.futures.Future, meanwhile: Callable[[], Any] | None = None, every_s: float = 0.5):
    """future.result() in slices, so that Ctrl-C reaches the main thread while it waits; `meanwhile` runs
    every `every_s` (the progress view's poll: as often as _follow's, not more, beside workers starting)."""
    due = time.monotonic() + every_s
    while True:
        try:
            return future.result(timeout=0.2)
        except concurrent.futures.TimeoutError:
            if meanwhile is not None and time.monotonic() >= due:
                meanwhile()
                due = time.monotonic() + every_s


def _wait_for_fit_thread(timeout_s: float = 20.0) -> None:
    """After an interrupt, Ray's shutdown ends fit(); a thread still inside Ray at exit can crash the interpreter."""
    for thread in threading.enumerate():
        if thread.name == "orch-fit":
            thread.join(timeout=timeout_s)


def interrupt_on_sigterm() -> None:
    """`orch stop`, Ray's stop_job and schedulers send SIGTERM: treat it as Ctrl-C so the run is closed, not orphaned."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)


INTERRUPTED_BEFORE_TRAINING = "interrupted before training started"
STOPPED_WHILE_OPENING = "stopped at once while the MLflow run was opening; the steps trained until then were not recorded"


class InterruptedWhileOpening(KeyboardInterrupt):
    """A second Ctrl-C while the run opened after training had begun: unlike an interrupt before it, steps were lost."""


def interrupted_message(exc: KeyboardInterrupt) -> str:
    """What the CLI says for an interrupt that submit() let through (the run, if any, was closed KILLED)."""
    return str(exc) if isinstance(exc, InterruptedWhileOpening) else INTERRUPTED_BEFORE_TRAINING


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def ui_command(tracking_uri: str, run_id: str) -> str:
    from orchestrator.tracking.uri import resolve_tracking_uri

    default = resolve_tracking_uri()
    extra = "" if tracking_uri == default else f" --tracking-uri '{tracking_uri}'"
    return f"orch ui --run {run_id}{extra}"


def new_ray_run_name(spec: JobSpec) -> str:
    """The Ray Train run's name, its checkpoints' folder: the job's name, when it started, and a random suffix.

    Not the MLflow run's id, which is only known once the run is open, after the workers start; the run's tag
    orch.ray_run_name and the storage path's tag lead from one to the other.
    """
    import secrets

    return f"{spec.name}_{time.strftime('%Y%m%d-%H%M%S')}_{secrets.token_hex(3)}"


def ray_run_name_placeholder(spec: JobSpec) -> str:
    """What `orch plan` shows for new_ray_run_name(), which is only drawn when the job starts."""
    return f"{spec.name}_<start time>_<random>"


def _yielding(function):
    """`function`, run in a thread whose CPU priority it lowers (nice 10) for what is left of the thread's life.

    Opening the run is seconds of CPU (MLflow's imports, a new store's schema, params, artifacts) that no
    training step waits for (worker.RunIdFromBoard), spent just as the controller and the workers start: on a
    machine whose cores they keep busy, it now takes what they leave instead of delaying the first step. Linux
    keeps a nice value per thread; elsewhere setpriority would change the whole process, so it is left out there.
    """
    def run(*args):
        if sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except OSError:  # not allowed here (a seccomp profile): the run opens at the usual priority
                pass
        return function(*args)

    return run


def _open_run(spec: JobSpec, plan: Plan, source: str, ray_run_name: str, run_id: str | None):
    """A new MLflow run (or the one the client opened, `--attach-run`) with the job's params, tags and artifacts."""
    from orchestrator.tracking.run import RunRecord

    record = RunRecord(plan.tracking_uri, spec.experiment, spec.tracking.run_name, run_tags(spec, plan, source),
                       run_id=run_id)
    try:
        _record_job(record, spec, plan, ray_run_name)
    except BaseException as exc:
        record.finish("FAILED", f"recording the job failed: {exc}")
        raise
    return record


def _close_opened_run(opening: concurrent.futures.Future, exc: BaseException, trained: bool = False) -> None:
    """The job did not start (or Ctrl-C came) while the run was being opened: the run must not stay RUNNING."""
    try:
        record = opening.result(timeout=60)
    except BaseException:  # it failed too and closed itself; the first error is the one to report
        return
    if not isinstance(exc, KeyboardInterrupt):
        record.finish("FAILED", f"the job did not start: {exc}")
    else:
        record.finish("KILLED", STOPPED_WHILE_OPENING if trained else INTERRUPTED_BEFORE_TRAINING)


def _record_job(record, spec: JobSpec, plan: Plan, ray_run_name: str) -> None:
    from orchestrator.tracking.run import flatten

    record.log_params(flatten(spec.model_dump(mode="json")))
    counts = plan.parameters
    metrics = {
        "model/params_total": counts.total,
        "model/params_trainable": counts.trainable,
        "model/params_non_trainable": counts.non_trainable,
        "model/size_bytes": counts.size_bytes,
        **{f"model/params_by_module/{name}": n for name, n in counts.by_module.items()},
        # The plan's estimate per worker, to compare with the memory measured while it ran.
        **{f"plan/{key}": value for key in ("peak_bytes", "parameters_bytes", "gradients_bytes", "optimizer_bytes",
                                            "activations_bytes") if (value := getattr(plan.memory, key)) is not None},
    }
    record.log_metrics(metrics)
    record.set_tags({"orch.ray_run_name": ray_run_name, "orch.storage_path": plan.storage_path})
    record.log_spec(spec.model_dump(mode="json"))
    record.log_text(plan.model_summary, "model/summary.txt")


STARTUP_PHASES = (  # (name, the mark that ends it); each phase starts where the one before ended
    ("imports", "submit"),  # Python, the CLI's imports, the spec, the plan (the model built on the meta device)
    ("preflight", "preflight"),  # the tracking store and the checkpoint storage answer
    ("ray_start", "ray"),  # what was left of Ray's start once the model was planned, or the cluster joined
    ("launch", "launch"),  # the trainer built (Ray Train imported) and fit() started; the MLflow run then opens
    #                        in the background while the workers start (orch/run_open_s, not a phase of its own)
    ("workers_start", "worker_entered_at"),  # controller, placement group, worker processes, process group
    ("setup", "started_at"),  # imports in the worker, model, data, Lightning's set-up, restoring a checkpoint
    ("first_step", "first_step_at"),  # the first optimizer step
)


def startup_phases(marks: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each start-up phase, for the phases whose end was seen (a restarted attempt's are not)."""
    phases, previous = {}, marks["process_start"]
    for name, mark in STARTUP_PHASES:
        if mark not in marks:
            break
        phases[name] = max(0.0, marks[mark] - previous)
        previous = max(previous, marks[mark])
    return phases


@dataclass
class _StartedFit:
    board: Any  # the progress board (progress.ProgressBoard)
    box: dict[str, Any]  # "result" or "error", set by the fit thread
    done: threading.Event


def _start_fit(spec, configs, run_id, tracking_uri, verbose, resume) -> _StartedFit:
    """TorchTrainer.fit() in a thread; `run_id` None: the workers wait for it on the board."""
    from orchestrator.progress import ProgressBoard

    board = ProgressBoard()
    board.update({"attempt_base": resume.attempts if resume else 0})
    trainer = _trainer(spec, configs, run_id, tracking_uri, board, verbose)
    started = _StartedFit(board, {}, threading.Event())  # an Event: Python 3.11 marks a thread stopped when
    thread = threading.Thread(target=_fit_into, args=(trainer, started.box, started.done), name="orch-fit",
                              daemon=True)  # Ctrl-C interrupts its join()
    thread.start()
    return started


def _follow(spec, plan, fit: _StartedFit, record, view, timings, started_at, resume, marks, interrupted=None):
    """Show the job live in `view` (entered; closed here) until fit() returns; Ctrl-C asks the workers for a
    checkpoint first. `interrupted`: a Ctrl-C that came while the run was opening, handled as one that comes now."""
    from orchestrator.recovery import AttemptLog, stop_gracefully

    attempts = AttemptLog(record.tracking_uri, record.run_id, resume.attempts if resume else 0)
    board, box, done = fit.board, fit.box, fit.done
    with view:

        def poll() -> dict:
            state = _poll(board, view, timings, started_at, marks)
            for line in attempts.update(state):
                view.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [yellow]{escape(line)}[/]", highlight=False)
            return state
        try:
            try:
                if interrupted is not None and not done.is_set():  # (the job may have ended while the run opened)
                    raise interrupted
                while not done.wait(timeout=0.5):
                    poll()
            except KeyboardInterrupt as interrupt:  # a second one inside stop_gracefully stops at once
                raise stop_gracefully(board, done, box, spec.checkpoint.stop_timeout_s, view.set_status, poll,
                                      interrupt) from None
            poll()
        finally:
            attempts.close(timeout_s=10)
    timings["total_s"] = time.time() - started_at
    if "first_step_at" in marks:
        timings.update({f"startup/{name}_s": value for name, value in startup_phases(marks).items()})
    if "error" in box:
        raise box["error"]
    return box["result"], timings


def _poll(board, view, timings, started_at, marks) -> dict:
    try:
        state = board.snapshot()
    except Exception:  # a slow board must not stop the job; the next poll will catch up
        return {}
    if state.get("first_step_at") and "first_step_s" not in timings:
        timings["first_step_s"] = state["first_step_at"] - started_at
        timings["warm_workers"] = len(set(state.get("warm_ranks", ())))  # started in a warm process (warm_pool.py)
        marks.update({key: state[key] for key in ("worker_entered_at", "started_at", "first_step_at")
                      if key in state})  # the first attempt's worker-side marks
    if state:
        view.update(state)
    return state


def _fit_into(trainer, box: dict[str, Any], done: threading.Event) -> None:
    try:
        box["result"] = trainer.fit()
    except BaseException as exc:  # handed to the main thread, which owns the run's status
        box["error"] = exc
    finally:
        done.set()


def _trainer(spec, configs, run_id, tracking_uri, board, verbose):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from orchestrator.attempts import AttemptRecorder
    from orchestrator.lean_train import OrchTorchTrainer
    from orchestrator.cluster import started_here
    from orchestrator.warm_pool import tier_runtime_env, worker_tier
    from orchestrator.worker import train_loop

    return OrchTorchTrainer(
        train_loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "run_id": run_id,  # None: not open yet, the workers read it from the board
            "tracking_uri": tracking_uri,
            "board": board,
            "verbose": verbose,
        },
        scaling_config=ScalingConfig(**configs["scaling"]),
        run_config=RunConfig(
            **configs["run"],
            failure_config=FailureConfig(**configs["failure"]),
            checkpoint_config=CheckpointConfig(**configs["checkpoint"]),
            callbacks=[AttemptRecorder(board)],
            # Processes kept warm for the workers import Lightning; the other actors' do not.
            worker_runtime_env=tier_runtime_env(worker_tier(cold=started_here())),
            logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING"),  # a job's log stays readable
        ),
    )


def _collect(outcome: Outcome, result, spec: JobSpec) -> None:
    if getattr(result, "error", None) is not None:
        raise result.error
    outcome.metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    if result.checkpoint is not None:
        outcome.last_checkpoint = result.checkpoint.path
    if spec.checkpoint.monitor and result.best_checkpoints:
        try:
            best = result.get_best_checkpoint(spec.checkpoint.monitor, spec.checkpoint.mode)
        except (ValueError, KeyError):  # the monitored metric was never logged
            best = None
        outcome.best_checkpoint = best.path if best is not None else None
    outcome.best_checkpoint = outcome.best_checkpoint or outcome.last_checkpoint


def _record_outcome(record, outcome: Outcome, step: int = 0) -> None:
    tags = {"orch.last_checkpoint": outcome.last_checkpoint or "", "orch.best_checkpoint": outcome.best_checkpoint or ""}
    record.set_tags({k: v for k, v in tags.items() if v})
    record.log_metrics({f"orch/{k}": v for k, v in outcome.timings.items()}, step=step)  # step: nth session


def _record_stop(record, outcome: Outcome, interrupt: KeyboardInterrupt, spec: JobSpec, step: int = 0) -> str:
    """Ctrl-C / SIGTERM: record the checkpoint the workers wrote on the way out, and how to go on."""
    from orchestrator.recovery import Stopped, stop_note

    stopped = interrupt if isinstance(interrupt, Stopped) else Stopped(str(interrupt) or "Ctrl-C")
    if stopped.result is not None and stopped.error is None:
        try:
            _collect(outcome, stopped.result, spec)
            _record_outcome(record, outcome, step)
        except Exception:  # what was recorded stays; the status still has to be set
            pass
    return stop_note(stopped, record.run_id)


def _describe_failure(exc: BaseException, run_id: str) -> str:
    """Ray wraps the worker's exception; show the user's traceback, not Ray's plumbing."""
    from orchestrator.recovery import describe_failure

    text = describe_failure(exc, run_id) or "".join(traceback.format_exception(exc))
    return text.strip()
