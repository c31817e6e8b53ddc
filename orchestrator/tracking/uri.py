"""Where runs are recorded: the spec's URI, else MLFLOW_TRACKING_URI, else ./mlflow.db, always absolute."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DB_NAME = "mlflow.db"


def resolve_tracking_uri(spec_uri: str | None = None, cwd: Path | None = None) -> str:
    """Ray Train workers change directory, so a relative sqlite path or folder would land elsewhere."""
    cwd = cwd or Path.cwd()
    uri = spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB_NAME}"
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith("/") and path != ":memory:":
            return f"sqlite:///{(cwd / path).resolve()}"
        return uri
    if uri.startswith("file:"):
        path = uri.removeprefix("file://").removeprefix("file:")
        return (cwd / path).resolve().as_uri()
    if "://" not in uri:  # a bare folder path is MLflow's file store
        return (cwd / uri).resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    """A store only this machine can read: fine locally, wrong for a multi-node cluster."""
    return uri.startswith(("sqlite:", "file:"))


def redact(uri: str) -> str:
    """Drop credentials from http://user:password@host URIs before they reach a log or a param."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
