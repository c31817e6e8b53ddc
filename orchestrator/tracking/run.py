"""The driver's side of MLflow: it opens the run, records what the job is, and alone sets its final status."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from orchestrator.tracking.uri import redact

# Keys whose values must never reach MLflow: tokens, keys, passwords.
SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|access[_-]?key|credential)", re.I)
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value's length


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested spec -> {"trainer.max_epochs": "10", ...}; the same names in every run, so runs compare."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif SECRET_KEY.search(str(key)):
            flat[name] = "***"
        else:
            text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
            flat[name] = redact(text)[:MAX_PARAM_VALUE]
    return flat


def environment_tags() -> dict[str, str]:
    tags = {f"orch.version.{name}": _version(name) for name in ("orchestrator", "torch", "lightning", "ray", "mlflow")}
    tags["orch.driver_host"] = socket.gethostname()
    commit, dirty = git_state(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit  # MLflow's own tag: the UI links it
        tags["orch.git_dirty"] = str(dirty).lower()
    return tags


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_state(folder: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the project the job runs from; (None, False) outside a git work tree."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, bool(status.strip())


class RunRecord:
    """One MLflow run per job, created here so its id can be handed to the workers."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None, tags: dict[str, str],
                 run_id: str | None = None):
        """run_id: take over a run opened elsewhere (by `orch submit --cluster http://…` before it sent the job)."""
        from mlflow.exceptions import MlflowException

        from mlflow.entities import RunTag

        self.client = open_client(tracking_uri)
        self.tracking_uri = tracking_uri
        try:
            if run_id:
                run = self.client.get_run(run_id)
                self.experiment_id = run.info.experiment_id
                self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items()])
            else:
                self.experiment_id = self._experiment_id(experiment)
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        except MlflowException as exc:
            raise TrackingUnavailable(f"cannot open an MLflow run at {redact(tracking_uri)}: {exc.message}") from None
        self.run_id = run.info.run_id
        self.run_name = run.info.run_name
        self.start_time_ms = run.info.start_time  # the workers' hardware samples count their steps from it

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, creating it if it is new. Two drivers starting at once (a user's sweep) may both
        find it missing; the one whose create loses the race reads the winner's."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    @classmethod
    def reopen(cls, tracking_uri: str, run_id: str) -> RunRecord:
        """An existing run, marked RUNNING again (`orch resume`): its params, metrics and artifacts stay."""
        record = cls.__new__(cls)
        record.client = open_client(tracking_uri)
        record.tracking_uri = tracking_uri
        run = record.client.get_run(run_id)
        record.experiment_id, record.run_id, record.run_name = run.info.experiment_id, run_id, run.info.run_name
        record.start_time_ms = run.info.start_time
        record.client.update_run(run_id, status="RUNNING")
        if "orch.error" in run.data.tags:  # how it ended before is kept in orch.resume.<n>.after
            record.client.delete_tag(run_id, "orch.error")
        return record

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key[:250], value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:MAX_PARAM_VALUE]) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_spec(self, spec: dict[str, Any]) -> None:
        redacted = _redact_tree(spec)
        self.log_text(yaml.safe_dump(redacted, sort_keys=False), "spec/resolved.yaml")

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str, error: str | None = None) -> None:
        """FINISHED, FAILED or KILLED; the error's text goes to a tag and an artifact for the UI."""
        if error:
            self.set_tags({"orch.error": error.strip().splitlines()[-1][:500] if error.strip() else error})
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder, "error.txt")
                path.write_text(error)
                self.log_file(path)
        self.client.set_terminated(self.run_id, status=status)

    def ui_url(self, host: str = "127.0.0.1", port: int = 5000) -> str:
        return f"http://{host}:{port}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or opened: nothing starts."""


def open_client(tracking_uri: str, patience_s: float = 60.0):
    """MLflow's client, which opens its store at once. A new sqlite store gets its schema from the first process to
    open it, and two drivers that start together on one (a user's sweep in a new folder) both run MLflow's
    migrations on the file: the slower fails partway (alembic's "Online migration expected to match one row") or
    finds the schema half made ("out-of-date database schema"). The other is finishing it meanwhile, so those
    errors are tried again for up to `patience_s`; any other, or one that outlasts it, stops the job clearly."""
    import time

    from mlflow import MlflowClient

    deadline = time.monotonic() + patience_s
    while True:
        try:
            return MlflowClient(tracking_uri)
        except Exception as exc:
            if not (tracking_uri.startswith("sqlite:") and _schema_in_the_making(exc)) or time.monotonic() > deadline:
                raise TrackingUnavailable(f"cannot open the MLflow store {redact(tracking_uri)}: "
                                          f"{type(exc).__name__}: {exc}") from None
            time.sleep(0.5)


def _schema_in_the_making(exc: Exception) -> bool:
    """The errors of a sqlite store whose schema another process is creating right now (open_client)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError, OperationalError

    if isinstance(exc, MlflowException):
        return "out-of-date database schema" in exc.message
    return isinstance(exc, (IntegrityError, OperationalError)) or type(exc).__module__.startswith("alembic")


def check_tracking(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Before Ray starts: a server must answer, a local store's folder must be writable."""
    import os
    import urllib.request

    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
                return
        except OSError as exc:
            raise TrackingUnavailable(
                f"the MLflow tracking server at {redact(tracking_uri)} does not answer ({exc}); start it, "
                f"or unset MLFLOW_TRACKING_URI / tracking.uri to use ./mlflow.db") from None
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(f"cannot write the MLflow store {tracking_uri}: {folder} is not a writable folder")


def _redact_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) else _redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_redact_tree(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree
