"""Warm worker processes kept between jobs on a cluster that asks for them: the next job skips process start-up.

Ray starts a fresh Python process for every actor of a job, and each of ours then imports PyTorch, Lightning
and Ray Train: seconds per process before the first step, paid again by every `orch submit`. Ray Train
has no worker reuse, and Ray keeps idle processes only for the job that started them. What Ray does offer is a
raylet that prestarts processes bound to no job, for a given runtime environment, kept alive for a while, and a
hook that imports modules in every new worker process (RAY_preload_python_modules). So, on a node labelled
WARM_POOL_LABEL (`orch cluster up --local` does it, see local_cluster.py):

1. when a job ends, its driver asks each raylet for as many processes as the job's actors (Ray Train's
   controller, workers and helpers) used there, with the very runtime environment each
   had (read back from Ray's actor table);
2. those processes start with no job, and orchestrator.preload imports in them what their tier of actor needs
   (WARM_IMPORTS: Lightning for Ray Train's workers, Ray Train alone for the rest; no worker imports MLflow,
   its metrics go through the driver: tracking/relay.py);
3. the next job with the same environment (same project, same settings) gets them for its actors.

The local default's own cluster (cold: started by `orch submit`, gone with it) has no earlier job to learn from,
so prestart_for_this_job() predicts the environments instead and asks for this job's processes as soon as its
Ray is up, to import beside the driver's planning (COLD_WORKER_TIER).

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
JOB_TIER = "job"  # Ray Train's controller and helpers (cluster.worker_env sets it for the whole job)
COLD_WORKER_TIER = "worker-cold"  # Ray Train's workers on the local default's own cluster (prestart_for_this_job)
_TRAINING_IMPORTS = ("torch", "lightning.pytorch", "ray.train.torch", "ray.train.lightning")
WARM_IMPORTS = {
    WORKER_TIER: _TRAINING_IMPORTS,
    # The same imports; a tier of its own because a cold start's processes also answer its plan (worker_plan.py).
    COLD_WORKER_TIER: _TRAINING_IMPORTS,
    # Ray Train's controller, its synchronization actor and helpers share one environment, so Ray may give any
    # of them any of these processes: all of them import Ray Train (with Ray Data and pandas, ~1.8 s of CPU on a
    # small machine), none PyTorch (lean_controller keeps it out of the controller).
    JOB_TIER: ("ray.train",),
}

log = logging.getLogger(__name__)


def worker_tier(cold: bool = False) -> str:
    """The warm tier for Ray Train's workers; `cold`: on a cluster the job's own driver started
    (cluster.started_here), whose processes are prestarted while it starts."""
    return COLD_WORKER_TIER if cold else WORKER_TIER


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
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2

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
        _prestart(raylets[node_id], runtime_env, count, keep_alive[node_id])
        asked += count
    log.debug("warm pool: asked for %d process(es) on %d node(s)", asked, len({node for node, _ in wanted}))
    return asked


def _prestart(raylet_address: str, serialized_runtime_env: str, count: int, keep_alive_s: int) -> None:
    """Ask one raylet for `count` processes bound to no job (any job may take them) in that runtime environment."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    request = node_manager_pb2.PrestartWorkersRequest(
        language=common_pb2.PYTHON, num_workers=count, keep_alive_duration_secs=keep_alive_s)
    request.runtime_env_info.serialized_runtime_env = serialized_runtime_env
    channel = init_grpc_channel(raylet_address)
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(request, timeout=5)
    finally:
        channel.close()


# Ray Train's controller and its synchronization actor: the job's actors besides its workers (read off a local
# job's actor table; the cold digits test in test_submit.py checks that its workers took the prestarted processes).
HELPER_ACTORS = 2
COLD_KEEP_ALIVE_S = 600  # a prestarted process not taken by then is Ray's to reap; the local cluster ends sooner


def prestart_for_this_job(num_workers: int) -> int:
    """A cold start of the local default: processes for this job's actors, asked for as soon as Ray is up.

    Until the plan is done the driver imports Lightning on one core and the other is mostly idle (~2-3 s on a
    2-core machine, measured per process); Ray Train asks for its controller only after the plan, and for its
    workers after the controller, each then a new process importing what it needs (~8 s to the workers' set-up).
    Prestarted now, in exactly the runtime environments Ray Train will give those actors, the processes import
    their tier (preload.py) beside the driver, and Ray hands them to the actors as they are created.
    Best effort, like refill(): a wrong guess only leaves processes that no actor takes (Ray reaps them).
    The local default's Ray must start with warm_pool_env(), so that its raylet preloads and starts them all.
    """
    try:
        return _prestart_for_this_job(num_workers)
    except Exception as exc:
        log.debug("warm pool: cold prestart skipped (%s: %s)", type(exc).__name__, exc)
        return 0


def _prestart_for_this_job(num_workers: int) -> int:
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1:
        return 0
    raylet = f"{nodes[0]['NodeManagerAddress']}:{nodes[0]['NodeManagerPort']}"
    helpers, workers = predicted_runtime_envs(ray.get_runtime_context().runtime_env.get("env_vars") or {},
                                              worker_tier(cold=True))
    _prestart(raylet, helpers, HELPER_ACTORS, COLD_KEEP_ALIVE_S)
    _prestart(raylet, workers, num_workers, COLD_KEEP_ALIVE_S)
    log.debug("warm pool: prestarted %d process(es) for this job", HELPER_ACTORS + num_workers)
    return HELPER_ACTORS + num_workers


def predicted_runtime_envs(job_env_vars: dict[str, str], tier: str) -> tuple[str, str]:
    """The serialized runtime environments Ray will record for this job's helper actors and for its workers.

    Ray Train gives its controller the job's environment plus the variables it propagates from the driver's
    environment (and RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0); the controller's synchronization actor inherits it,
    and the workers add their warm tier (launch.py) on top. Ray matches a process to an actor by the hash of
    this exact string, which its core worker writes as compact JSON with sorted keys.
    """
    propagated = _ray_train_propagated_env()
    propagated.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
    helpers = {**job_env_vars, **propagated}
    workers = {**helpers, **tier_runtime_env(tier)["env_vars"]}
    return _serialized(helpers), _serialized(workers)


def _serialized(env_vars: dict[str, str]) -> str:
    import json

    return json.dumps({"env_vars": env_vars}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _ray_train_propagated_env() -> dict[str, str]:
    """What Ray Train's get_env_vars_to_propagate() will return, without importing ray.train.

    Importing it here would import Ray Train (with Ray Data, pandas and pyarrow) in Ray's starter thread while the
    main thread imports Lightning, and two threads importing the same modules can deadlock (errors.py). Its
    constants module imports only two light Ray modules, so it is loaded on its own, from its file.
    """
    import importlib.util
    from pathlib import Path

    import ray

    path = Path(ray.__file__).parent / "train" / "v2" / "_internal" / "constants.py"
    spec = importlib.util.spec_from_file_location("_orch_ray_train_constants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_env_vars_to_propagate()
