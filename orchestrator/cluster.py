"""Connecting the driver to Ray: an in-process local cluster on 127.0.0.1 by default, or a named address."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Callable

from orchestrator.errors import is_import_deadlock

LOOPBACK = "127.0.0.1"


def quiet_ray_environment(verbose: bool, address: str | None = None) -> None:
    """Set before Ray is imported: token auth on, and none of the known noise in a user's terminal."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # also silences the "token auth enabled" warning
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # no duplicated print lines
    if not verbose:
        # Importing MLflow sets its loggers to this level (INFO by default), whatever was set on them before: a
        # new store's "Creating initial MLflow database tables..." would reach the terminal of a user's first run.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if address is None or address.rpartition(":")[0] in (LOOPBACK, "localhost"):
        # Ray swaps 127.0.0.1 for the machine's LAN address, and then listens on every interface, unless it
        # believes it runs a single-machine cluster: this keeps the local cluster and its clients on loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def worker_env(project_dir: Path, verbose: bool) -> dict[str, str]:
    """Workers import the user's modules from the project folder, wherever Ray puts their cwd."""
    from orchestrator.warm_pool import JOB_TIER, TIER_ENV_VAR

    parts = [str(project_dir.resolve())]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    env = {
        "PYTHONPATH": os.pathsep.join(parts),
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        # Ray starts worker processes at nice 15, below its own daemons; for training ranks that means every
        # busy process at the default priority (the driver, the GCS, a user's editor) runs first, where
        # torchrun's ranks compete as equals. Ray's Jobs API sets 0 for its drivers the same way.
        "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
        # Ray Train's controller polls workers every 2 s and each worker's report queue holds one entry,
        # so a report waits up to 2 s for the previous one to be taken: checkpoints of short epochs stall.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
        # MLflow's client retries a dead server for minutes inside one call; the metric sender retries on its
        # own (tracking/sender.py), so a call fails fast and the metrics go out soon after the server is back.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "30"),
        # Processes prestarted with this environment import what the job's actors need (preload.py); Ray Train's
        # workers override it with the worker tier (launch.py).
        TIER_ENV_VAR: JOB_TIER,
    }
    if os.environ.get("ORCH_LIGHTNING_SIGTERM_BROADCAST"):  # an A/B switch (faults.py), passed only when set
        env["ORCH_LIGHTNING_SIGTERM_BROADCAST"] = os.environ["ORCH_LIGHTNING_SIGTERM_BROADCAST"]
    if os.environ.get("ORCH_RAY_JOB_ID") and os.environ.get("RAY_ADDRESS"):
        # Ray Train's helper actors find the cluster by address; "auto" is ambiguous with two clusters on a machine.
        env["RAY_ADDRESS"] = os.environ["RAY_ADDRESS"]
    if not verbose:
        env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def requested_address(spec_address: str | None) -> str | None:
    """cluster.address (which `--cluster` sets), else ORCH_CLUSTER, else RAY_ADDRESS; None means the local default.

    http(s)://HOST:PORT is a Ray dashboard: the job is sent through Ray's Jobs API (orchestrator.remote_submit).
    HOST:PORT, `auto` and ray:// join the cluster directly, this process being the driver.
    """
    address = spec_address or os.environ.get("ORCH_CLUSTER") or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


def connect(address: str | None, verbose: bool, project_dir: Path | None = None) -> str:
    """Start or join Ray; returns a short description of where the job runs."""
    address = requested_address(address)
    quiet_ray_environment(verbose, address)
    import ray

    if ray.is_initialized():
        return "already connected"
    # A Ray job's log is its driver's output: the workers' lines (labelled by rank and node) belong there.
    log_to_driver = verbose or bool(os.environ.get("ORCH_RAY_JOB_ID"))
    common = dict(logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=log_to_driver,
                  configure_logging=True, runtime_env={"env_vars": worker_env(project_dir or Path.cwd(), verbose)})
    if address is None:
        from orchestrator.local_ray import lean_head_node, lean_local_ray

        lean_local_ray()
        with lean_head_node(log_monitor=log_to_driver):
            ray.init(
                address="local",
                _node_ip_address=LOOPBACK,
                # Nothing of ours needs the dashboard on an in-process cluster, and it is a dozen Python processes
                # (its modules run in their own): seconds of CPU on a small machine, before the first step.
                include_dashboard=False,
                **common,
            )
        global _started_here
        _started_here = True
        return f"local Ray on {LOOPBACK}"
    check_reachable(address)
    ray.init(address=address, **common)
    return f"Ray cluster at {address}"


