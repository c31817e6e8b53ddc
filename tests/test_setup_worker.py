"""orchestrator/setup_worker.py, the local default's stand-in for Ray's setup_worker.py: it starts the worker as
Ray's does for environment-variable runtime envs, hands anything else to Ray's, and Ray's has not changed under it.
(Every Ray job of the suite on the local default also starts its processes through it.)"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys

from orchestrator import setup_worker

# sha256 of what setup_worker.py repeats (ray 2.60.0): Ray's script, RuntimeEnvContext and update_envs. If Ray's
# changed, read the change, carry it into orchestrator/setup_worker.py, and put the new digest here.
RAY_SETUP_WORKER_SHA256 = "8c4f32cc73461bab7dfca1d22f92f55b67e9d778f9adb9bda7f5738c1d0e1dcf"


def _ray_source() -> str:
    from ray._private import utils
    from ray._private.runtime_env import context

    with open(setup_worker.ray_setup_worker()) as script:
        return script.read() + inspect.getsource(context.RuntimeEnvContext) + inspect.getsource(utils.update_envs)


def test_the_ray_code_it_follows_is_the_one_it_was_written_against():
    digest = hashlib.sha256(_ray_source().encode()).hexdigest()
    assert digest == RAY_SETUP_WORKER_SHA256, (
        "Ray's setup_worker.py, RuntimeEnvContext or update_envs changed since orchestrator/setup_worker.py was "
        f"written: carry the change over, then update RAY_SETUP_WORKER_SHA256 (now {digest})")


# The "worker" these tests start: prints its arguments and the variables the runtime env set.
PROBE = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in "
         "('ORCH_PROBE_A', 'ORCH_PROBE_B', 'ORCH_PROBE_C')}}))")


def _start(context: dict, language: str = "PYTHON", env: dict | None = None) -> dict:
    args = [sys.executable, setup_worker.__file__, "-c", PROBE, "--node-ip-address=127.0.0.1",
            f"--serialized-runtime-env-context={json.dumps(context)}", f"--language={language}", "--flag", "x y"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ORCH_PROBE_HOME": "/home/probe", **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_env_vars_are_set_as_ray_sets_them_and_the_worker_gets_its_arguments():
    seen = _start({"env_vars": {"ORCH_PROBE_A": "1", "ORCH_PROBE_B": "${ORCH_PROBE_HOME}/lib:${ORCH_PROBE_NONE}",
                                "ORCH_PROBE_C": "$ORCH_PROBE_HOME"}, "command_prefix": [],
                   "py_executable": sys.executable, "override_worker_entrypoint": None, "java_jars": []})
    assert seen["env"] == {"ORCH_PROBE_A": "1", "ORCH_PROBE_B": "/home/probe/lib:", "ORCH_PROBE_C": "/home/probe"}
    assert seen["argv"] == ["--node-ip-address=127.0.0.1", "--flag", "x y"]  # its own two options taken out


def test_a_command_prefix_goes_to_rays_own_script():
    """A conda or container prefix is Ray's to handle: its script runs the prefix, then the worker, with the
    variables set (the same arguments, so the hand-over itself loses nothing)."""
    seen = _start({"command_prefix": ["true", "&&"], "env_vars": {"ORCH_PROBE_A": "1"}})
    assert seen["env"]["ORCH_PROBE_A"] == "1"
    assert seen["argv"] == ["--node-ip-address=127.0.0.1", "--flag", "x y"]


def test_the_fast_path_imports_no_ray():
    check = ("import runpy, sys; sys.argv = ['setup_worker.py', '-c', 'pass', '--language=PYTHON', "
             "'--serialized-runtime-env-context={}']; import os; os.execvp = lambda *a: print(sorted("
             "m for m in sys.modules if m == 'ray' or m.startswith('ray.'))); "
             f"runpy.run_path({setup_worker.__file__!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
