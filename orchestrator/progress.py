"""The driver's live view of a job: a progress board the workers write to, drawn with rich."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text


def create_board():
    """A zero-CPU actor holding the latest progress; workers update it without waiting."""
    import ray

    from orchestrator.warm_pool import BARE_TIER, tier_runtime_env

    # Its own warm tier: a process kept for it next time imports nothing (warm_pool.py).
    @ray.remote(num_cpus=0, max_concurrency=4, runtime_env=tier_runtime_env(BARE_TIER))
    class ProgressBoard:
        def __init__(self) -> None:
            self.state: dict[str, Any] = {}

        def update(self, update: dict[str, Any]) -> None:
            validation = update.pop("validation", None)
            if validation:
                self.state.setdefault("validations", []).append(validation)
            self.state.update(update)

        def snapshot(self) -> dict[str, Any]:
            return dict(self.state)

        def get(self, key: str, default: Any = None) -> Any:
            return self.state.get(key, default)

        def append(self, key: str, item: Any) -> None:
            """Event lists (attempts, failures), written by workers and Ray Train's controller."""
            self.state.setdefault(key, []).append(item)

    return ProgressBoard.remote()


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
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def set_status(self, status: str) -> None:
        self.status = status
        if self._live:
            self._live.update(self._render())
        else:
            self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {status}")

    def update(self, state: dict[str, Any]) -> None:
        self.state = state
        if state.get("phase") == "training":
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
            # On a terminal these lines scroll above the live bar; elsewhere they are the log.
            self.console.print(
                f"[dim]{time.strftime('%H:%M:%S')}[/] epoch {validation['epoch'] + 1}  step {validation['step']}  "
                f"{_format_metrics(validation['metrics'])}", highlight=False)
        self._printed_validations = len(validations)

    def _render(self) -> Group:
        header = Text.assemble((f"{self.job_name}", "bold"), f"  {self.world_size} workers  ", (self.status, "cyan"))
        return Group(header, self._progress)


def _format_metrics(metrics: dict[str, float], only_val: bool = False) -> str:
    # Lightning reports x, x_step and x_epoch for on_step+on_epoch metrics; x says it once.
    shown = {k: v for k, v in metrics.items() if not k.endswith(("_step", "_epoch"))
             and (not only_val or k.startswith("val"))}
    return "  ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))
