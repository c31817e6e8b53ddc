"""Ray Train's controller side: each worker-group failure and its cause, and which failures are final.

Imported by the driver only after Ray is connected, and by the controller: it imports Ray at the top.
"""

from __future__ import annotations

import time

from ray.train import UserCallback

MAX_CAUSE_CHARS = 500


class NonFiniteLossError(RuntimeError):
    """A NaN/inf loss or gradient (raised on the workers): deterministic, so retrying would only meet it again."""


class FatalTrainingError(RuntimeError):
    """Raised in Ray Train's controller to end the run without retries."""


class AttemptRecorder(UserCallback):
    """Runs in Ray Train's controller: every worker-group failure goes to the progress board with its cause.

    A NaN/inf failure is deterministic, so it is made final: raising here turns it into a controller
    error, which Ray Train's failure policy never retries.
    """

    def __init__(self, board):
        self.board = board

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        causes = {int(rank): cause(exc) for rank, exc in worker_exceptions.items()}
        self.board.append("failures", {"time": time.time(), "causes": causes})
        nonfinite = {rank: text for rank, text in causes.items()
                     if isinstance(_user_exception(worker_exceptions[rank]), NonFiniteLossError)}
        if nonfinite:
            # The rank whose own loss was non-finite says it best ("... on rank 1").
            best = sorted(nonfinite.items(), key=lambda item: "other rank" in item[1])[0][1]
            raise FatalTrainingError(best)


def _user_exception(exc: BaseException) -> BaseException:
    return getattr(exc, "_base_exc", exc)  # Ray Train wraps the user's exception with its traceback


# Errors on the surviving ranks once a peer is gone: they follow from another rank's failure.
COLLATERAL = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
              "Broken pipe", "SynchronizationBarrierResetError", "ProcessGroupNCCL", "Gloo")


def cause(exc: BaseException) -> str:
    """One line: the user's exception, or why Ray lost the worker."""
    from ray.exceptions import RayActorError

    base = _user_exception(exc)
    health = getattr(base, "health_check_failure", None)  # Ray Train could not reach the worker any more
    if isinstance(base, RayActorError) or isinstance(health, RayActorError) or \
            type(base).__name__.startswith("WorkerHealthCheck"):
        return "the worker process died (killed, out of memory, or its node lost)"
    text = f"{type(base).__name__}: {base}".strip()
    line = text.splitlines()[0] if text else type(base).__name__
    if any(marker in text for marker in COLLATERAL):
        line = f"lost contact with a failed peer ({line})"
    return line[:MAX_CAUSE_CHARS]
