"""Shared fixtures: one real local Ray cluster for the whole session, a fresh MLflow store per test."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before any test module imports Ray: it fixes its auth mode for the process when first imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# A suite started in the background by a non-interactive shell (`nohup ... &`, some CI runners) inherits SIGINT
# ignored, and so would every `orch` it starts, which would then never see the Ctrl-C tests' SIGINT. A user's
# terminal delivers it: a handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
ORCH = str(Path(sys.executable).parent / "orch")  # the installed console script, as a user runs it
ASSETS = Path(__file__).parent / "assets"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Started once, in this process; CLI subprocesses join it through RAY_ADDRESS.

    On loopback only, as `orch` starts a cluster of its own: Ray swaps 127.0.0.1 for the machine's LAN address,
    and listens on every interface, unless it believes it runs a single-machine cluster. Ray reads that belief
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER) when it is first imported, which test collection did long before this
    fixture, so the constant is set for the start here and restored after, along with the environment: the
    multi-node tests start `ray start --address` nodes, which refuse to run with it.
    """
    import ray
    from ray._private import ray_constants

    single_machine, before = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, ray_constants.ENABLE_RAY_CLUSTER
    previous = os.environ.get(single_machine)
    os.environ[single_machine], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if previous is None:
            os.environ.pop(single_machine)
        else:
            os.environ[single_machine] = previous
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A store that does not exist yet: `orch` creates it, as on a user's first run."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """A sqlite store as a user's first run leaves it, made once per session: copy it, never write to it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables: all of MLflow's migrations
    return path


@pytest.fixture
def existing_store(tracking_uri: str, migrated_store: Path) -> str:
    """`tracking_uri`, already created, as on every run after a user's first: for tests about something else.

    Creating a sqlite store runs all of MLflow's schema migrations, ~4 s of CPU on a small machine, in the
    driver of every job a test starts; a copy of one made once per session costs milliseconds.
    """
    return prepared_store(Path(tracking_uri.removeprefix("sqlite:///")).parent, migrated_store)


def prepared_store(folder: Path, template: Path) -> str:
    """A sqlite store in `folder`, copied from the session's migrated one (see existing_store)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def orch_env(tmp_path: Path, tracking_uri: str) -> dict[str, str]:
    """The environment of a user's shell: no cluster, a private MLflow store, a bare working folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"  # long paths in messages stay on one line
    return env


@pytest.fixture
def cluster_env(orch_env: dict[str, str], ray_address: str, existing_store: str) -> dict[str, str]:
    """The user's shell with the session's cluster named (RAY_ADDRESS) and a store from an earlier run."""
    return {**orch_env, "RAY_ADDRESS": ray_address}


def run_orch(args: list[str], env: dict[str, str], cwd: Path | str = REPO, timeout: float = 300,
             ) -> subprocess.CompletedProcess:
    return subprocess.run([ORCH, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def copy_user_project(tmp_path: Path) -> Path:
    target = tmp_path / "user_project"
    shutil.copytree(ASSETS / "user_project", target)
    return target


def only_run(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {tracking_uri}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"expected one run, found {len(runs)}"
    return client, runs[0]


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float) -> str:
    """Read the process's stdout until `needle` shows up; return everything read so far."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared; output so far:\n{''.join(seen)}")


def pytest_sessionfinish(session, exitstatus):
    """No tests collected (exit 5) is a broken suite, not a pass."""
    if exitstatus == 5:
        session.exitstatus = 1
