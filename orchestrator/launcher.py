"""`orch cluster up|status|down cluster/aws.yaml`: Ray's cluster launcher (`ray up/down`), config checked first.

A launcher config is checked against the JSON schema Ray ships (`ray/autoscaler/ray-schema.json`) and
against what orch needs from a cluster: token auth on every node, an MLflow server on the head, and head
labels that declare the autoscaler's maximum (the dashboard does not show the autoscaler's config, so
`orch submit` reads these labels to refuse a job no amount of scaling could hold).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.capacity import MAX_LABEL_PREFIX
from orchestrator.jobs_client import MLFLOW_PORT_LABEL

LABELS_FLAG = re.compile(r"--labels[= ]['\"]?([^'\"\s]+)")


def ray_schema() -> dict[str, Any]:
    """Read from the installed package without importing Ray (an import fixes Ray's auth mode for the process)."""
    import importlib.util

    package = Path(importlib.util.find_spec("ray").origin).parent
    return json.loads((package / "autoscaler" / "ray-schema.json").read_text())


def load_config(path: Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a launcher config is a YAML mapping")
    return config


def autoscaler_maxima(config: dict[str, Any]) -> dict[str, float]:
    """Most of each resource the cluster can ever hold: the head plus every worker type at its max_workers,
    the largest contributors first, within the cluster-wide max_workers."""
    types = config.get("available_node_types", {})
    head = types.get(config.get("head_node_type"), {})
    budget = config.get("max_workers", sum(t.get("max_workers", 0) for n, t in types.items() if t is not head))
    names = {name for spec in types.values() for name in spec.get("resources", {})}
    maxima = {}
    for name in names:
        amount = float(head.get("resources", {}).get(name, 0))
        left = budget
        workers = [t for t in types.values() if t is not head]
        for spec in sorted(workers, key=lambda t: -float(t.get("resources", {}).get(name, 0))):
            count = min(spec.get("max_workers", 0), left)
            amount += count * float(spec.get("resources", {}).get(name, 0))
            left -= count
        if amount:
            maxima[name] = amount
    return maxima


def head_labels(config: dict[str, Any]) -> dict[str, str]:
    """The labels the head's `ray start` sets, read from head_start_ray_commands."""
    labels: dict[str, str] = {}
    for command in config.get("head_start_ray_commands", []):
        for found in LABELS_FLAG.finditer(command):
            for pair in found[1].split(","):
                key, _, value = pair.partition("=")
                labels[key] = value
    return labels


def check_config(path: Path) -> list[str]:
    """Everything wrong with a launcher config, as sentences; empty when it is ready for `ray up`."""
    import jsonschema

    config = load_config(path)
    problems = [f"{'.'.join(map(str, error.absolute_path)) or '(top level)'}: {error.message}"
                for error in jsonschema.Draft7Validator(ray_schema()).iter_errors(config)]
    if problems:
        return problems  # what follows reads node types and commands, which must first be well formed
    labels = head_labels(config)
    declared = {k.removeprefix(MAX_LABEL_PREFIX): float(v) for k, v in labels.items() if k.startswith(MAX_LABEL_PREFIX)}
    for name, amount in autoscaler_maxima(config).items():
        if name in ("CPU", "GPU") and declared.get(name) != amount:
            problems.append(f"head_start_ray_commands: label {MAX_LABEL_PREFIX}{name}={declared.get(name, 'missing')} "
                            f"but the node types add up to {amount:g}; update the label")
    if MLFLOW_PORT_LABEL not in labels:
        problems.append(f"head_start_ray_commands: no {MLFLOW_PORT_LABEL} label, so jobs cannot find the head's MLflow")
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("RAY_AUTH_MODE=token" in command and "ray start" in command for command in config.get(kind, [])):
            problems.append(f"{kind}: `ray start` needs RAY_AUTH_MODE=token, or the cluster accepts anyone")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        problems.append("file_mounts: copy ~/.ray/auth_token to every node (the token they all share)")
    if not any("mlflow server" in c for c in config.get("head_start_ray_commands", [])):
        problems.append("head_start_ray_commands: no `mlflow server` on the head")
    return problems


def _ray(arguments: list[str]) -> int:
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    return subprocess.call([ray, *arguments], env=env)


def _ensure_token(console) -> None:
    """The configs copy ~/.ray/auth_token to every node; Ray reads it from there on this machine too."""
    token = Path.home() / ".ray" / "auth_token"
    if not token.exists() and not os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()
        console.print(f"generated the cluster token in {token} (kept there; never printed)")


def launch(console, path: Path, yes: bool) -> int:
    problems = check_config(path)
    if problems:
        for problem in problems:
            console.print(f"[bold red]error:[/] {path}: {problem}", highlight=False, soft_wrap=True)
        return 2
    _ensure_token(console)
    code = _ray(["up", str(path), "--no-config-cache", *(["-y"] if yes else [])])
    if code == 0:
        console.print(f"next: `ray dashboard {path}` tunnels the dashboard to http://127.0.0.1:8265; from a machine "
                      f"inside the cluster's network, `orch submit JOB.yaml --cluster http://127.0.0.1:8265`; or run "
                      f"orch on the head: `ray exec {path} 'cd ~/orchestrator && orch submit JOB.yaml "
                      f"--cluster http://127.0.0.1:8265'`", highlight=False)
    return code


def status(console, path: Path) -> int:
    return _ray(["exec", str(path), "RAY_AUTH_MODE=token ray status"])


def teardown(console, path: Path, yes: bool) -> int:
    return _ray(["down", str(path), *(["-y"] if yes else [])])
