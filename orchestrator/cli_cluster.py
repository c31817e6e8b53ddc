"""CLI commands for clusters and jobs: `orch cluster up|status|down`, `orch list|status|logs|stop`.

Only typer and rich are imported here; Ray and MLflow wait until a command runs, so `orch --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from orchestrator.errors import EXIT_BAD_INPUT

console = Console()
err_console = Console(stderr=True)
cluster_app = typer.Typer(help="Start, inspect and stop clusters: a local one, or cloud ones from cluster/*.yaml.",
                          no_args_is_help=True)
ClusterOpt = typer.Option(None, "--cluster", "-c", help="A Ray dashboard, http://HOST:PORT. Default: ORCH_CLUSTER, an "
                                                        "http RAY_ADDRESS, else the cluster `orch cluster up --local` started.")


def _client(address: str | None):
    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.jobs_client import ClusterClient, jobs_address

    try:
        return ClusterClient(jobs_address(address))
    except ClusterUnavailable as exc:
        _fail(str(exc))


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@cluster_app.command("up")
def cluster_up(
    config: Optional[Path] = typer.Argument(None, help="A Ray cluster launcher config (cluster/aws.yaml, cluster/gcp.yaml)."),
    local: bool = typer.Option(False, "--local", help="A persistent Ray head and MLflow server on this machine."),
    host: str = typer.Option("127.0.0.1", help="--local: the address Ray and MLflow listen on; name this machine's "
                                               "LAN address to let other machines join (`ray start --address`)."),
    dashboard_host: str = typer.Option("127.0.0.1", help="--local: where the dashboard (Jobs API) listens."),
    num_cpus: Optional[float] = typer.Option(None, help="--local: CPUs the head offers (default: all)."),
    num_gpus: Optional[int] = typer.Option(None, help="--local: GPUs the head offers (default: all)."),
    warm_minutes: float = typer.Option(
        10, min=0, help="--local: after a job, keep as many processes as it used warm (PyTorch, and Lightning "
                        "for its workers, imported) this long for the next job like it; ~0.56 GiB per worker, "
                        "~0.36 GiB per other actor; 0: none."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Cloud: do not ask before creating machines."),
) -> None:
    """Start a cluster: `--local`, or a cloud one from a launcher config."""
    if local == (config is not None):
        _fail("name either --local or a launcher config such as cluster/aws.yaml")
    if config is not None:
        from orchestrator.launcher import launch

        raise typer.Exit(launch(console, config, yes))
    from orchestrator.local_cluster import up

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]note:[/] on {host}, Ray listens on every interface of this machine (its own rule for "
                      f"any address but 127.0.0.1); token auth keeps it closed to anyone without the token")
    try:
        state = up(console, host=host, dashboard_host=dashboard_host, num_cpus=num_cpus, num_gpus=num_gpus,
                   warm_s=round(warm_minutes * 60))
    except RuntimeError as exc:
        _fail(str(exc), code=1)
    console.print(f"local cluster up: dashboard [bold]{state['dashboard_url']}[/], MLflow [bold]{state['mlflow_url']}[/]",
                  highlight=False)
    console.print(f"submit with `orch submit JOB.yaml --cluster {state['dashboard_url']}` (or export "
                  f"ORCH_CLUSTER={state['dashboard_url']})", highlight=False)
    if state.get("warm_s"):
        console.print(f"after each job, processes like its workers are kept warm {state['warm_s'] / 60:g} min for the "
                      f"next one from the same project (~0.56 GiB per worker; --warm-minutes 0: none)", highlight=False)
    if host in ("127.0.0.1", "localhost", "::1"):
        console.print("a single-machine cluster, every port on loopback; for other nodes to join, start it with "
                      "--host set to an address they reach")
    else:
        console.print(f"other nodes join with `RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state['token_path']} ray start "
                      f"--address {state['gcs_address']}` (the token file copied to them)", highlight=False)


@cluster_app.command("status")
def cluster_status(
    config: Optional[Path] = typer.Argument(None, help="A launcher config: show that cloud cluster instead."),
    cluster: Optional[str] = ClusterOpt,
) -> None:
    """Nodes, CPUs/GPUs in all and free, running jobs, and the cluster's URLs."""
    if config is not None:
        from orchestrator.launcher import status

        raise typer.Exit(status(console, config))
    from orchestrator.job_commands import print_cluster
    from orchestrator.local_cluster import load_state

    client = _client(cluster)
    state = load_state()
    extra = {}
    if state and state["dashboard_url"] == client.address:
        extra = {"MLflow (tracking, UI)": state["mlflow_url"], "Ray (GCS, for `ray start --address`)": state["gcs_address"],
                 "token": f"{state['token_path']} (export RAY_AUTH_TOKEN_PATH=... for the ray CLI)",
                 "logs": str(Path(state["logs"]["ray"]).parent)}
    elif client.tracking_uri():
        extra = {"MLflow (tracking, UI)": client.tracking_uri()}
    print_cluster(console, client, extra)


