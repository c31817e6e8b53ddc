"""`orch submit --cluster http://…`: check the job against the cluster, open its MLflow run, send it as a Ray job.

The Ray job's entrypoint is `python -m orchestrator submit` itself, run on the head as the driver with the
project folder as its working directory, attached to the MLflow run opened here: so the job and its run
name each other (job metadata orch.mlflow_run_id, run tag orch.ray_job_id) before anything starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from orchestrator.capacity import assess
from orchestrator.errors import Problem, ResourceError, SpecError
from orchestrator.jobs_client import META_EXPERIMENT, META_NAME, META_RUN_ID, META_TRACKING, ClusterClient
from orchestrator.multinode import loopback_url
from orchestrator.plan import Plan
from orchestrator.spec import JobSpec
from orchestrator.tracking.uri import is_local_store, redact, resolve_tracking_uri

GIT_EXCLUDES = [".git"]  # Ray uploads .git unless told; the commit is recorded as a tag instead


@dataclass
class Package:
    root: Path
    files: set[str]
    size_bytes: int
    by_entry: dict[str, int]  # top-level file or folder -> bytes, to say what makes a package too large


def inspect_package(root: Path) -> Package:
    """What Ray will upload: the folder minus .gitignore/.rayignore matches and .git, walked by Ray's own rules."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    files: set[str] = set()
    by_entry: dict[str, int] = {}
    total = 0

    def count(path: Path) -> None:
        nonlocal total
        if path.is_file():
            relative = path.relative_to(root)
            size = path.stat().st_size
            files.add(relative.as_posix())
            by_entry[relative.parts[0]] = by_entry.get(relative.parts[0], 0) + size
            total += size

    quiet = logging.getLogger("orch.package")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    _dir_travel(root, [_get_excludes(root, GIT_EXCLUDES)], count, include_gitignore=include_gitignore, logger=quiet)
    return Package(root, files, total, by_entry)