class LocalRayStart:
    """The local default's Ray, started in a thread while the driver imports and plans the job's model.

    Ray's start is mostly other processes booting (GCS, raylet, Ray's Python daemons: ~4-9 s of CPU on the
    other core of a small machine); the plan is this process importing Lightning (~3-10 s on one core). One
    after the other they added up; side by side they take about as long as the longer of the two. Ray is
    imported here, before the thread, so that the two threads import mostly disjoint modules.

    The thread stays alive until Ray is shut down: Ray starts its daemons with PR_SET_PDEATHSIG, which Linux
    ties to the *thread* that spawned them, so they would be killed the moment a finished starter thread exits.
    """

    def __init__(self, verbose: bool, prestart: Callable[[], object] | None = None, worker_plan=None):
        """`prestart`: called in the thread once Ray is up (warm_pool.prestart_for_this_job), best effort;
        `worker_plan`: the model's plan, asked of those processes (worker_plan.WorkerPlan), for the driver."""
        self.worker_plan = worker_plan
        quiet_ray_environment(verbose)
        if prestart is not None:
            from orchestrator.warm_pool import warm_pool_env

            os.environ.update(warm_pool_env())  # read by the raylet ray.init starts
        import ray  # noqa: F401

        global _starter_released
        self._verbose = verbose
        self._prestart = prestart
        self._error: BaseException | None = None
        self._ready = threading.Event()
        _starter_released = self._released = threading.Event()
        self._thread = threading.Thread(target=self._start, name="orch-ray-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        quiet = _NotMainThreadFilter()  # ray.init warns that, off the main thread, it sets no SIGTERM handler:
        logging.getLogger("ray._private.worker").addFilter(quiet)  # the driver installs its own (launch.py)
        try:
            connect(None, self._verbose)
        except BaseException as exc:  # handed to whoever waits
            self._error = exc
            return
        finally:
            logging.getLogger("ray._private.worker").removeFilter(quiet)
            self._ready.set()
        if self._prestart is not None:
            self._prestart()  # must not raise: this thread has to live on (above)
        self._released.wait()  # until disconnect(): Ray's daemons live as long as this thread

    def starter_alive(self) -> bool:
        """Whether the starter thread still runs (it does until Ray is shut down, unless Ray failed in it)."""
        return self._thread.is_alive()

    def settle(self) -> None:
        """Until Ray is up or failed to start."""
        while not self._ready.wait(timeout=0.2):  # in slices: Ctrl-C reaches the main thread meanwhile
            pass

    def wait(self) -> None:
        """Until Ray is up; raises what stopped it. A module-lock deadlock between the two threads' imports
        (CPython detects and breaks it) is retried here, on the main thread."""
        self.settle()
        if self._error is not None and is_import_deadlock(self._error):
            import ray

            self._error = None
            ray.shutdown()  # whatever the broken attempt had started
            connect(None, self._verbose)
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """The job will not run (bad spec, Ctrl-C): let Ray finish starting, then stop it; nothing is left."""
        self.settle()
        disconnect()


_starter_released: threading.Event | None = None  # set to let LocalRayStart's thread end, once Ray is shut down


class _NotMainThreadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


_started_here = False


def lean_loopback_cluster() -> None:
    """A joined cluster whose every node listens on loopback is this machine alone: no other can join it.

    Ray Train's preemption watcher waits for a cloud provider to drain a node; here it has nothing to watch, and
    it is one more process, started as training begins (~1-3 s of CPU taken from the first epochs on a small
    machine, measured). `orch cluster up --local` makes such clusters.
    """
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if nodes and all(node.get("NodeManagerAddress") in (LOOPBACK, "localhost") for node in nodes):
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def started_here() -> bool:
    """True when this process started the Ray cluster it is connected to (the local default)."""
    return _started_here


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


def cluster_nodes() -> list:
    """The joined cluster's alive nodes, with what is free on each now."""
    import ray

    from orchestrator.capacity import NodeOffer

    try:
        from ray._private.state import available_resources_per_node  # per node; the public call sums them
        free = available_resources_per_node()
    except Exception:
        free = {}
    return [NodeOffer(name=node.get("NodeName") or node["NodeManagerAddress"], total=dict(node["Resources"]),
                      available=dict(free.get(node["NodeID"], node["Resources"])),
                      host=node.get("NodeManagerHostname") or node["NodeManagerAddress"],
                      labels=dict(node.get("Labels") or {}))
            for node in sorted(ray.nodes(), key=lambda n: n.get("NodeName") or "") if node.get("Alive")]


def check_cluster_fit(source: str, plan) -> str | None:
    """Refuse what the joined cluster can never hold (placement included); return why it must wait, if it must."""
    from orchestrator.capacity import assess
    from orchestrator.errors import Problem, ResourceError
    from orchestrator.multinode import check_multinode

    nodes = cluster_nodes()
    verdict = assess(plan.world_size, plan.resources_per_worker, plan.placement, nodes)
    if not verdict.possible:
        raise ResourceError([Problem(source, "scaling", problem) for problem in verdict.problems])
    check_multinode(source, plan, nodes)
    return verdict.waiting


def disconnect() -> None:
    import ray

    global _started_here
    if ray.is_initialized():
        ray.shutdown()
    _started_here = False
    if _starter_released is not None:  # after the shutdown: the daemons are gone, their starter may end
        _starter_released.set()
