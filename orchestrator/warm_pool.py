"""Warm worker processes kept between jobs on a cluster that asks for them: the next job skips process start-up.

Ray starts a fresh Python process for every actor of a job, and each of ours then imports PyTorch, Lightning,
Ray Train and MLflow: seconds per process before the first step, paid again by every `orch submit`. Ray Train
has no worker reuse, and Ray keeps idle processes only for the job that started them. What Ray does offer is a
raylet that prestarts processes bound to no job, for a given runtime environment, kept alive for a while, and a
hook that imports modules in every new worker process (RAY_preload_python_modules). So, on a node labelled
WARM_POOL_LABEL (`orch cluster up --local` does it, see local_cluster.py):

1. when a job ends, its driver asks each raylet for as many processes as the job's actors (Ray Train's
   controller, workers and helpers) used there, with the very runtime environment each
   had (read back from Ray's actor table);
2. those processes start with no job, and orchestrator.preload imports in them what their tier of actor needs
   (WARM_IMPORTS: Lightning and MLflow for Ray Train's workers, Ray Train alone for the rest);
3. the next job with the same environment (same project, same settings) gets them for its actors.

Fault tolerance is untouched: Ray Train still creates, watches and replaces its workers; a warm process is only
a faster place for an actor to start. Nothing here may fail a job: every step is best effort and uses Ray's
private interfaces (the actor table, the raylet's PrestartWorkers call), so any error only means a cold start.
"""

from __future__ import annotations

import collections
import logging
import os

WARM_POOL_LABEL = "orch.io/warm-pool-s"  # on a node: keep warm processes this many seconds; 0 or absent: none
# What orchestrator.preload imports in a prestarted process, by the ORCH_WARM value of the environment it was
# started with: a process is warmed for what the actor that will take it needs, and no more. Importing everything
# everywhere cost ~4.5 s of CPU and ~0.4 GiB per process, for actors that never touch Lightning or MLflow.
# Not orchestrator's own modules: a process kept warm across an upgrade of orch would run the old code.
TIER_ENV_VAR = "ORCH_WARM"  # in an actor's environment: which WARM_IMPORTS a process kept for it imports
WORKER_TIER = "worker"  # Ray Train's workers (launch.py sets it in RunConfig.worker_runtime_env)
SQLITE_WORKER_TIER = "worker-sqlite"  # the same, for a job whose MLflow store is a sqlite file (worker_tier())
JOB_TIER = "job"  # Ray Train's controller and helpers (cluster.worker_env sets it for the whole job)
_WORKER_IMPORTS = ("torch", "lightning.pytorch", "ray.train.torch", "ray.train.lightning", "mlflow")
WARM_IMPORTS = {
    WORKER_TIER: _WORKER_IMPORTS,
    # MLflow's SQL store is most of the cost of rank 0's first MLflow client (~0.6 s of CPU on a small machine,
    # 45 MB): worth keeping warm only for jobs that write to a sqlite file rather than to a tracking server.
    SQLITE_WORKER_TIER: (*_WORKER_IMPORTS, "mlflow.store.tracking.sqlalchemy_store"),
    # Ray Train's controller, its synchronization actor and helpers share one environment, so Ray may give any
    # of them any of these processes: all of them import Ray Train (with Ray Data and pandas, ~1.8 s of CPU on a
    # small machine), none PyTorch (lean_controller keeps it out of the controller).
    JOB_TIER: ("ray.train",),
}

log = logging.getLogger(__name__)


def worker_tier(tracking_uri: str) -> str:
    """The warm tier for Ray Train's workers of a job that tracks to `tracking_uri`."""
    return SQLITE_WORKER_TIER if tracking_uri.startswith("sqlite:") else WORKER_TIER


def tier_runtime_env(tier: str) -> dict[str, dict[str, str]]:
    """An actor's runtime_env naming its warm tier; Ray merges it over the job's, which names JOB_TIER."""
    return {"env_vars": {TIER_ENV_VAR: tier}}


def warm_pool_env() -> dict[str, str]:
    """Set where a node's Ray starts (`ray start`), with the WARM_POOL_LABEL label, to keep warm processes there."""
    preload = [name for name in os.environ.get("RAY_preload_python_modules", "").split(",") if name]
    return {
        "RAY_preload_python_modules": ",".join(dict.fromkeys([*preload, "orchestrator.preload"])),
        # The raylet drops a prestart request beyond this many processes starting at once (default: the CPU
        # count, 2 on a small machine); a job leaves its workers and about five helper actors to replace.
        "RAY_worker_maximum_startup_concurrency": os.environ.get(
            "RAY_worker_maximum_startup_concurrency", str(max(16, os.cpu_count() or 1))),
    }


def refill() -> int:
    """Ask for warm processes to replace the ones this job's actors used; returns how many were asked for."""
    try:
        return _refill()
    except Exception as exc:  # private Ray interfaces: a cold start next time, never a failed job
        log.debug("warm pool: refill skipped (%s: %s)", type(exc).__name__, exc)
        return 0


def _refill() -> int:
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray._private.state import state as global_state
    from ray.core.generated import common_pb2, gcs_pb2, node_manager_pb2, node_manager_pb2_grpc

    if not ray.is_initialized():
        return 0
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    keep_alive = {node["NodeID"]: int(float((node.get("Labels") or {}).get(WARM_POOL_LABEL, 0) or 0)) for node in nodes}
    if not any(keep_alive.values()):
        return 0
    raylets = {node["NodeID"]: f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}" for node in nodes}
    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    actors = [gcs_pb2.ActorTableData.FromString(row)
              for row in global_state._connect_and_get_accessor().get_actor_table(job_id, None)]
    wanted = collections.Counter(
        (actor.address.node_id.hex(), actor.serialized_runtime_env) for actor in actors
        # Every actor of the job had a process of its own (Ray Train's controller, workers and helpers), detached
        # ones included: a detached helper that each job starts anew (as Ray Train's placement group cleaner was,
        # before lean_train left it out) would otherwise take a warm process from the next job's helpers, and one
        # of them would start cold (~3 s of CPU at the first step on a small machine).
        if actor.pid and keep_alive.get(actor.address.node_id.hex()))
    asked = 0
    for (node_id, runtime_env), count in wanted.items():
        request = node_manager_pb2.PrestartWorkersRequest(
            language=common_pb2.PYTHON, num_workers=count, keep_alive_duration_secs=keep_alive[node_id])
        request.runtime_env_info.serialized_runtime_env = runtime_env  # no job_id: any later job may take them
        channel = init_grpc_channel(raylets[node_id])
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=5)
        finally:
            channel.close()
        asked += count
    log.debug("warm pool: asked for %d process(es) on %d node(s)", asked, len({node for node, _ in wanted}))
    return asked
