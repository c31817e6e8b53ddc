"""`orch resume RUN_ID`: continue a stopped, failed or orphaned job from its latest checkpoint, into the same run.

Everything needed is in MLflow: the resolved spec (artifact spec/resolved.yaml) and where Ray Train kept
the run (tags orch.ray_run_name, orch.storage_path). Ray Train V2, started again with the same
RunConfig(name, storage_path), reloads its checkpoint snapshot and hands the latest checkpoint to the
workers; the MLflow run is reopened, so its metrics continue step by step (tracking/gate.py).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints


class ResumeError(Exception):
    """The run cannot be resumed as asked; nothing was started."""


@dataclass
class ResumeTarget:
    run_id: str
    ray_run_name: str
    storage_path: str
    attempts: int  # attempts recorded so far; the next is attempts + 1
    session: int  # 1 for the first `orch resume` of this run, 2 for the second, ...
    spec: dict
    project_dir: str | None = None
    latest_checkpoint: str | None = None
    started_commit: str | None = None  # the git commit the run started from
    commit: str | None = None  # the git commit this resume runs
    previous: str = ""  # how the run had ended: "KILLED: stopped by Ctrl-C; ..."

    def tags(self) -> dict[str, str]:
        tags = {"orch.resumes": str(self.session),
                f"orch.resume.{self.session}.at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                f"orch.resume.{self.session}.from_checkpoint": self.latest_checkpoint or ""}
        if self.commit:
            tags[f"orch.resume.{self.session}.git_commit"] = self.commit
        if self.previous:
            tags[f"orch.resume.{self.session}.after"] = self.previous[:500]
        return tags


def find_target(ref: str, tracking_uri: str, force: bool = False) -> ResumeTarget:
    """Check everything `orch resume` needs before anything starts; ResumeError says what is missing."""
    from mlflow import MlflowClient

    from orchestrator.tracking.uri import redact

    client = MlflowClient(tracking_uri)
    run = _find_run(client, ref, redact(tracking_uri))
    tags = run.data.tags
    run_id = run.info.run_id
    if "orch.ray_run_name" not in tags or "orch.storage_path" not in tags:
        raise ResumeError(f"run {run_id} was not started by `orch submit` (it has no orch.ray_run_name / "
                          f"orch.storage_path tags), so there is no orch checkpoint to resume from")
    if run.info.status == "FINISHED":
        raise ResumeError(f"run {run_id} already FINISHED; there is nothing left to resume "
                          f"(submit the job again to train further)")
    if run.info.status == "RUNNING":
        _refuse_if_alive(run_id, tags, force)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "spec/resolved.yaml", folder)
        except Exception as exc:
            raise ResumeError(f"run {run_id} has no readable spec/resolved.yaml artifact ({exc}); "
                              f"it cannot be resumed with the same spec") from None
        spec = yaml.safe_load(Path(path).read_text())
    latest = _latest_checkpoint(run_id, tags["orch.storage_path"], tags["orch.ray_run_name"])
    return ResumeTarget(run_id=run_id, ray_run_name=tags["orch.ray_run_name"], storage_path=tags["orch.storage_path"],
                        attempts=int(tags.get("orch.attempts", "1")), session=int(tags.get("orch.resumes", "0")) + 1,
                        spec=spec, project_dir=tags.get("orch.project_dir"), latest_checkpoint=latest,
                        started_commit=tags.get("mlflow.source.git.commit"),
                        previous=f"{run.info.status}: {tags['orch.error']}" if "orch.error" in tags else run.info.status)


def _find_run(client, ref: str, where: str):
    from mlflow.exceptions import MlflowException

    if not re.fullmatch(r"[A-Za-z0-9_.:\-]+", ref):
        raise ResumeError(f"{ref!r} is not a run id or job id")
    try:
        return client.get_run(ref)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ResumeError(f"cannot read run {ref} from {where}: {exc.message}") from None
    # Not a run id: the Ray job id (`orch submit --cluster`) or Ray Train run name the run is tagged with.
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    for tag in ("orch.job_id", "orch.ray_run_name"):
        runs = client.search_runs(experiment_ids, filter_string=f"tags.`{tag}` = '{ref}'") if experiment_ids else []
        if len(runs) == 1:
            return runs[0]
        if len(runs) > 1:
            raise ResumeError(f"{len(runs)} runs are tagged {tag}={ref}; name one by its run id")
    raise ResumeError(f"no MLflow run or job {ref!r} in {where}; `orch ui` lists the runs "
                      f"(or pass --tracking-uri to look in another store)")


def _refuse_if_alive(run_id: str, tags: dict[str, str], force: bool) -> None:
    """A RUNNING run may be orphaned (its driver killed) or really running: resuming twice would corrupt it."""
    import psutil

    host, pid = tags.get("orch.driver_host"), tags.get("orch.driver_pid", "")
    if host == socket.gethostname() and pid.isdigit() and psutil.pid_exists(int(pid)):
        try:
            alive = "orch" in " ".join(psutil.Process(int(pid)).cmdline())
        except psutil.Error:
            alive = False
        if alive:
            raise ResumeError(f"run {run_id} is still running (driver process {pid} on this machine); "
                              f"stop it first (Ctrl-C there, or `kill -TERM {pid}`)")
        return  # its driver is gone: an orphaned run
    if host != socket.gethostname() and not force:
        raise ResumeError(f"run {run_id} is marked RUNNING and its driver ran on {host or 'another machine'}, "
                          f"which this machine cannot check; if that driver is gone, pass --force")


def _latest_checkpoint(run_id: str, storage_path: str, ray_run_name: str) -> str | None:
    """Ray's snapshot of the run's checkpoints must exist, and the latest checkpoint it names too."""
    folder = f"{storage_path.rstrip('/')}/{ray_run_name}"
    try:
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(folder) if "://" in folder else (pyarrow.fs.LocalFileSystem(), folder)
        if fs.get_file_info(root).type == pyarrow.fs.FileType.NotFound:
            raise ResumeError(f"the checkpoints of run {run_id} were kept in {folder}, which no longer exists "
                              f"(moved or deleted?); nothing to resume from")
        with fs.open_input_stream(f"{root}/{SNAPSHOT_FILE}") as stream:
            snapshot = json.loads(stream.read().decode())
    except ResumeError:
        raise
    except FileNotFoundError:
        raise ResumeError(f"run {run_id} never committed a checkpoint (no {SNAPSHOT_FILE} in {folder}); "
                          f"there is nothing to resume from, submit the job again") from None
    except Exception as exc:
        raise ResumeError(f"cannot read the checkpoints of run {run_id} in {folder}: {exc}") from None
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not latest:
        raise ResumeError(f"run {run_id} never committed a checkpoint ({folder}/{SNAPSHOT_FILE} lists none); "
                          f"submit the job again")
    path = f"{root}/{latest}"
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        raise ResumeError(f"the latest checkpoint of run {run_id} ({folder}/{latest}) is missing; "
                          f"it cannot be resumed")
    return f"{folder}/{latest}"


def resume_job(ref: str, tracking_uri: str | None, force: bool, console, err_console, verbose: bool,
               started_at: float) -> int:
    """The `orch resume` command; returns the exit status."""
    import sys
    import threading

    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TRAINING_FAILED, SpecError
    from orchestrator.launch import submit
    from orchestrator.plan import build_plan
    from orchestrator.report import print_outcome
    from orchestrator.spec import JobSpec
    from orchestrator.tracking.run import TrackingUnavailable, git_state
    from orchestrator.tracking.uri import resolve_tracking_uri

    def fail(message: str) -> int:
        err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT

    uri = resolve_tracking_uri(tracking_uri)
    try:
        target = find_target(ref, uri, force)
    except ResumeError as exc:
        return fail(str(exc))
    if target.project_dir and Path(target.project_dir).is_dir() and Path(target.project_dir) != Path.cwd():
        console.print(f"[dim]continuing in the job's project folder {target.project_dir}[/]")
        os.chdir(target.project_dir)  # the user's modules import from there, on the driver and the workers
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    source = f"run {target.run_id} (spec/resolved.yaml)"
    try:
        spec = JobSpec.model_validate(target.spec)
        # Where the run was found and where its checkpoints are: not wherever this shell would default to.
        spec.tracking.uri = uri
        spec.checkpoint.storage_path = target.storage_path
        plan = build_plan(spec, source, check_fit=True)
    except SpecError as exc:
        return fail("; ".join(p.render() for p in exc.problems))
    except Exception as exc:  # pydantic's ValidationError: the logged spec no longer fits this version
        return fail(f"the logged spec of run {target.run_id} is not valid for this version of orch: {exc}")
    target.commit, _ = git_state(Path.cwd())
    if target.started_commit and target.commit and target.started_commit != target.commit:
        console.print(f"[yellow]note:[/] the code changed since this run started (commit {target.started_commit[:10]}"
                      f" → {target.commit[:10]}); the resumed steps run the new code", highlight=False)
    console.print(f"[dim]resuming run {target.run_id} from {target.latest_checkpoint} "
                  f"(attempt {target.attempts + 1})[/]", highlight=False)
    try:
        outcome = submit(spec, plan, source, console, verbose=verbose, started_at=started_at, resume=target)
    except SpecError as exc:
        return fail("; ".join(p.render() for p in exc.problems))
    except (TrackingUnavailable, ClusterUnavailable) as exc:
        return fail(str(exc))
    except KeyboardInterrupt as exc:
        from orchestrator.launch import interrupted_message

        err_console.print(interrupted_message(exc))
        return EXIT_INTERRUPTED
    print_outcome(console, spec, outcome)
    code = {"FINISHED": 0, "KILLED": EXIT_INTERRUPTED}.get(outcome.status, EXIT_TRAINING_FAILED)
    if any(thread.name == "orch-fit" for thread in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # see cli.submit: a thread still inside Ray's core can crash interpreter teardown
    return code
