"""The local default's in-process cluster, made lean: Ray's and Ray Train's services that serve nothing there, off.

That cluster is started by `orch submit` for one job and ends with it, on the user's machine alone (no other node
can join it, nothing scales it, no dashboard is served): on a small machine every service left out is CPU given
back to the job's start-up and training. Clusters users start (`orch cluster up`, `ray start`) are untouched.
"""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def lean_head_node(log_monitor: bool):
    """ray.init for the in-process cluster, without the head's Python services that serve nothing there.

    - the API server: with include_dashboard=False it still starts, loading only Ray's usage-stats module (the
      job and state APIs are not loaded either, ray/_private/services.py), and ray.init waits for it to post its
      address before it even starts the raylet: ~0.9 s of every cold start, and ~0.7 s of CPU;
    - the autoscaler's monitor: it scales clusters that a cloud or KubeRay config describes; this one has none,
      never grows, and Ray Train's requests to it are left out too (lean_train); ~0.35 s of CPU, then a poll;
    - unless the driver shows the workers' output (--verbose, log_to_driver), the log monitor, which publishes
      the workers' log lines to drivers and to nobody else: ~0.3 s of CPU, then a rescan of the log folder.
    And every worker process starts through orchestrator/setup_worker.py instead of Ray's setup_worker.py, which
    imports Ray only to set the runtime environment's variables before exec'ing the worker (that imports Ray
    again): ~0.4 s of CPU per process, and spawn to a connected worker 0.9-1.2 s instead of 1.7-2.5 s for the
    four processes a cold start prestarts at once (measured from Ray's own logs, 2 cores). ORCH_RAY_SETUP_WORKER=1
    keeps Ray's, for an A/B.
    RayParams has switches for the monitors (no_monitor, include_log_monitor) and the worker's set-up script
    (setup_worker_path) that ray.init does not pass on, and none for the API server, so the head node's methods
    are stood in for while ray.init runs; the cluster's own work (GCS, raylet, the agents) and every other
    cluster, joined or started by `orch cluster up`, are untouched. `ray.init` is called from one thread at a
    time (Ray's connect lock)."""
    from ray._private.node import Node

    def skipped(self, *args, **kwargs) -> None:
        return None

    def init_with_lean_worker_start(self, ray_params, *args, **kwargs):
        from orchestrator import setup_worker

        if os.environ.get("ORCH_RAY_SETUP_WORKER") != "1":  # (=1: Ray's own, for an A/B)
            ray_params.setup_worker_path = setup_worker.__file__  # kept: Node fills in only what is absent
        original_init(self, ray_params, *args, **kwargs)

    names = ["start_api_server", "start_monitor"] + ([] if log_monitor else ["start_log_monitor"])
    originals = {name: Node.__dict__[name] for name in names + ["__init__"]}
    original_init = originals["__init__"]
    for name in names:
        setattr(Node, name, skipped)
    Node.__init__ = init_with_lean_worker_start
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(Node, name, original)


def lean_local_ray() -> None:
    """Ray Train's helpers and Ray's chores that serve long-lived shared clusters, off for the cluster this process
    starts and ends.

    Each is one more Python process (about a second of CPU to start on a small machine, all before the first
    step) and none can act here: the preemption watcher looks for nodes being drained, which an in-process
    cluster never is; Ray Train's Prometheus metrics need the dashboard's agent to be exported. The Ray
    Datasets manager and the autoscaling coordinator are left out by the trainer (lean_train.OrchTorchTrainer),
    as is the placement group cleaner on every cluster. Set
    before the trainer is built: the driver reads them and Ray Train hands them on to its controller.
    """
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # The raylet starts one idle process per CPU when the first driver connects, for tasks with no runtime
    # environment; every actor of ours has one (cluster.worker_env), so they would only take CPU from start-up.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Two of Ray's own background chores that nothing reads on this cluster, yet run beside two training ranks
    # that fill a small machine's cores (measured per process in steady 2-worker training on 2 cores, README):
    # - Ray's metrics: every process records them and exports them through the dashboard agent every 10 s, for
    #   a Prometheus that scrapes the dashboard, which this cluster does not run (1.7 -> 0.7 % of a core in
    #   the agent alone);
    # - (the autoscaler monitor no longer runs there, nor, unless --verbose, the log monitor, which rescanned the
    #   log folder 10 times a second to publish to nobody: lean_head_node)
    # - task events: every process sends the GCS what its tasks did once a second, for `ray list tasks` and the
    #   dashboard's task pages; Ray Train's controller polls each worker 4 times a second (worker_env), and an
    #   in-process cluster has no dashboard and ends with the job. Sent every 10 s instead, the controller, the
    #   synchronization actor, the GCS and the driver took 1.8 % of a core less between them.
    # Each process reads these from the environment it inherits from this one as it starts.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    os.environ.setdefault("RAY_task_events_report_interval_ms", "10000")
