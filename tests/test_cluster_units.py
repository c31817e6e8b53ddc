"""Fast checks of the cluster logic that needs no running cluster: fit arithmetic, multi-node rules, log labels."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from orchestrator.capacity import NodeOffer, assess, spans_hosts, workers_that_fit
from orchestrator.errors import SpecError
from orchestrator.multinode import check_multinode, is_shared_storage
from orchestrator.output_labels import LabelledStream, label_worker_output, relabel


def node(name, cpus, free=None, gpus=0, host="", labels=None):
    total = {"CPU": cpus, "GPU": gpus, "memory": 8e9}
    available = {"CPU": cpus if free is None else free, "GPU": gpus, "memory": 8e9}
    return NodeOffer(name, total, available, host=host or name, labels=labels or {})


def test_workers_that_fit_takes_the_scarcest_resource():
    assert workers_that_fit({"CPU": 8, "GPU": 2}, {"CPU": 2, "GPU": 1}) == 2
    assert workers_that_fit({"CPU": 1}, {"CPU": 2}) == 0


def test_more_than_the_cluster_has_is_refused_with_the_shortfall():
    verdict = assess(5, {"CPU": 1}, "PACK", [node("head", 4)])
    assert not verdict.possible
    assert verdict.problems == ["asks for 5 CPU (5 workers x 1); the cluster has 4 in all, short by 1"]


def test_gpus_on_a_cpu_cluster_are_refused():
    verdict = assess(2, {"CPU": 1, "GPU": 1}, "PACK", [node("a", 8), node("b", 8)])
    assert "asks for 2 GPU" in verdict.problems[0] and "short by 2" in verdict.problems[0]


def test_a_worker_larger_than_every_node_is_refused_even_when_the_sum_is_enough():
    verdict = assess(1, {"CPU": 3}, "PACK", [node("a", 2), node("b", 2)])
    assert verdict.problems == ["one worker needs 3 CPU on a single node; the largest node has 2 CPU. Lower "
                                "scaling.cpus_per_worker / gpus_per_worker or add larger nodes"]


def test_strict_spread_needs_as_many_nodes_as_workers():
    verdict = assess(3, {"CPU": 1}, "STRICT_SPREAD", [node("head", 4), node("node-2", 4)])
    assert "needs 3 nodes with 1 CPU free each; the cluster has 2 such node(s) (head, node-2), short by 1" in \
        verdict.problems[0]
    assert assess(2, {"CPU": 1}, "STRICT_SPREAD", [node("head", 4), node("node-2", 4)]).possible


def test_strict_pack_needs_one_node_for_all():
    verdict = assess(3, {"CPU": 1}, "STRICT_PACK", [node("a", 2), node("b", 2)])
    assert "at most 2 worker(s) on any single node" in verdict.problems[0]


def test_busy_resources_queue_the_job_and_say_why():
    verdict = assess(4, {"CPU": 1}, "PACK", [node("head", 4, free=2)])
    assert verdict.possible
    assert verdict.waiting.startswith("queued: other work holds the resources it needs (CPU 2 of 4 in use)")


def test_an_autoscaler_maximum_turns_a_shortfall_into_a_wait_or_a_refusal():
    head = node("head", 0, labels={"orch.io/max-GPU": "8", "orch.io/max-CPU": "64"})
    waits = assess(4, {"CPU": 1, "GPU": 1}, "PACK", [head])
    assert waits.possible and "waits for the autoscaler to add nodes" in waits.waiting
    refused = assess(16, {"CPU": 1, "GPU": 1}, "PACK", [head])
    assert "the autoscaler can grow the cluster to 8, short by 8" in " ".join(refused.problems)


def test_nodes_on_one_machine_do_not_span_hosts():
    assert not spans_hosts([node("head", 2, host="this machine"), node("node-2", 2, host="this machine")])
    assert spans_hosts([node("a", 2, host="10.0.0.1"), node("b", 2, host="10.0.0.2")])


class FakePlan:
    tracking_uri = "sqlite:////tmp/mlflow.db"
    storage_path = "/tmp/orch_runs"


def test_a_multi_machine_cluster_refuses_local_stores(tmp_path):
    """Two machines cannot exist here: the node list is the seam."""
    nodes = [node("a", 2, host="10.0.0.1"), node("b", 2, host="10.0.0.2")]
    with pytest.raises(SpecError) as caught:
        check_multinode("job.yaml", FakePlan(), nodes)
    fields = {problem.field for problem in caught.value.problems}
    assert fields == {"tracking.uri", "checkpoint.storage_path"}
    assert "spans 2 machines" in str(caught.value) and "s3:// / gs://" in str(caught.value)
    FakePlan.tracking_uri, FakePlan.storage_path = "http://10.0.0.1:5000", "s3://bucket/runs"
    check_multinode("job.yaml", FakePlan(), nodes)  # reachable by every node: accepted
    FakePlan.tracking_uri = "http://127.0.0.1:5000"
    with pytest.raises(SpecError, match="tracking.uri"):
        check_multinode("job.yaml", FakePlan(), nodes)
    check_multinode("job.yaml", FakePlan(), nodes[:1])  # one machine: anything local is fine


def test_local_folders_are_not_shared_storage(tmp_path):
    assert not is_shared_storage(str(tmp_path / "not" / "yet" / "there"))
    assert is_shared_storage("gs://bucket/runs")


def test_relabel_keeps_worker_labels_and_names_everything_else():
    names = {"127.0.0.2": "node-2"}
    assert relabel("09:00 epoch 1", "head", names) == "[driver @ head] 09:00 epoch 1"
    assert relabel("(RayTrainWorker pid=12, ip=127.0.0.2) [rank 1 @ node-2] hello", "head", names) == \
        "[rank 1 @ node-2] hello"
    assert relabel("(TrainController pid=7) Started", "head", names) == "[TrainController @ head] Started"
    assert relabel("(Other pid=7, ip=127.0.0.2) x", "head", names) == "[Other @ node-2] x"


def test_labelled_stream_prefixes_every_line_once():
    out = io.StringIO()
    stream = LabelledStream(out, "[rank 0 @ head] ")
    stream.write("a\nb")
    stream.write("c\n")
    stream.write("")
    stream.write("d\n")
    assert out.getvalue() == "[rank 0 @ head] a\n[rank 0 @ head] bc\n[rank 0 @ head] d\n"


def test_label_worker_output_covers_prints_and_existing_log_handlers(monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    logger = logging.getLogger("test_cluster_units.worker")
    handler = logging.StreamHandler(err)
    logger.addHandler(handler)
    try:
        label_worker_output(3, "node-2")
        print("from print")
        logger.warning("from logging")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "[rank 3 @ node-2] from print\n"
    assert err.getvalue() == "[rank 3 @ node-2] from logging\n"


@pytest.mark.parametrize("env, imported", [
    # Prestarted for no job, by a job of ours: warmed for the actor that had such a process. Never MLflow: a
    # worker's metrics go through the driver (tracking/relay.py).
    ({"ORCH_WARM": "worker", "RAY_JOB_ID": "ffffffff"}, "torch ray.train ray.train.torch lightning.pytorch warmed"),
    ({"ORCH_WARM": "worker-sqlite", "RAY_JOB_ID": "ffffffff"}, ""),  # an older orch's tier: it imported MLflow
    ({"ORCH_WARM": "job", "RAY_JOB_ID": "ffffffff"}, "ray.train warmed"),  # Ray Train's controller: no PyTorch
    # Prestarted beside a cold start: the same imports.
    ({"ORCH_WARM": "worker-cold", "RAY_JOB_ID": "ffffffff"}, "torch ray.train ray.train.torch lightning.pytorch warmed"),
    ({"ORCH_WARM": "worker", "RAY_JOB_ID": "03000000"}, ""),  # started for a running job: it imports what it needs
    ({"RAY_JOB_ID": "ffffffff"}, ""),  # someone else's prestarted process (Ray's own, another project)
    ({"ORCH_WARM": "1", "RAY_JOB_ID": "ffffffff"}, ""),  # a tier this version does not know (an older orch's job)
])
def test_preload_warms_only_processes_prestarted_for_our_next_job(env, imported):
    base = {k: v for k, v in os.environ.items() if k not in ("ORCH_WARM", "RAY_JOB_ID")}
    probe = subprocess.run([sys.executable, "-c", "import sys, orchestrator.preload as p; print(*[m for m in ("
                            "'torch', 'ray.train', 'ray.train.torch', 'lightning.pytorch', 'mlflow', "
                            "'mlflow.store.tracking.sqlalchemy_store') if m in sys.modules], *['warmed'] * p.warmed)"],
                           env=base | env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == imported.split()  # the worker reads `warmed` to report and fix threads


def test_warm_pool_env_keeps_the_users_preloads_and_names_ours_once(monkeypatch):
    from orchestrator.warm_pool import warm_pool_env

    monkeypatch.setenv("RAY_preload_python_modules", "numpy,orchestrator.preload")
    monkeypatch.delenv("RAY_worker_maximum_startup_concurrency", raising=False)
    env = warm_pool_env()
    assert env["RAY_preload_python_modules"] == "numpy,orchestrator.preload"
    assert int(env["RAY_worker_maximum_startup_concurrency"]) >= 16


def test_cold_prestart_predicts_what_ray_train_propagates_without_importing_it(monkeypatch):
    """The cold prestart reads Ray Train's propagation rules from its constants file alone (warm_pool.py);
    a Ray that moves or changes them must fail here, not leave a user's prestarted processes untaken."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "61")
    monkeypatch.setenv("ORCH_UNRELATED", "x")
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, json; from orchestrator.warm_pool import _ray_train_propagated_env as p; ours = p(); "
        "assert 'ray.train' not in sys.modules, 'imported Ray Train'; "
        "from ray.train.v2._internal.constants import get_env_vars_to_propagate as g; "
        "print(json.dumps([ours, g()]))")], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    ours, ray_trains = json.loads(probe.stdout)
    assert ours == ray_trains
    assert ours["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "61" and "ORCH_UNRELATED" not in ours


def test_cold_prestart_environments_are_rays_compact_sorted_json(monkeypatch):
    from orchestrator.warm_pool import predicted_runtime_envs

    monkeypatch.setattr("orchestrator.warm_pool._ray_train_propagated_env", lambda: {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"})
    helpers, workers = predicted_runtime_envs({"PYTHONPATH": "/p/é", "ORCH_WARM": "job", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"},
                                              "worker-cold")
    # The driver's propagated value wins over the job's (Ray Train sets it on the controller's own environment).
    assert helpers == ('{"env_vars":{"ORCH_WARM":"job","PYTHONPATH":"/p/é","RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":"1",'
                       '"RAY_WARN_BLOCKING_GET_INSIDE_ASYNC":"0"}}')
    assert workers == helpers.replace('"ORCH_WARM":"job"', '"ORCH_WARM":"worker-cold"')
