"""A cold start's model plan, made in a prestarted worker process that imports Lightning anyway, not in the driver.

Planning builds the model on the meta device, and that imports the user's module and with it PyTorch and
Lightning: ~3.5 s of CPU on a small machine (up to ~8 s on a slow one). On the local default every worker
process imports them too, and a cold start is bound by CPU (two cores shared by the driver, Ray's daemons, Ray
Train's controller and the workers): the driver's import was a third copy of the same work, taken from the
workers' start. So, on a cold start, the driver asks for the plan beside the processes it prestarts for the job
(warm_pool.prestart_for_this_job): the request goes into Ray's key-value store first, and the first of those
processes to finish its imports (preload.py) claims it, plans the model and posts the result back. The driver
waits for it before anything else starts, exactly where it used to plan: a class or init_args the worker refuses
is the same SpecError (exit 2, Ray stopped, no MLflow run) as before, and `orch plan` / `--dry-run` still plan
in the driver. If no process takes the request (the prestart failed, or the one that claimed it died), the
driver plans the model itself.

Keys live in Ray's GCS under the namespace the progress board uses; the cluster is the driver's own and ends
with it, so fixed keys cannot meet another job's.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator import gcs_kv
from orchestrator.errors import SpecError
from orchestrator.gcs_kv import NAMESPACE
REQUEST_KEY = b"plan/request"
STARTED_PREFIX = b"plan/started/"  # + pid: a prestarted process of the cold tier began (before its imports)
CLAIM_KEY = b"plan/claim"
RESULT_KEY = b"plan/result"
# A prestarted process registers before it imports anything; if none has after this long, none will.
FIRST_PROCESS_TIMEOUT_S = 30.0
POLL_S = 0.05
KV_TIMEOUT_S = 10.0


@dataclass
class PlanRequest:
    spec: Any  # JobSpec
    source: str
    offered: dict[str, Any] | None
    cwd: str  # the driver's: the project folder, where the user's modules and relative paths are found


class PlanFailed(RuntimeError):
    """Planning failed in the worker process with an error of ours that did not pickle; carries its traceback."""


class WorkerPlan:
    """The driver's side: ask for the plan as the job's processes are prestarted, then wait for it."""

    def __init__(self, spec, source: str, offered: dict[str, Any] | None):
        self._request = pickle.dumps(PlanRequest(spec, source, offered, os.getcwd()))
        self._asked = threading.Event()
        self._asked_at = 0.0
        self._processes = 0

    def asking_with(self, prestart: Callable[[], int]) -> Callable[[], int]:
        """`prestart`, run in Ray's starter thread once Ray is up, preceded by the request it must find."""
        def ask_then_prestart() -> int:
            try:
                _client().internal_kv_put(REQUEST_KEY, self._request, True, NAMESPACE, timeout=KV_TIMEOUT_S)
                self._processes = prestart()
            except Exception:  # best effort, like the prestart: the driver then plans the model itself
                self._processes = 0
            finally:
                self._asked_at = time.monotonic()
                self._asked.set()
            return self._processes

        return ask_then_prestart

    def facts(self, ray_start, meanwhile: Callable[[], object] | None = None):
        """The worker's ModelFacts; raises what the worker's planning raised; None where no worker will answer.
        `meanwhile`: the driver's own work to do while the worker plans (Ray's starter thread is done by then)."""
        ray_start.wait()  # Ray's own start failing is the error to report, not a plan that never came
        while not self._asked.wait(timeout=0.2):  # in slices: Ctrl-C reaches the main thread meanwhile
            if not ray_start.starter_alive():  # (Ray was started again on this thread: nothing was prestarted)
                return None
        if not self._processes:
            return None
        if meanwhile is not None:
            meanwhile()
        client = _client()
        while True:
            raw = client.internal_kv_get(RESULT_KEY, NAMESPACE, timeout=KV_TIMEOUT_S)
            if raw is not None:
                return _decode(raw)
            started = [int(key[len(STARTED_PREFIX):]) for key in
                       client.internal_kv_keys(STARTED_PREFIX, NAMESPACE, timeout=KV_TIMEOUT_S)]
            if not started and time.monotonic() - self._asked_at > FIRST_PROCESS_TIMEOUT_S:
                return None
            if started and not any(_alive(pid) for pid in started):
                return None
            time.sleep(POLL_S)


def serve() -> None:
    """In a prestarted worker process of a cold start (preload.py), once its imports are done: plan the model if
    the driver asked and no other process has claimed the request. Never raises: a failure here is posted as
    the plan's error, and the process goes on to serve its actor."""
    try:
        client = _client()
        raw = client.internal_kv_get(REQUEST_KEY, NAMESPACE, timeout=KV_TIMEOUT_S)
        if raw is None:
            return
        if not client.internal_kv_put(CLAIM_KEY, str(os.getpid()).encode(), False, NAMESPACE, timeout=KV_TIMEOUT_S):
            return  # another process took it
        client.internal_kv_put(RESULT_KEY, _encode(_plan(pickle.loads(raw))), True, NAMESPACE, timeout=KV_TIMEOUT_S)
    except Exception:  # the GCS gone: the driver sees this process end its wait, or its own timeout
        pass


def announce() -> None:
    """In a prestarted worker process of a cold start, before its imports: tell the driver a process is coming."""
    try:
        _client().internal_kv_put(STARTED_PREFIX + str(os.getpid()).encode(), b"", True, NAMESPACE,
                                  timeout=KV_TIMEOUT_S)
    except Exception:
        pass


def _plan(request: PlanRequest) -> tuple[str, Any]:
    from orchestrator.plan import plan_model

    added_path = request.cwd not in sys.path
    if added_path:  # as the driver has it (cli._prepare): the project folder first
        sys.path.insert(0, request.cwd)
    previous_cwd = os.getcwd()
    try:
        os.chdir(request.cwd)
        facts = plan_model(request.spec, request.source, request.offered)
        facts.planned_by = f"worker process {os.getpid()}"
        return "facts", facts
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the driver, which reports it
        return "error", _portable(exc)
    finally:
        os.chdir(previous_cwd)
        if added_path:  # the training function later sees the path its own environment gives it
            sys.path.remove(request.cwd)


def _portable(exc: BaseException) -> BaseException:
    """SpecError (ours, with its problems) travels as it is; anything else as PlanFailed with the worker's
    traceback: its class may live in the user's module, which the driver must not import."""
    if isinstance(exc, SpecError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:
            pass
    text = "".join(traceback.format_exception(exc)).rstrip()
    return PlanFailed(f"planning the model in worker process {os.getpid()} failed:\n{text}")


def _encode(result: tuple[str, Any]) -> bytes:
    return pickle.dumps(result)


def _decode(raw: bytes):
    kind, value = pickle.loads(raw)
    if kind == "error":
        raise value
    return value


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the local default: every worker process is on this machine
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _client():
    return gcs_kv.client("a worker-planned model")
