"""Rules for jobs whose workers span machines: checkpoints and metrics must live where every node can reach."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.capacity import NodeOffer, spans_hosts
from orchestrator.errors import Problem, SpecError
from orchestrator.tracking.uri import is_local_store, redact

# Filesystems whose folders other machines see too (psutil reports the mount's type).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
                      "9p", "fuse.sshfs", "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs",
                      "fuse.cephfs", "fuse.glusterfs", "wekafs", "efs")


def filesystem_of(path: str) -> str:
    """The type of the mount holding `path` (or its nearest existing parent)."""
    import psutil

    target = Path(path).expanduser().resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, kind = "", ""
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint
        if (str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, partition.fstype
    return kind


def is_shared_storage(path: str) -> bool:
    return "://" in path or filesystem_of(path) in SHARED_FILESYSTEMS


def loopback_url(uri: str) -> bool:
    host = urlparse(uri).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def check_multinode(source: str, plan, nodes: list[NodeOffer]) -> None:
    """Before launch, on the driver: a job spanning machines must not write to one machine's disk or loopback."""
    if not spans_hosts(nodes):
        return
    hosts = sorted({node.host or node.name for node in nodes})
    where = f"the cluster spans {len(hosts)} machines ({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''})"
    problems = []
    uri = plan.tracking_uri
    if is_local_store(uri) or loopback_url(uri):
        problems.append(Problem(source, "tracking.uri", (
            f"{redact(uri)} can only be reached from {os.uname().nodename}, but {where} and rank 0 may run on any "
            f"of them; use a tracking server every node reaches, such as the head's MLflow server (http://HEAD:5000)")))
    storage = plan.storage_path
    if not is_shared_storage(storage):
        problems.append(Problem(source, "checkpoint.storage_path", (
            f"{storage} is on a {filesystem_of(storage) or 'local'} filesystem of {os.uname().nodename}, but {where}; "
            f"checkpoints need a folder every node shares (NFS, EFS, Lustre, ...) or s3:// / gs://")))
    if problems:
        raise SpecError(problems)
