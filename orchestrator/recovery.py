"""Driver side of fault handling: attempts in the run's tags, graceful stop, checkpoint storage check."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import Problem, SpecError

MAX_CAUSE_CHARS = 500


class AttemptLog:
    """Copies attempts and failures from the progress board to the run's tags, without blocking the driver."""

    def __init__(self, tracking_uri: str, run_id: str, attempt_base: int):
        from orchestrator.tracking.sender import MetricSender

        self.sender = MetricSender(tracking_uri, run_id, max_buffered=10_000)
        self.base = attempt_base
        self._seen_attempts = 0
        self._seen_failures = 0

    def update(self, state: dict[str, Any]) -> list[str]:
        """Record what is new on the board; returns lines for the user ("attempt 1 failed: ...")."""
        attempts, failures = state.get("attempts", []), state.get("failures", [])
        tags: dict[str, str] = {}
        lines = []
        for number, event in enumerate(failures[self._seen_failures:], start=self.base + self._seen_failures + 1):
            tags[f"orch.attempt.{number}.failure"] = summarize(event["causes"])
            lines.append(f"attempt {number} failed: {tags[f'orch.attempt.{number}.failure']}")
        for event in attempts[self._seen_attempts:]:
            tags[f"orch.attempt.{event['attempt']}.start_step"] = str(event["step"])
            tags["orch.attempts"] = str(event["attempt"])
            self.sender.add({"orch/attempt_start_step": event["step"]}, step=event["attempt"])
            if event["attempt"] > 1:
                lines.append(f"attempt {event['attempt']} started at step {event['step']}"
                             + (" from its latest checkpoint" if event["step"] else " from the beginning"))
        self._seen_attempts, self._seen_failures = len(attempts), len(failures)
        if tags:
            self.sender.set_tags(tags)
        return lines

    def close(self, timeout_s: float = 30.0) -> None:
        self.sender.close(timeout_s)


def summarize(causes: dict[int, str]) -> str:
    """Ranks that failed the same way are listed once, the root cause first: 'rank 0: the worker process died'."""
    by_text: dict[str, list[int]] = {}
    for rank, text in sorted(causes.items(), key=lambda item: (item[1].startswith("lost contact"), item[0])):
        by_text.setdefault(text, []).append(rank)
    parts = [f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}: {text}" for text, ranks in by_text.items()]
    return "; ".join(parts)[:MAX_CAUSE_CHARS]


class Stopped(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during training, after the graceful stop ran (or was cut short)."""

    def __init__(self, signal_name: str, result=None, error: BaseException | None = None, waited_s: float = 0.0):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.result = result  # Ray Train's Result when the workers checkpointed and returned
        self.error = error
        self.waited_s = waited_s


def stop_gracefully(board, done: threading.Event, box: dict, timeout_s: float, set_status: Callable[[str], None],
                    poll: Callable[[], dict], first: KeyboardInterrupt) -> Stopped:
    """Ask the workers to checkpoint and end fit(); wait at most `timeout_s`. A second Ctrl-C propagates at once."""
    name = str(first) or "Ctrl-C"
    state = poll() or {}
    if timeout_s <= 0 or state.get("phase") != "training":
        return Stopped(name)  # nothing worth a checkpoint yet, or the user asked for no wait
    set_status(f"stopping: writing a checkpoint (up to {timeout_s:.0f} s; Ctrl-C again to stop at once)")
    try:
        board.update({"stop_requested": True})
    except Exception:  # the cluster's GCS is gone: nothing can be asked of the workers any more
        return Stopped(name)
    started = time.time()
    while not done.wait(0.5) and time.time() - started < timeout_s:
        poll()
    if not done.is_set():
        return Stopped(name, waited_s=time.time() - started)
    return Stopped(name, result=box.get("result"), error=box.get("error"), waited_s=time.time() - started)


def stop_note(stopped: Stopped, run_id: str) -> str:
    """What the user (and the run's orch.error tag) reads after a stop."""
    checkpoint = getattr(stopped.result, "checkpoint", None)
    metrics = getattr(stopped.result, "metrics", None) or {}
    if checkpoint is not None and stopped.error is None:
        where = f" at step {metrics['step']}" if "step" in metrics else ""
        return (f"stopped by {stopped.signal_name}; checkpoint{where} saved to {checkpoint.path}; "
                f"continue with `orch resume {run_id}`")
    if stopped.error is not None:
        return (f"stopped by {stopped.signal_name}; the workers failed while stopping "
                f"({type(stopped.error).__name__}: {str(stopped.error).strip().splitlines()[-1][:300]}); "
                f"`orch resume {run_id}` continues from the last checkpoint")
    if stopped.waited_s:
        return (f"stopped by {stopped.signal_name}; no checkpoint within {stopped.waited_s:.0f} s "
                f"(checkpoint.stop_timeout_s); `orch resume {run_id}` continues from the last checkpoint")
    return f"stopped by {stopped.signal_name}; `orch resume {run_id}` continues from the last checkpoint, if any"


@contextlib.contextmanager
def signals_held():
    """While the run's final status is written: a further Ctrl-C must not leave it RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_storage(storage_path: str, source: str) -> None:
    """Before Ray starts: the checkpoint location must take a file, or the first checkpoint would fail late."""
    probe = f".orch-write-test-{uuid.uuid4().hex[:8]}"
    try:
        if "://" in storage_path:
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root.rstrip('/')}/{probe}") as stream:
                stream.write(b"ok")
            fs.delete_file(f"{root.rstrip('/')}/{probe}")
            return
        folder = Path(storage_path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / probe).write_bytes(b"ok")
        (folder / probe).unlink()
    except Exception as exc:  # OSError, pyarrow's errors, missing credentials: all say the same to the user
        reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SpecError([Problem(source, "checkpoint.storage_path", (
            f"cannot write checkpoints to {storage_path!r} ({reason}); choose a folder or bucket this user can "
            f"write, e.g. checkpoint.storage_path={os.path.join(os.getcwd(), 'orch_runs')}"))]) from None


def describe_failure(exc: BaseException, run_id: str) -> str | None:
    """Failures whose traceback says nothing to the user read as a sentence: a fatal error raised on purpose
    (NaN/inf), and the death of Ray Train's controller, which is Ray's plumbing from top to bottom."""
    from orchestrator.attempts import FatalTrainingError

    failure = getattr(exc, "controller_failure", None)
    if isinstance(failure, FatalTrainingError):
        return str(failure)
    return describe_controller_death(exc, run_id)


def describe_controller_death(exc: BaseException, run_id: str) -> str | None:
    """Ray Train restarts dead workers, but not its controller: when that process dies the job ends."""
    import re

    from ray.exceptions import ActorDiedError

    if not isinstance(exc, ActorDiedError) or "class_name: TrainController" not in str(exc):
        return None
    text = str(exc)
    pid = re.search(r"pid: (\d+)", text)
    ip = re.search(r"ip: (\S+)", text)
    where = f" (pid {pid.group(1)}{f' on {ip.group(1)}' if ip else ''})" if pid else ""
    detail = re.search(r"Worker exit detail: (.*?)(?= Some common causes|\n|$)", text)
    cause = f": {detail.group(1).strip().rstrip('.')}" if detail else ""
    return (f"Ray Train's controller process{where} died{cause}. Ray restarts workers but not the controller, so "
            f"the job ended; checkpoints already written are kept, and `orch resume {run_id}` carries on from the "
            "last one (it refuses a run that committed none). If it was killed for memory, the node's `dmesg` "
            "says so.")
