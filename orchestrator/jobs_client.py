"""A running Ray cluster seen through its dashboard: Ray's Jobs API (submit, list, logs, stop) plus its node list."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator
from urllib.parse import urlparse

from orchestrator.capacity import NodeOffer
from orchestrator.cluster import ClusterUnavailable

CLUSTER_ENV = "ORCH_CLUSTER"  # a Jobs API address (http://HOST:PORT) for submit/list/status/logs/stop
MLFLOW_PORT_LABEL = "orch.io/mlflow-port"  # set on the head by `orch cluster up` and the configs in cluster/
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Metadata keys a job carries so it names its MLflow run (and the run names the job in its tag orch.ray_job_id).
META_RUN_ID, META_EXPERIMENT, META_TRACKING, META_NAME = (
    "orch.mlflow_run_id", "orch.experiment", "orch.tracking_uri", "orch.job_name")


def is_jobs_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def jobs_address(flag: str | None) -> str:
    """--cluster, else ORCH_CLUSTER, else an http RAY_ADDRESS (Ray's own jobs CLI reads it), else the local cluster."""
    for candidate in (flag, os.environ.get(CLUSTER_ENV), os.environ.get("RAY_ADDRESS")):
        if is_jobs_address(candidate):
            return candidate.rstrip("/")
        if candidate and candidate == flag:
            raise ClusterUnavailable(f"--cluster {flag!r} is not a Ray dashboard address; jobs are listed, followed "
                                     f"and stopped through http://HOST:PORT (the dashboard, 8265 by default)")
    from orchestrator.local_cluster import load_state

    state = load_state()
    if state is None:
        raise ClusterUnavailable(
            "no cluster named: pass --cluster http://HOST:PORT (a Ray dashboard), set ORCH_CLUSTER, or start "
            "a local one with `orch cluster up --local`")
    return state["dashboard_url"]


def use_token_for(address: str) -> None:
    """Token auth stays on; the local cluster's token is found by path, never copied into the environment."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return  # the user named the token for this cluster
    from orchestrator.local_cluster import load_state

    state = load_state()
    if state and address.rstrip("/") == state["dashboard_url"]:
        os.environ["RAY_AUTH_TOKEN_PATH"] = state["token_path"]


def check_dashboard_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Seconds, not the minutes of retries a client library would spend on a dead address."""
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterUnavailable(
            f"no Ray dashboard answers at {address} ({exc.strerror or exc}); start a cluster with "
            f"`orch cluster up --local`, or check the address (the dashboard port, 8265 by default)") from None


def this_machine_addresses() -> set[str]:
    import psutil

    found = {"localhost"}
    for addresses in psutil.net_if_addrs().values():
        found.update(a.address.split("%")[0] for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6))
    return found


def host_of(ip: str, local: set[str]) -> str:
    """Which machine a node is on: every loopback address and every address of this machine is 'this machine'."""
    try:
        if ipaddress.ip_address(ip).is_loopback:
            return "this machine"
    except ValueError:
        pass
    return "this machine" if ip in local else ip


@dataclass
class JobView:
    """What the CLI shows of a Ray job; built from Ray's JobDetails."""

    id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None
    metadata: dict[str, str]
    driver_node_id: str | None

    @property
    def run_id(self) -> str:
        return self.metadata.get(META_RUN_ID, "")


