"""Starts each worker process of the local default's cluster as Ray's setup_worker.py does, without importing Ray.

Ray's raylet starts every Python worker process through ray/_private/workers/setup_worker.py, a Python process
that imports Ray (~0.4 s of CPU on a small machine) only to apply the runtime environment's variables and exec
the real worker (default_worker.py), which imports Ray again. A cold start prestarts four such processes at once
(warm_pool.py), all on the path to the first step, on two cores. For the runtime environments orch's own
cluster gives its processes (environment variables only), this script does the same with the standard library:
the variables set as Ray's update_envs sets them (${VAR} expanded, unknown ones emptied), then the worker exec'd
with the same arguments. Anything else (a command prefix from conda or a container, another entry point, a
non-Python worker) is handed to Ray's own script unchanged. Follows ray 2.60.0's setup_worker.py and
RuntimeEnvContext.exec_worker; tests/test_setup_worker.py pins their source.

Stdlib only, on purpose: importing anything of orch or Ray here would bring back the cost it removes.
"""

import argparse
import json
import os
import re
import sys


def ray_setup_worker() -> str:
    """Ray's own script, found beside Ray's package without importing it."""
    import importlib.util

    ray_dir = os.path.dirname(importlib.util.find_spec("ray").origin)
    return os.path.join(ray_dir, "_private", "workers", "setup_worker.py")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--serialized-runtime-env-context", type=str)
    parser.add_argument("--language", type=str)
    args, passthrough = parser.parse_known_args(argv)
    try:
        context = json.loads(args.serialized_runtime_env_context or "{}")
    except ValueError:
        context = None
    if (not isinstance(context, dict) or args.language != "PYTHON" or sys.platform == "win32"
            or context.get("command_prefix") or context.get("override_worker_entrypoint")
            or set(context) - {"command_prefix", "env_vars", "py_executable", "override_worker_entrypoint",
                               "java_jars"}):
        os.execv(sys.executable, [sys.executable, ray_setup_worker(), *argv])
    for key, value in (context.get("env_vars") or {}).items():
        os.environ[key] = re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(value))
    python = context.get("py_executable") or sys.executable
    os.execvp(python, [python, *passthrough])


if __name__ == "__main__":
    main(sys.argv[1:])
