"""Bad input through the real CLI: a clear message naming file, field, value and what is allowed; exit 2;
no MLflow run and no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_orch

DIGITS = (REPO / "jobs" / "digits.yaml").read_text()


def digits_with(change) -> str:
    spec = yaml.safe_load(DIGITS)
    change(spec)
    return yaml.safe_dump(spec, sort_keys=False)


def _set(path: str, value):
    def change(spec):
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return change


def _rename(section: str, old: str, new: str):
    def change(spec):
        node = spec[section] if section else spec
        node[new] = node.pop(old)
    return change


CASES = {
    # name: (file text or None for a missing file, overrides, expected fragments)
    "missing file": (None, [], ["nope.yaml", "no such file"]),
    "invalid yaml": ("name: x\nmodel: [unclosed\ndata: y\n", [], ["job.yaml:3", "invalid YAML"]),
    "not a mapping": ("- a\n- b\n", [], ["top level must be a mapping"]),
    "unknown section": (digits_with(_rename("", "trainer", "trainr")), [],
                        ["trainr", "unknown key 'trainr'", "did you mean 'trainer'", "allowed:"]),
    "unknown key": (digits_with(_rename("trainer", "max_epochs", "max_epoch")), [],
                    ["trainer.max_epoch", "did you mean 'max_epochs'"]),
    "wrong type": (digits_with(_set("trainer.max_epochs", "ten")), [],
                   ["job.yaml:", "trainer.max_epochs", "valid integer", "got 'ten'"]),
    "out of range": (digits_with(_set("scaling.num_workers", 0)), [],
                     ["scaling.num_workers", "must be ≥ 1; got 0"]),
    "unknown strategy": (digits_with(_set("scaling.strategy", "dpp")), [],
                         ["scaling.strategy", "'dpp' is not allowed", "did you mean 'ddp'", "ddp, fsdp, deepspeed"]),
    "class_path does not import": (digits_with(_set("model.class_path", "jobs.digits.DigitsCNNN")), [],
                                   ["model.class_path", "cannot import", "did you mean 'DigitsCNN'"]),
    "module does not import": (digits_with(_set("data.class_path", "no_such_pkg.Data")), [],
                               ["data.class_path", "No module named 'no_such_pkg'"]),
    "init_args not accepted": (digits_with(_set("model.init_args.chanels", 8)), [],
                               ["model.init_args.chanels", "does not accept 'chanels'", "did you mean 'channels'"]),
    "init_args wrong type": (digits_with(_set("model.init_args.channels", "many")), [],
                             ["model.init_args.channels", "got 'many'"]),
    "model raises while built": (digits_with(_set("model.init_args.channels", -3)), [],
                                 ["model: building jobs.digits.DigitsCNN with its init_args failed",
                                  "negative dimension -3", "jobs/digits.py:"]),
    "override of a missing field": (DIGITS, ["trainer.max_epoch=3"],
                                    ["override 'trainer.max_epoch=3'", "no field 'max_epoch'",
                                     "did you mean 'max_epochs'"]),
    "override with a bad value": (DIGITS, ["scaling.num_workers=-1"],
                                  ["override 'scaling.num_workers=-1'", "must be ≥ 1; got -1"]),
    "override without =": (DIGITS, ["trainer.max_epochs"], ["section.field=value"]),
    "gpus on a machine without": (DIGITS, ["scaling.use_gpu=true"],
                                  ["scaling.use_gpu", "asks for 2 GPUs", "this machine has 0", "short by 2"]),
    "more cpus than the machine": (DIGITS, ["scaling.num_workers=64"],
                                   ["scaling", "asks for 64 CPUs", "short by"]),
}

LOCAL_RESOURCE_CASES = {"gpus on a machine without", "more cpus than the machine"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_starts(case, tmp_path: Path, orch_env, tracking_uri):
    text, overrides, fragments = CASES[case]
    if case == "gpus on a machine without":
        from orchestrator.resources import local_resources

        if local_resources().gpus:
            pytest.skip("this machine has GPUs")
    job = tmp_path / ("nope.yaml" if text is None else "job.yaml")
    if text is not None:
        job.write_text(text)
    env = dict(orch_env)
    if case not in LOCAL_RESOURCE_CASES:
        # An address nothing listens on: any attempt to reach Ray would fail differently and later.
        env["RAY_ADDRESS"] = "127.0.0.1:1"
    result = run_orch(["submit", str(job), *overrides], env=env, timeout=120)
    output = result.stderr + result.stdout
    assert result.returncode == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} missing from:\n{output}"
    assert "Traceback" not in output
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists(), "an MLflow store was touched"


def test_every_problem_is_reported_at_once(tmp_path: Path, orch_env):
    job = tmp_path / "job.yaml"
    job.write_text(digits_with(lambda s: (s["scaling"].update(num_workers=0), s["trainer"].update(max_epochs=0))))
    result = run_orch(["plan", str(job)], env=orch_env, timeout=120)
    assert result.returncode == 2
    assert "scaling.num_workers" in result.stderr and "trainer.max_epochs" in result.stderr


def test_unreachable_cluster_is_a_clear_error_within_seconds(tmp_path: Path, orch_env, tracking_uri):
    import time

    started = time.time()
    result = run_orch(["submit", str(REPO / "jobs/digits.yaml"), "cluster.address=127.0.0.1:1"], env=orch_env,
                      timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no Ray cluster answers at 127.0.0.1:1" in result.stderr
    assert time.time() - started < 60
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists()


def test_unreachable_tracking_server_is_a_clear_error(tmp_path: Path, orch_env):
    env = {**orch_env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}
    result = run_orch(["submit", str(REPO / "jobs/digits.yaml")], env=env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "MLflow tracking server at http://127.0.0.1:1 does not answer" in result.stderr
    assert "starting Ray" not in result.stdout


@pytest.mark.parametrize("case, ray_started", [("class_path does not import", False), ("module does not import", False),
                                               ("init_args not accepted", True), ("model raises while built", True)])
def test_local_default_starts_ray_only_for_classes_it_found_and_stops_it_on_a_refusal(case, ray_started, tmp_path,
                                                                                         orch_env, tracking_uri):
    """Local Ray starts while the model is imported and planned (launch.start_local_ray_early), once the classes
    are found in their modules' sources; a mistake only the import finds stops it again, leaving no process.
    There the model is planned in a worker process (worker_plan.py), which sends the same error back."""
    import tempfile

    import psutil

    text, overrides, fragments = CASES[case]
    job = tmp_path / "job.yaml"
    job.write_text(text)
    ray_tmp = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    result = run_orch(["submit", str(job), *overrides], env={**orch_env, "RAY_TMPDIR": ray_tmp}, timeout=180)
    output = result.stderr + result.stdout
    assert result.returncode == 2, output
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} missing from:\n{output}"
    assert ("starting Ray" in result.stdout) is ray_started, output
    assert "Traceback" not in output
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists(), "an MLflow store was touched"
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {left}"
