"""The driver's live view of a job: a progress board the workers write to, drawn with rich."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from orchestrator import gcs_kv
from orchestrator.gcs_kv import NAMESPACE


BOARD_NAMESPACE = NAMESPACE.decode()
BOARD_ROOT = "board/"  # every board's keys: board/<Ray job id of its driver>/<board id>/...
log = logging.getLogger(__name__)


class ProgressBoard:
    """A job's shared state in Ray's key-value store (the GCS): progress, attempts, the MLflow run's id, stop requests.

    Rank 0 writes progress, the ranks and Ray Train's controller add events (attempts, failures), the driver
    reads it all and posts the run's id and stop requests. It was an actor; an actor is a Python process of its
    own, ~2 s of CPU at start-up on a small machine, where the GCS already runs and every process of a job
    already holds a client to it. Values are plain data, pickled; each event has a key of its own, so that
    writers in different processes never overwrite one another's. Ray's key-value API is internal
    (ray.experimental.internal_kv), but Ray's own libraries live on it. The board is picklable (a key prefix)
    and travels in the trainer's config; `close()` deletes what it wrote. A driver that never got to close()
    (SIGKILL, a lost machine) leaves its board in a cluster that lives on: its keys carry the driver's Ray job
    id, and each new board sweeps away, in the background, those of jobs Ray lists as finished.
    """

    def __init__(self, timeout_s: float = 10.0, sweep: bool = True):
        import uuid

        import ray

        self.prefix = f"{BOARD_ROOT}{ray.get_runtime_context().get_job_id()}/{uuid.uuid4().hex}/"
        self.timeout_s = timeout_s  # per call: a slow GCS must not hang a worker or the driver for long
        if sweep:  # a daemon thread: the writer's pool thread is not one, and `orch submit` joins those at exit
            threading.Thread(target=self._quietly, args=(sweep_boards_of_finished_jobs, timeout_s),
                             name="orch-board-sweep", daemon=True).start()

    def update(self, update: dict[str, Any]) -> None:
        """Set keys; a "validation" entry is added to the "validations" list instead."""
        update = dict(update)
        validation = update.pop("validation", None)
        if validation:
            self.append("validations", validation)
        for key, value in update.items():
            self._put(f"{self.prefix}v/{key}", value)

    def append(self, key: str, item: Any) -> None:
        """Add an event to list `key` (attempts, failures, warm_ranks)."""
        import os

        # Time first, so that the keys sort as the events happened; pid and a counter keep them unique.
        self._put(f"{self.prefix}l/{key}/{time.time_ns():020d}-{os.getpid()}-{next(_event_numbers)}", item)

    def post(self, update: dict[str, Any]) -> None:
        """update() from a thread of this process's own, in the order posted: for the training loop, which must
        not wait a round trip to the GCS (a few ms each on a small machine) every time it reports progress."""
        _background().submit(self._quietly, self.update, update)

    def get_later(self, key: str, default: Any = None):
        """get() from the same thread, after what this process posted before; a Future."""
        return _background().submit(self.get, key, default)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Until what this process posted is written (or `timeout_s` passed)."""
        try:
            _background().submit(lambda: None).result(timeout=timeout_s)
        except Exception:  # a slow GCS: what is left is lost, as a lost update is (progress is for the display)
            pass

    @staticmethod
    def _quietly(write, *args) -> None:
        try:
            write(*args)
        except Exception as exc:  # progress is for the display: a lost update must not stop training
            log.debug("progress update lost: %s", exc)

    def get(self, key: str, default: Any = None) -> Any:
        import pickle

        value = self._client().internal_kv_get(f"{self.prefix}v/{key}".encode(), BOARD_NAMESPACE.encode(),
                                               timeout=self.timeout_s)
        return default if value is None else pickle.loads(value)

    def items(self, key: str) -> list[Any]:
        """The events of list `key`, oldest first."""
        return self._read(f"{self.prefix}l/{key}/").get(key, [])

    def snapshot(self) -> dict[str, Any]:
        """Every key, lists included."""
        return self._read(self.prefix)

    def close(self) -> None:
        """Delete what the job wrote; its processes are done with it."""
        self._client().internal_kv_del(self.prefix.encode(), True, BOARD_NAMESPACE.encode(), timeout=self.timeout_s)

    def _read(self, prefix: str) -> dict[str, Any]:
        import pickle

        client = self._client()
        keys = client.internal_kv_keys(prefix.encode(), BOARD_NAMESPACE.encode(), timeout=self.timeout_s)
        values = client.internal_kv_multi_get(keys, BOARD_NAMESPACE.encode(), timeout=self.timeout_s) if keys else {}
        state: dict[str, Any] = {}
        events: dict[str, list[tuple[str, Any]]] = {}
        for raw_key, raw_value in values.items():
            kind, _, rest = raw_key.decode()[len(self.prefix):].partition("/")
            if kind == "v":
                state[rest] = pickle.loads(raw_value)
            elif kind == "l":
                name, _, order = rest.rpartition("/")
                events.setdefault(name, []).append((order, pickle.loads(raw_value)))
        for name, entries in events.items():
            state[name] = [value for _, value in sorted(entries, key=lambda entry: entry[0])]
        return state

    def _put(self, key: str, value: Any) -> None:
        import pickle

        self._client().internal_kv_put(key.encode(), pickle.dumps(value), True, BOARD_NAMESPACE.encode(),
                                       timeout=self.timeout_s)

    @staticmethod
    def _client():
        return gcs_kv.client("the progress board")


