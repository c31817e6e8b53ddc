"""The definitions in cluster/: launcher configs against Ray's own JSON schema, the KubeRay manifest's structure.

No cloud is reachable here, so these check everything short of creating machines: that Ray's launcher would
accept each file, and that each installs this project, starts MLflow on the head, keeps token auth on, and
declares autoscaler limits that match its node types.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from orchestrator.capacity import MAX_LABEL_PREFIX
from orchestrator.launcher import autoscaler_maxima, check_config, head_labels, load_config

LAUNCHER_CONFIGS = sorted(p for p in (REPO / "cluster").glob("*.yaml") if "kind:" not in p.read_text())
KUBERAY = REPO / "cluster" / "kuberay.yaml"


def test_every_cloud_has_a_launcher_config():
    assert {p.name for p in LAUNCHER_CONFIGS} == {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_complete(path: Path):
    assert check_config(path) == []
    config = load_config(path)
    assert config["provider"]["type"] == path.stem
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "GPU worker types"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers.values()), "autoscaling bounds"
    assert any("pip install" in c and "orchestrator" in c for c in config["setup_commands"]), "installs the project"
    assert config["file_mounts"]["~/orchestrator"] == "."
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_commands and "--dashboard-host=127.0.0.1" in head_commands
    assert "RAY_JOB_STOP_WAIT_TIME_S" in head_commands and "ORCH_STORAGE_PATH" in head_commands


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_schema_and_consistency_checks_catch_mistakes(path: Path, tmp_path: Path):
    config = load_config(path)
    target = tmp_path / path.name
    malformed = copy.deepcopy(config)
    malformed["max_wokers"] = 3  # a typo Ray's schema rejects (additionalProperties: false)
    malformed["available_node_types"][config["head_node_type"]]["resources"] = "8 CPUs"
    target.write_text(yaml.safe_dump(malformed))
    problems = "\n".join(check_config(target))
    assert "max_wokers" in problems and "'8 CPUs' is not of type 'object'" in problems

    inconsistent = copy.deepcopy(config)
    gpu_type = next(n for n, t in config["available_node_types"].items() if t["resources"].get("GPU"))
    inconsistent["available_node_types"][gpu_type]["max_workers"] += 1  # the max-GPU label no longer adds up
    inconsistent["max_workers"] += 1
    inconsistent["worker_start_ray_commands"] = [c.replace("RAY_AUTH_MODE=token", "")
                                                 for c in config["worker_start_ray_commands"]]
    del inconsistent["file_mounts"]["~/.ray/auth_token"]
    target.write_text(yaml.safe_dump(inconsistent))
    problems = "\n".join(check_config(target))
    assert f"{MAX_LABEL_PREFIX}GPU" in problems and "worker_start_ray_commands" in problems
    assert "~/.ray/auth_token" in problems


def test_autoscaler_maxima_respect_the_cluster_wide_cap():
    config = {"head_node_type": "head", "max_workers": 3, "available_node_types": {
        "head": {"resources": {"CPU": 2}},
        "small": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 4},
        "big": {"resources": {"CPU": 32, "GPU": 8}, "max_workers": 2}}}
    assert autoscaler_maxima(config) == {"CPU": 2 + 2 * 32 + 4, "GPU": 2 * 8 + 1}


def test_launcher_labels_are_read_from_the_head_command():
    labels = head_labels(load_config(REPO / "cluster" / "aws.yaml"))
    assert labels["orch.io/mlflow-port"] == "5000" and float(labels["orch.io/max-GPU"]) >= 1


def kuberay_documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc}


def test_kuberay_manifest_structure():
    docs = kuberay_documents()
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings"
    assert params["dashboard-host"] == "127.0.0.1"
    containers = {c["name"]: c for c in head["template"]["spec"]["containers"]}
    assert set(containers) == {"ray-head", "mlflow"}
    assert "orchestrator" in containers["ray-head"]["image"], "the image installs this project (cluster/Dockerfile)"
    assert containers["mlflow"]["command"][:4] == ["python", "-m", "mlflow", "server"]
    env = {e["name"]: e["value"] for e in containers["ray-head"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://orch-mlflow:5000" and env["RAY_JOB_STOP_WAIT_TIME_S"]
    volumes = {v["name"] for v in head["template"]["spec"]["volumes"]}
    for container in containers.values():
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
    groups = spec["workerGroupSpecs"]
    assert groups and all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in groups)
    for group in groups:
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"]
        assert {e["name"]: e["value"] for e in worker["env"]}["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    service = docs["Service"]
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert service["metadata"]["name"] == "orch-mlflow"


def test_kuberay_labels_match_its_worker_groups():
    spec = kuberay_documents()["RayCluster"]["spec"]
    labels = dict(pair.split("=") for pair in spec["headGroupSpec"]["rayStartParams"]["labels"].split(","))
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["workerGroupSpecs"])
    cpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
               for g in spec["workerGroupSpecs"])
    assert float(labels[f"{MAX_LABEL_PREFIX}GPU"]) == gpus and float(labels[f"{MAX_LABEL_PREFIX}CPU"]) == cpus
    assert labels["orch.io/mlflow-port"] == "5000"
