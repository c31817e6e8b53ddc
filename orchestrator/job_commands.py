"""What `orch list | status | logs | stop | cluster status` print, and following a job to its end."""

from __future__ import annotations

import re
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TRAINING_FAILED
from orchestrator.jobs_client import META_RUN_ID, META_TRACKING, TERMINAL, ClusterClient, JobView
from orchestrator.output_labels import relabel

RUN_STATUS_FOR_JOB = {"STOPPED": "KILLED", "FAILED": "FAILED", "SUCCEEDED": "FAILED"}


def settle_run(job: JobView) -> str | None:
    """Close a run its driver never closed (killed, or dead before it started); returns the run's status.

    The driver owns its run's status; this only covers a driver that could not act (SIGKILL after the grace
    period, a failed runtime env), so no run is left RUNNING for a job that has ended.
    """
    run_id, uri = job.metadata.get(META_RUN_ID), job.metadata.get(META_TRACKING)
    if not run_id or not uri or "***" in uri:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        run = client.get_run(run_id)
        if run.info.status in ("RUNNING", "SCHEDULED") and job.status in TERMINAL:
            status = RUN_STATUS_FOR_JOB[job.status]
            reason = job.message or f"the Ray job ended {job.status}"
            client.set_tag(run_id, "orch.error", f"closed by orch after its Ray job {job.id} ended {job.status}: "
                                                 f"{reason}"[:500])
            client.set_terminated(run_id, status=status)
            return status
        return run.info.status
    except Exception:  # the tracking server may be unreachable from here; the job's status still stands
        return None


def exit_code(job: JobView) -> int:
    if job.status == "SUCCEEDED":
        return 0
    if job.status == "STOPPED":
        return EXIT_INTERRUPTED
    found = re.search(r"exit code (\d+)", job.message or "")
    return int(found[1]) if found and int(found[1]) in (EXIT_BAD_INPUT, EXIT_INTERRUPTED) else EXIT_TRAINING_FAILED


def print_jobs(console: Console, client: ClusterClient) -> None:
    table = Table(title=f"jobs on {client.address}", title_justify="left")
    for column in ("job", "status", "started", "duration", "name", "MLflow run"):
        table.add_column(column, no_wrap=True)
    table.add_column("message", overflow="fold")
    for job in client.jobs():
        table.add_row(job.id, _status(job.status), _when(job.start_time), _duration(job), job.metadata.get("orch.job_name", ""),
                      job.run_id or "-", (job.message or "").splitlines()[0][:60] if job.message else "")
    console.print(table)


def print_status(console: Console, client: ClusterClient, job_id: str) -> JobView:
    job = client.job(job_id)
    run_status = settle_run(job)
    names = client.node_names()
    rows = [("job", job.id), ("status", _status(job.status)), ("message", job.message or "-"),
            ("started", _when(job.start_time)), ("ended", _when(job.end_time)), ("duration", _duration(job)),
            ("driver node", names.get(job.driver_node_id or "", job.driver_node_id or "-")),
            ("MLflow run", f"{job.run_id or '-'}" + (f" ({run_status})" if run_status else "")),
            ("tracking", job.metadata.get(META_TRACKING, "-")),
            ("entrypoint", re.sub(r"://[^/@\s]+@", "://***@", job.entrypoint))]  # no user:password from URIs
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    return job


def print_logs(client: ClusterClient, job_id: str, follow: bool) -> JobView:
    job = client.job(job_id)
    names = client.node_names()
    by_ip = {node.labels.get("orch.io/node-ip", ""): node.name for node in client.nodes}
    lines = client.follow(job_id) if follow else iter(client.logs(job_id).splitlines())
    for line in lines:
        if job.driver_node_id is None:  # known once the driver has started
            job = client.job(job_id)
        sys.stdout.write(relabel(line, names.get(job.driver_node_id or "", "head"), by_ip) + "\n")
        sys.stdout.flush()
    return client.job(job_id)


def stop(console: Console, client: ClusterClient, job_id: str, wait_s: float) -> JobView:
    job = client.job(job_id)
    if job.status in TERMINAL:
        console.print(f"job {job_id} already ended: {job.status}")
        return job
    client.stop(job_id)
    console.print(f"stopping job {job_id}: its driver checkpoints and closes MLflow run {job.run_id or '-'} as KILLED")
    job = client.wait(job_id, timeout_s=wait_s)
    run_status = settle_run(job)
    console.print(f"job {job_id}: {_status(job.status)}; MLflow run {job.run_id or '-'}: {run_status or 'unknown'}")
    return job


def follow_to_end(console: Console, client: ClusterClient, job_id: str, interactive: bool) -> int:
    """Stream the job's labelled log; Ctrl-C asks whether to stop the job or detach from it."""
    try:
        job = print_logs(client, job_id, follow=True)
    except KeyboardInterrupt:
        if _wants_stop(console, job_id, interactive):
            job = stop(console, client, job_id, wait_s=120)
            return exit_code(job)
        console.print(f"detached; job {job_id} keeps running. Follow it with `orch logs {job_id} -f`, stop it with "
                      f"`orch stop {job_id}`")
        return 0
    run_status = settle_run(job)
    console.print(f"job {job_id}: {_status(job.status)}" + (f"; MLflow run {job.run_id}: {run_status}" if run_status else ""))
    return exit_code(job)


def print_cluster(console: Console, client: ClusterClient, extra: dict[str, str]) -> None:
    table = Table(title=f"nodes of {client.address}", title_justify="left")
    for column in ("node", "ip", "head", "CPU free/total", "GPU free/total", "memory"):
        table.add_column(column)
    totals = {"CPU": [0.0, 0.0], "GPU": [0.0, 0.0]}
    for node in client.nodes:
        cells = []
        for resource in ("CPU", "GPU"):
            free, total = node.available.get(resource, 0.0), node.total.get(resource, 0.0)
            totals[resource][0] += free
            totals[resource][1] += total
            cells.append(f"{free:g}/{total:g}")
        table.add_row(node.name, node.labels.get("orch.io/node-ip", ""), "yes" if node.is_head else "", *cells,
                      f"{node.total.get('memory', 0) / 2**30:.1f} GiB")
    console.print(table)
    console.print(f"in all: CPU {totals['CPU'][0]:g} free of {totals['CPU'][1]:g}, GPU {totals['GPU'][0]:g} free of "
                  f"{totals['GPU'][1]:g}")
    running = [job for job in client.jobs() if job.status in ("PENDING", "RUNNING")]
    console.print(f"running jobs: {', '.join(f'{job.id} ({job.status})' for job in running) or 'none'}")
    for key, value in {"dashboard (Jobs API)": client.address, **extra}.items():
        console.print(f"[bold]{key}[/]: {value}", highlight=False)


def _wants_stop(console: Console, job_id: str, interactive: bool) -> bool:
    if not interactive:
        return False
    try:
        answer = console.input(f"\nstop job {job_id} (its run is closed as KILLED) or detach and leave it running? "
                               f"{escape('[s]top / [d]etach')}: ")
    except (KeyboardInterrupt, EOFError):
        return False
    return answer.strip().lower().startswith("s")


def _status(status: str) -> str:
    colour = {"SUCCEEDED": "green", "RUNNING": "cyan", "PENDING": "cyan", "STOPPED": "yellow"}.get(status, "red")
    return f"[{colour}]{status}[/]"


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _duration(job: JobView) -> str:
    if not job.start_time:
        return "-"
    seconds = (job.end_time or time.time()) - job.start_time
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"