class ClusterClient:
    """One dashboard address; every call fails fast with a ClusterUnavailable naming the address."""

    def __init__(self, address: str):
        self.address = address.rstrip("/")
        check_dashboard_reachable(self.address)
        use_token_for(self.address)
        import logging

        from ray.job_submission import JobSubmissionClient

        logging.getLogger("ray").setLevel(logging.WARNING)  # not "Uploading package ..." at every submit
        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as exc:  # ConnectionError, AuthenticationError, version errors: all mean "cannot use it"
            raise ClusterUnavailable(f"the Ray dashboard at {self.address} refused the connection: "
                                     f"{str(exc).strip().splitlines()[0]}") from None

    def _get(self, path: str) -> dict[str, Any]:
        response = self.client._do_request("GET", path)  # the SDK's own request: same auth headers as its calls
        if response.status_code != 200:
            raise ClusterUnavailable(f"{self.address}{path} answered {response.status_code}: {response.text[:200]}")
        return response.json()

    @cached_property
    def nodes(self) -> list[NodeOffer]:
        """Alive nodes with totals (state API) and what is free on each (the autoscaler's load report)."""
        listed = self._get("/api/v0/nodes?detail=1&limit=10000")["data"]["result"]["result"]
        try:
            status = self._get("/api/cluster_status")["data"].get("clusterStatus") or {}
            usage = (status.get("loadMetricsReport") or {}).get("usageByNode") or {}
        except (ClusterUnavailable, KeyError, ValueError):
            usage = {}
        local = this_machine_addresses()
        offers = []
        for node in listed:
            if node.get("state") != "ALIVE":
                continue
            total = {k: float(v) for k, v in (node.get("resources_total") or {}).items()}
            used_by_key = usage.get(node["node_id"], {})
            # The dashboard camel-cases resource names in this report (Ray's to_camel_case): CPU stays CPU.
            available = {k: v - float(used_by_key.get(_camel(k), [0.0])[0]) for k, v in total.items()}
            offers.append(NodeOffer(name=node.get("node_name") or node["node_ip"], total=total, available=available,
                                    host=host_of(node["node_ip"], local), is_head=bool(node.get("is_head_node")),
                                    labels=dict(node.get("labels") or {})))
            offers[-1].labels.setdefault("orch.io/node-ip", node["node_ip"])
            offers[-1].labels.setdefault("orch.io/node-id", node["node_id"])
        return sorted(offers, key=lambda offer: (not offer.is_head, offer.name))  # head first, then by name

    def head(self) -> NodeOffer | None:
        return next((node for node in self.nodes if node.is_head), None)

    def tracking_uri(self) -> str | None:
        """The cluster's own MLflow server, when its head says where it is."""
        head = self.head()
        port = head.labels.get(MLFLOW_PORT_LABEL) if head else None
        return f"http://{head.labels['orch.io/node-ip']}:{port}" if port else None

    def node_names(self) -> dict[str, str]:
        return {node.labels["orch.io/node-id"]: node.name for node in self.nodes}

    def jobs(self) -> list[JobView]:
        return sorted((_view(details) for details in self.client.list_jobs()),
                      key=lambda job: job.start_time or 0, reverse=True)

    def job(self, job_id: str) -> JobView:
        try:
            return _view(self.client.get_job_info(job_id))
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                raise ClusterUnavailable(f"no job {job_id!r} on {self.address}; `orch list` shows its jobs") from None
            raise

    def submit(self, **kwargs: Any) -> str:
        return self.client.submit_job(**kwargs)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, poll_s: float = 1.0) -> Iterator[str]:
        """New log lines as they come, until the job ends; polling keeps Ctrl-C prompt and needs no websocket."""
        seen = 0
        while True:
            status = self.client.get_job_status(job_id)
            text = self.client.get_job_logs(job_id)
            complete, _, partial = text[seen:].rpartition("\n")
            if complete:
                yield from complete.split("\n")
                seen += len(complete) + 1
            if str(status) in TERMINAL or getattr(status, "value", None) in TERMINAL:
                if partial:
                    yield partial
                return
            time.sleep(poll_s)

    def stop(self, job_id: str) -> bool:
        return self.client.stop_job(job_id)

    def wait(self, job_id: str, timeout_s: float) -> JobView:
        deadline = time.time() + timeout_s
        while True:
            job = self.job(job_id)
            if job.status in TERMINAL or time.time() > deadline:
                return job
            time.sleep(0.5)


def _camel(name: str) -> str:
    parts = name.split("_")
    return parts[0] + "".join(part.title() for part in parts[1:])


def _view(details) -> JobView:
    status = getattr(details.status, "value", str(details.status))
    return JobView(id=details.submission_id or details.job_id or "?", status=status, entrypoint=details.entrypoint,
                   message=details.message or "", start_time=(details.start_time or 0) / 1000 or None,
                   end_time=(details.end_time or 0) / 1000 or None, metadata=dict(details.metadata or {}),
                   driver_node_id=getattr(details, "driver_node_id", None))
