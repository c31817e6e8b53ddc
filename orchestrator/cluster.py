"""Connecting the driver to Ray: an in-process local cluster on 127.0.0.1 by default, or a named address."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"


def quiet_ray_environment(verbose: bool) -> None:
    """Set before Ray is imported: token auth on, and none of the known noise in a user's terminal."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # also silences the "token auth enabled" warning
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # no duplicated print lines


def worker_env(project_dir: Path, verbose: bool) -> dict[str, str]:
    """Workers import the user's modules from the project folder, wherever Ray puts their cwd."""
    parts = [str(project_dir.resolve())]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    env = {
        "PYTHONPATH": os.pathsep.join(parts),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # Ray Train's controller polls workers every 2 s and each worker's report queue holds one entry,
        # so a report waits up to 2 s for the previous one to be taken: checkpoints of short epochs stall.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
        # MLflow's client retries a dead server for minutes inside one call; the metric sender retries on its
        # own (tracking/logger.py), so a call fails fast and the metrics go out soon after the server is back.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
    }
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def requested_address(spec_address: str | None) -> str | None:
    """The spec's cluster.address, else RAY_ADDRESS (Ray's own convention); None means the local default."""
    address = spec_address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


def connect(address: str | None, verbose: bool, project_dir: Path | None = None) -> str:
    """Start or join Ray; returns a short description of where the job runs."""
    quiet_ray_environment(verbose)
    import ray

    if ray.is_initialized():
        return "already connected"
    address = requested_address(address)
    common = dict(logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose,
                  configure_logging=True, runtime_env={"env_vars": worker_env(project_dir or Path.cwd(), verbose)})
    if address is None:
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            include_dashboard=True,  # the state API behind it keeps Ray Train's controller from erroring
            dashboard_host=LOOPBACK,
            **common,
        )
        return f"local Ray on {LOOPBACK}"
    check_reachable(address)
    ray.init(address=address, **common)
    return f"Ray cluster at {address}"


class ClusterUnavailable(RuntimeError):
    """The named cluster cannot be reached: nothing was started."""


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with a clear message; ray.init would retry an unreachable address for minutes."""
    if address == "auto" or "://" in address:
        return  # "auto" finds a local head by its files; ray:// goes through Ray Client
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"cluster address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnavailable(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            f"`ray start --head` or unset cluster.address / RAY_ADDRESS to use the local default") from None


def check_cluster_fit(source: str, num_workers: int, per_worker: dict[str, float]) -> None:
    """Refuse a request the joined cluster can never hold, rather than wait on it forever."""
    import ray

    from orchestrator.errors import Problem, ResourceError

    total = ray.cluster_resources()
    problems = []
    for resource, amount in per_worker.items():
        wanted = amount * num_workers
        have = total.get(resource, 0)
        if wanted > have:
            problems.append(Problem(source, "scaling", (
                f"asks for {wanted:g} {resource} ({num_workers} workers x {amount:g}); the cluster has {have:g} "
                f"in all, short by {wanted - have:g}")))
    if problems:
        raise ResourceError(problems)


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