def sweep_boards_of_finished_jobs(timeout_s: float = 10.0) -> int:
    """Delete the boards of jobs whose driver is gone (a finished job's board is deleted by its driver, unless
    the driver was killed first); returns how many keys went. Runs in a driver, connected to Ray."""
    client = ProgressBoard._client()
    namespace = BOARD_NAMESPACE.encode()
    keys = client.internal_kv_keys(BOARD_ROOT.encode(), namespace, timeout=timeout_s)
    jobs = {key.decode().split("/")[1] for key in keys if key.count(b"/") >= 3}
    if not jobs:
        return 0
    infos = client.get_all_job_info(skip_submission_job_info_field=True, skip_is_running_tasks_field=True,
                                    timeout=timeout_s)
    finished = {job_id.hex() for job_id, info in infos.items() if info.is_dead}
    return sum(client.internal_kv_del(f"{BOARD_ROOT}{job}/".encode(), True, namespace, timeout=timeout_s)
               for job in sorted(jobs & finished))


_event_numbers = itertools.count()  # with the pid, part of each event's key (next() is atomic in CPython)
_writer = None  # this process's background thread for post() and get_later(), started on first use
_writer_lock = threading.Lock()


def _background():
    global _writer
    with _writer_lock:
        if _writer is None:
            _writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orch-board")
        return _writer


class ProgressView:
    """Live bar on a terminal; one plain line per validation elsewhere (CI logs, pipes)."""

    def __init__(self, console: Console, job_name: str, world_size: int):
        self.console = console
        self.job_name = job_name
        self.world_size = world_size
        self.status = "starting Ray"
        self.state: dict[str, Any] = {}
        self._printed_validations = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console, transient=False,
        )
        self._task = self._progress.add_task(job_name, total=None, info="")
        self._live = Live(self._render(), console=console, refresh_per_second=4, transient=False) \
            if console.is_terminal else None

    def __enter__(self) -> ProgressView:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._live and not self._live.is_started:
            self._live.start()

    def close(self) -> None:
        """Leave the last state on screen; a second call does nothing."""
        if self._live and self._live.is_started:
            self._live.update(self._render())
            self._live.stop()

    def set_status(self, status: str) -> None:
        self.status = status
        if self._live:
            self._live.update(self._render())
        else:
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {status}")

    def update(self, state: dict[str, Any]) -> None:
        self.state = state
        if state.get("phase") == "training" and not self.status.startswith("stopping"):  # a stop outranks it
            self.status = "training"
        epoch = state.get("epoch")
        validations = state.get("validations", [])
        max_epochs = state.get("max_epochs")
        epochs = f"epoch {epoch + 1}/{max_epochs}" if epoch is not None and max_epochs and max_epochs > 0 else \
            (f"epoch {epoch + 1}" if epoch is not None else "")
        info = "  ".join(part for part in (
            epochs,
            f"loss {state['loss']:.4f}" if state.get("loss") is not None else "",
            f"{state['samples_per_s']:,.0f} samples/s" if state.get("samples_per_s") else "",
            _format_metrics(validations[-1]["metrics"], only_val=True) if validations else "",
        ) if part)
        self._progress.update(self._task, total=state.get("total_steps"), completed=state.get("step", 0), info=info)
        if self._live:
            self._live.update(self._render())
        for validation in validations[self._printed_validations:]:
            # Counted first: a Ctrl-C that lands in print() must not have the next update print the line again.
            self._printed_validations += 1
            # On a terminal these lines scroll above the live bar; elsewhere they are the log.
            self.console.print(
                f"[dim]{time.strftime('%H:%M:%S')}[/] epoch {validation['epoch'] + 1}  step {validation['step']}  "
                f"{_format_metrics(validation['metrics'])}", highlight=False)

    def _render(self) -> Group:
        header = Text.assemble((f"{self.job_name}", "bold"), f"  {self.world_size} workers  ", (self.status, "cyan"))
        return Group(header, self._progress)


def _format_metrics(metrics: dict[str, float], only_val: bool = False) -> str:
    # Lightning reports x, x_step and x_epoch for on_step+on_epoch metrics; x says it once.
    shown = {k: v for k, v in metrics.items() if not k.endswith(("_step", "_epoch"))
             and (not only_val or k.startswith("val"))}
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
