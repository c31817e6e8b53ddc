"""What the CLI prints: the plan before a job, the summary after it."""

from __future__ import annotations

import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from orchestrator.plan import Plan
from orchestrator.spec import JobSpec
from orchestrator.tracking.uri import redact


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix} ({n:,})"
    return f"{n:,}"


def print_plan(console: Console, spec: JobSpec, plan: Plan) -> None:
    from orchestrator.launch import ray_configs, ray_run_name_placeholder

    console.rule(f"[bold]{spec.name}[/] — resolved spec ({plan.source})")
    console.print(Syntax(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "yaml", theme="ansi_dark"))
    console.rule("plan")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    counts, memory = plan.parameters, plan.memory
    rows = [
        ("cluster", plan.cluster),
        ("world size", f"{plan.world_size} workers, {plan.accelerator}, strategy {plan.strategy}, "
                       f"placement {plan.placement}"),
        ("per worker", ", ".join(f"{k} {v:g}" for k, v in plan.resources_per_worker.items())),
        ("model", spec.model.class_path),
        ("parameters", f"{human_count(counts.total)} total, {human_count(counts.trainable)} trainable, "
                       f"{human_count(counts.non_trainable)} non-trainable"),
        ("by module", ", ".join(f"{name} {human_count(n)}" for name, n in counts.by_module.items()) or "-"),
        ("model size", f"{human_bytes(counts.size_bytes)} at {spec.trainer.precision}"),
        *memory_rows(spec, plan),
        ("offered", _offered(plan)),
        ("tracking", redact(plan.tracking_uri)),
        ("checkpoints", f"{plan.storage_path}/{ray_run_name_placeholder(spec)}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.rule("Ray Train request")
    request = ray_configs(spec, plan, ray_run_name_placeholder(spec))
    console.print(Syntax(yaml.safe_dump(request, sort_keys=False), "yaml", theme="ansi_dark"))


def memory_rows(spec: JobSpec, plan: Plan) -> list[tuple[str, str]]:
    """The memory plan per worker: what it is made of, the peak, whether it fits, and what would."""
    m = plan.memory
    acts = (f"{human_bytes(m.activations_bytes)} at micro-batch {m.micro_batch}" if m.activations_bytes is not None
            else m.activations_note)
    checkpointing = ", activation checkpointing" if spec.trainer.activation_checkpointing else ""
    rows = [
        ("memory/worker", f"params {human_bytes(m.parameters_bytes)} + grads {human_bytes(m.gradients_bytes)} + "
                          f"{m.optimizer} state {human_bytes(m.optimizer_bytes)} + activations {acts} + other "
                          f"{human_bytes(m.temporaries_bytes)}"),
        ("peak/worker", f"{human_bytes(m.peak_bytes)} ({plan.strategy}, {spec.trainer.precision}{checkpointing})"
                        + (f"; {human_bytes(m.offloaded_bytes)} offloaded to host memory" if m.offloaded_bytes else "")),
    ]
    if plan.strategy_options:
        rows.append(("strategy", ", ".join(f"{k}={v}" for k, v in plan.strategy_options.items())))
    if m.fits is None:
        rows.append(("fits", m.budget_source))
    elif m.fits:
        rows.append(("fits", f"[green]yes[/]: {human_bytes(m.peak_bytes)} of {human_bytes(m.budget_bytes)} "
                             f"({m.budget_source})"))
    else:
        rows.append(("fits", f"[bold red]NO[/]: {human_bytes(m.peak_bytes)} > {human_bytes(m.budget_bytes)} "
                             f"({m.budget_source}); `orch submit` refuses it without --force"))
        for option in m.recommendations or [{"change": "nothing short of a larger cluster fits", "overrides": {}}]:
            overrides = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                 for k, v in option["overrides"].items())
            peak = f" -> {human_bytes(option['peak_bytes'])}" if "peak_bytes" in option else ""
            rows.append(("  try", f"{option['change']}: {overrides}{peak}" if overrides else option["change"]))
    return rows


def _offered(plan: Plan) -> str:
    if not plan.offered:
        return "checked against the cluster when submitting"
    o = plan.offered
    gpus = f"{o['GPU']} GPUs ({', '.join(o['gpu_names'])})" if o["GPU"] else "no GPU"
    return f"this machine: {o['CPU']} CPUs, {gpus}, {human_bytes(o['memory_bytes'])} memory"


def print_outcome(console: Console, spec: JobSpec, outcome) -> None:
    style = {"FINISHED": "bold green", "KILLED": "bold yellow"}.get(outcome.status, "bold red")
    if outcome.error:
        console.print(outcome.error, markup=False, highlight=False, soft_wrap=True)  # paths stay copyable
    if outcome.metrics:
        table = Table(title="final metrics", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in sorted(outcome.metrics):
            # Lightning reports x, x_step and x_epoch for on_step+on_epoch metrics; x says it once.
            if key not in ("epoch", "step") and not key.endswith(("_step", "_epoch")):
                table.add_row(key, f"{outcome.metrics[key]:.4f}")
        console.print(table)
    from orchestrator.tracking.summary import print_summary

    print_summary(console, outcome.tracking_uri, outcome.run_id)  # hardware and throughput, read back from MLflow
    timings = outcome.timings
    took = f" in {timings['total_s']:.1f} s" if "total_s" in timings else ""
    first = f" (first optimizer step after {timings['first_step_s']:.1f} s)" if "first_step_s" in timings else ""
    console.print(f"[{style}]{outcome.status}[/]{took}{first}")
    phases = [(key[len("startup/"):-2].replace("_", " "), value) for key, value in timings.items()
              if key.startswith("startup/")]
    if phases:  # where the wait before training went: users pay it on every submit
        parts = [f"{name} {value:.1f} s" for name, value in phases]
        if timings.get("warm_workers"):
            parts.append(f"{timings['warm_workers']:.0f} of {spec.scaling.num_workers} workers warm")
        if "run_open_s" in timings:
            parts.append(f"MLflow run opened in {timings['run_open_s']:.1f} s while the workers started")
        console.print("[dim]start-up: " + " · ".join(parts) + "[/]", highlight=False)
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    if outcome.best_checkpoint:
        summary.add_row("best checkpoint", outcome.best_checkpoint)
    summary.add_row("MLflow run", f"{outcome.run_id} (experiment {spec.experiment!r}, {redact(outcome.tracking_uri)})")
    summary.add_row("open the UI", outcome.ui_command)
    console.print(summary)