@cluster_app.command("down")
def cluster_down(
    config: Optional[Path] = typer.Argument(None, help="A launcher config: tear that cloud cluster down."),
    local: bool = typer.Option(False, "--local", help="The cluster `orch cluster up --local` started (the default)."),
    force: bool = typer.Option(False, "--force", help="Do not stop running jobs gracefully first."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Cloud: do not ask before terminating machines."),
) -> None:
    """Stop a cluster: running jobs first (their runs closed as KILLED), then what `up` started, by process id."""
    if config is not None:
        from orchestrator.launcher import teardown

        raise typer.Exit(teardown(console, config, yes))
    from orchestrator.local_cluster import down

    down(console, stop_jobs=not force)


def list_jobs(cluster: Optional[str] = ClusterOpt) -> None:
    """Jobs on the cluster: status, start time, MLflow run."""
    from orchestrator.job_commands import print_jobs

    print_jobs(console, _client(cluster))


def job_status(job_id: str = typer.Argument(..., help="The job id `orch submit` printed."),
               cluster: Optional[str] = ClusterOpt) -> None:
    """One job: status, times, driver node, its MLflow run."""
    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.job_commands import print_status

    try:
        print_status(console, _client(cluster), job_id)
    except ClusterUnavailable as exc:
        _fail(str(exc))


def job_logs(job_id: str = typer.Argument(..., help="The job id."),
             follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
             cluster: Optional[str] = ClusterOpt) -> None:
    """A job's output, every line labelled by node and rank (driver lines by the driver's node)."""
    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.job_commands import print_logs

    try:
        print_logs(_client(cluster), job_id, follow)
    except ClusterUnavailable as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(0)


def job_stop(job_id: str = typer.Argument(..., help="The job id."),
             wait: float = typer.Option(120, help="Seconds to wait for the job to end."),
             cluster: Optional[str] = ClusterOpt) -> None:
    """Stop a job gracefully: its driver checkpoints and closes the MLflow run as KILLED."""
    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.job_commands import stop

    try:
        job = stop(console, _client(cluster), job_id, wait)
    except ClusterUnavailable as exc:
        _fail(str(exc))
    if job.status not in ("STOPPED", "SUCCEEDED", "FAILED"):
        _fail(f"job {job_id} is still {job.status} after {wait:g} s", code=1)


def preflight(job: Path, overrides: list[str]) -> None:
    """For a Jobs API address: refuse a job the cluster can never hold, or an unreachable cluster, in seconds.

    Only the spec is needed (workers, resources, placement), so this runs before the plan builds the model.
    """
    from orchestrator.capacity import assess
    from orchestrator.cluster import ClusterUnavailable, requested_address
    from orchestrator.errors import SpecError
    from orchestrator.jobs_client import ClusterClient, is_jobs_address
    from orchestrator.loader import load_spec
    from orchestrator.remote_submit import check_package, inspect_package, job_file_in

    try:
        spec = load_spec(job, overrides)
    except SpecError:
        return  # `_prepare` reports it, with the same words as without a cluster
    address = requested_address(spec.cluster.address)
    if not is_jobs_address(address):  # joining as a driver: checked after the spec's classes, as before
        return
    per_worker = {"CPU": spec.scaling.cpus_per_worker} | ({"GPU": spec.scaling.gpus_per_worker} if spec.scaling.use_gpu else {})
    try:
        verdict = assess(spec.scaling.num_workers, per_worker, spec.scaling.placement, ClusterClient(address).nodes)
    except ClusterUnavailable as exc:
        _fail(str(exc))
    for problem in verdict.problems:
        err_console.print(f"[bold red]error:[/] {job}: scaling: {problem}; nothing was sent to {address}",
                          highlight=False, soft_wrap=True)
    if verdict.problems:
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        check_package(inspect_package(Path.cwd()), job_file_in(job, Path.cwd()))
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(f"[bold red]error:[/] {problem.render()}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)


def submit_to_cluster(spec, plan, job: Path, overrides: list[str], address: str, detach: bool, verbose: bool) -> int:
    """`orch submit --cluster http://…`: send, then follow to the end unless --detach."""
    import sys

    from orchestrator.cluster import ClusterUnavailable
    from orchestrator.errors import SpecError
    from orchestrator.job_commands import follow_to_end
    from orchestrator.remote_submit import submit_remote
    from orchestrator.tracking.run import TrackingUnavailable

    try:
        # With --detach, stdout is the job id alone (for scripts); what happened goes to stderr.
        client, job_id, _ = submit_remote(spec, plan, job, overrides, address, err_console if detach else console,
                                          verbose)
    except SpecError as exc:
        for problem in exc.problems:
            err_console.print(f"[bold red]error:[/] {problem.render()}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except (ClusterUnavailable, TrackingUnavailable) as exc:
        _fail(str(exc))
    if detach:
        err_console.print(f"follow: orch logs {job_id} -f    status: orch status {job_id}    stop: orch stop {job_id}",
                          highlight=False)
        print(job_id)
        return 0
    return follow_to_end(console, client, job_id, interactive=sys.stdin.isatty())


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.command("list")(list_jobs)
    app.command("status")(job_status)
    app.command("logs")(job_logs)
    app.command("stop")(job_stop)