def check_package(package: Package, job_file: str) -> None:
    """Ray refuses packages over its gRPC message limit only after zipping and uploading; say so before."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    from orchestrator.report import human_bytes

    if job_file not in package.files:
        raise SpecError([Problem(job_file, "", f"the job file is not in what is uploaded from {package.root}: it is "
                                               f"ignored by .gitignore or .rayignore there; move it or un-ignore it")])
    size = package.size_bytes
    if size + 512 * len(package.files) >= GCS_STORAGE_MAX_SIZE:  # the zip can only shrink the files themselves
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            archive = Path(folder) / "package.zip"
            create_package(str(package.root), archive, include_gitignore=True, excludes=GIT_EXCLUDES,
                           logger=logging.getLogger("orch.package"))
            size = archive.stat().st_size
    if size >= GCS_STORAGE_MAX_SIZE:
        biggest = sorted(package.by_entry.items(), key=lambda item: -item[1])[:5]
        raise SpecError([Problem(str(package.root), "", (
            f"the project folder packs to {human_bytes(size)}, over Ray's upload limit of "
            f"{human_bytes(GCS_STORAGE_MAX_SIZE)} ({len(package.files)} files; largest: "
            f"{', '.join(f'{name} {human_bytes(n)}' for name, n in biggest)}). List data, outputs and virtual "
            f"environments in .gitignore or .rayignore, or read large files from shared storage"))])


def cluster_overrides(spec: JobSpec, source: str, client: ClusterClient) -> tuple[list[str], str]:
    """Pin what the driver would otherwise resolve on the head (relative to a temporary folder): tracking, storage."""
    on_this_machine = all(node.host == "this machine" for node in client.nodes)
    if spec.tracking.uri:
        tracking = resolve_tracking_uri(spec.tracking.uri)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        tracking = resolve_tracking_uri()
    else:
        tracking = client.tracking_uri() or resolve_tracking_uri()
    problems = []
    if not on_this_machine and (is_local_store(tracking) or loopback_url(tracking)):
        problems.append(Problem(source, "tracking.uri", (
            f"{redact(tracking)} is only reachable on this machine, but the job runs on the cluster's nodes; "
            f"name a tracking server every node can reach (e.g. the head's MLflow server, http://HEAD:5000)")))
    overrides = [f"tracking.uri={tracking}"]
    storage = spec.checkpoint.storage_path
    if storage and "://" not in storage and not Path(storage).expanduser().is_absolute():
        if on_this_machine:
            overrides.append(f"checkpoint.storage_path={Path(storage).resolve()}")
        else:
            problems.append(Problem(source, "checkpoint.storage_path", (
                f"{storage!r} is relative: on the cluster it would land in the job's temporary working folder; "
                f"give a folder every node shares (absolute), or s3:// / gs://")))
    if problems:
        raise SpecError(problems)
    return overrides, tracking


def submit_remote(spec: JobSpec, plan: Plan, job: Path, overrides: list[str], address: str, console,
                  verbose: bool = False) -> tuple[ClusterClient, str, str]:
    """Check, open the run, send; returns (client, job id, tracking URI). Nothing is sent when a check fails."""
    from orchestrator.launch import run_tags
    from orchestrator.tracking.run import RunRecord, check_tracking

    source = str(job)
    client = ClusterClient(address)
    verdict = assess(plan.world_size, plan.resources_per_worker, plan.placement, client.nodes)
    if not verdict.possible:
        raise ResourceError([Problem(source, "scaling", f"{p}; nothing was sent to {address}") for p in verdict.problems])
    pinned, tracking = cluster_overrides(spec, source, client)
    root = Path.cwd()
    job_file = job_file_in(job, root)
    package = inspect_package(root)
    check_package(package, job_file)
    check_tracking(tracking)
    job_id = f"orch-{spec.name}-{secrets.token_hex(3)}"
    tags = run_tags(spec, plan, source) | {"orch.ray_job_id": job_id, "orch.cluster": address}
    record = RunRecord(tracking, spec.experiment, spec.tracking.run_name, tags)
    arguments = ["python3", "-m", "orchestrator", "submit", job_file, *overrides, *pinned, "--cluster", "auto",
                 "--attach-run", record.run_id] + (["--verbose"] if verbose else [])
    from orchestrator.local_cluster import STOP_GRACE_S

    try:
        client.submit(
            # The job id goes to the driver's own environment (the entrypoint runs in a shell), not the job's
            # runtime env: every actor inherits that, and a per-job value would keep it off warm processes.
            entrypoint=f"ORCH_RAY_JOB_ID={shlex.quote(job_id)} {shlex.join(arguments)}", submission_id=job_id,
            runtime_env={"working_dir": str(root), "excludes": GIT_EXCLUDES, "env_vars": {
                # Ray folds log lines that differ only in numbers ("[repeated 2x]"): here, the rank is the number.
                "RAY_DEDUP_LOGS": "0",
                # stop_job's SIGTERM-to-SIGKILL wait, read by the job's supervisor: time to checkpoint and close the run.
                "RAY_JOB_STOP_WAIT_TIME_S": os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_GRACE_S))}},
            metadata={META_RUN_ID: record.run_id, META_EXPERIMENT: spec.experiment, META_NAME: spec.name,
                      META_TRACKING: redact(tracking)})
    except BaseException as exc:
        record.client.delete_run(record.run_id)  # nothing started: leave no run behind either
        raise SpecError([Problem(source, "", f"{address} did not accept the job: {str(exc).strip()[:500]}")]) from None
    console.print(f"submitted job [bold]{job_id}[/] to {address} ({len(package.files)} files, "
                  f"{package.size_bytes / 2**20:.1f} MiB uploaded); MLflow run {record.run_id} at {redact(tracking)}",
                  highlight=False)
    if verdict.waiting:
        console.print(f"[yellow]{verdict.waiting}[/]", highlight=False)
    return client, job_id, tracking


def job_file_in(job: Path, root: Path) -> str:
    """The job file's path inside the uploaded folder: where the driver on the head opens it."""
    source = str(job)
    try:
        return job.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise SpecError([Problem(source, "", f"the job file must be inside the project folder that is uploaded "
                                             f"({root}); run orch from the folder that holds it")]) from None
