"""The driver's read-back of a run's hardware and throughput summary from MLflow, drawn for the terminal."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

MAX_RANK_ROWS = 8  # beyond this, per-rank rows become a min/max line


@dataclass
class TelemetrySummary:
    run: dict[str, float] = field(default_factory=dict)  # summary/<name>
    ranks: dict[int, dict[str, float]] = field(default_factory=dict)  # summary/rank_<r>/<name>
    nodes: dict[str, dict[str, float]] = field(default_factory=dict)  # summary/<node>/<name>
    tags: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.run or self.ranks or self.nodes)


def read_summary(tracking_uri: str, run_id: str) -> TelemetrySummary:
    """The workers have flushed by the time fit() returns; the run's latest values are the summary."""
    from mlflow import MlflowClient

    data = MlflowClient(tracking_uri).get_run(run_id).data
    summary = TelemetrySummary(tags={k: v for k, v in data.tags.items() if k.startswith("orch.")})
    for key, value in data.metrics.items():
        parts = key.split("/")
        if parts[0] != "summary" or len(parts) < 2:
            continue
        if len(parts) == 2:
            summary.run[parts[1]] = value
        elif re.fullmatch(r"rank_\d+", parts[1]):
            summary.ranks.setdefault(int(parts[1][5:]), {})[parts[2]] = value
        else:
            summary.nodes.setdefault(parts[1], {})[parts[2]] = value
    return summary


def print_summary(console: Console, tracking_uri: str, run_id: str) -> None:
    """Never fails the command: the figures are in MLflow whatever happens to this print."""
    try:
        summary = read_summary(tracking_uri, run_id)
    except Exception as exc:
        console.print(f"[dim]hardware summary unavailable: {exc}[/]")
        return
    if summary:
        console.print(render(summary))


def render(summary: TelemetrySummary) -> Table:
    table = Table(title="hardware and throughput", title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    run, tags = summary.run, summary.tags
    if "samples_per_s" in run:
        parts = [f"{run['samples_per_s']:,.1f} samples/s"]
        if "tokens_per_s" in run:
            parts.append(f"{run['tokens_per_s']:,.0f} tokens/s")
        parts.append(f"MFU {run['mfu']:.1%}" if "mfu" in run else
                     f"MFU not known ({'no FLOP count' if 'flops_per_sample' not in run else 'no peak FLOP/s for this device'})")
        table.add_row("throughput", " · ".join(parts))
    if "step_time_median_s" in run:
        table.add_row("step time", f"median {_ms(run['step_time_median_s'])}, p95 {_ms(run['step_time_p95_s'])}, "
                                   f"waiting on data {run.get('data_wait_fraction', 0):.1%} of it")
    for label, text in _rank_rows(summary.ranks):
        table.add_row(label, text)
    for node, figures in sorted(summary.nodes.items()):
        parts = []
        if "cpu_utilization_mean_percentage" in figures:
            parts.append(f"CPU {figures['cpu_utilization_mean_percentage']:.0f} % mean")
        if "gpu_utilization_mean_percentage" in figures:
            parts.append(f"GPU {figures['gpu_utilization_mean_percentage']:.0f} % mean, "
                         f"{figures.get('gpu_utilization_max_percentage', 0):.0f} % max")
        table.add_row(f"node {node}", " · ".join(parts) or "-")
    if "device_hours" in run:
        devices = tags.get("orch.devices")
        table.add_row("device-hours", f"{run['device_hours']:.4g}" + (f" ({devices})" if devices else ""))
    if "orch.stragglers" in tags:
        table.add_row("stragglers", tags["orch.stragglers"])
    for key, value in sorted(tags.items()):
        if key.startswith("orch.system_metrics.problem."):
            table.add_row("sampler problem", value)
    return table


def _rank_rows(ranks: dict[int, dict[str, float]]) -> list[tuple[str, str]]:
    def memory(figures: dict[str, float]) -> str:
        if "peak_accelerator_memory_megabytes" in figures:
            return f"peak memory {figures['peak_accelerator_memory_megabytes'] / 1e3:,.2f} GB"
        if "peak_rss_megabytes" in figures:
            return f"peak RSS {figures['peak_rss_megabytes'] / 1e3:,.2f} GB"
        return ""

    rows = []
    if len(ranks) <= MAX_RANK_ROWS:
        for rank, figures in sorted(ranks.items()):
            parts = []
            if "step_time_median_s" in figures:
                parts.append(f"step {_ms(figures['step_time_median_s'])} median, {_ms(figures['step_time_p95_s'])} p95"
                             f", outside backward {_ms(figures['work_time_median_s'])}")
            parts.append(memory(figures))
            rows.append((f"rank {rank}", " · ".join(p for p in parts if p)))
        return rows
    medians = {r: f["step_time_median_s"] for r, f in ranks.items() if "step_time_median_s" in f}
    if medians:
        low, high = min(medians, key=medians.get), max(medians, key=medians.get)
        rows.append((f"{len(ranks)} ranks", f"median step from {_ms(medians[low])} (rank {low}) "
                                            f"to {_ms(medians[high])} (rank {high})"))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"
