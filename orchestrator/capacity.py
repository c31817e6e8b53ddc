"""Can a cluster ever hold a job, and can it now? Placement-aware, from plain node data (no Ray imported here).

Ray itself would queue an impossible placement group forever without a word; this module turns the same
arithmetic into a refusal that names the shortfall, or a note that the job will wait and why. Both the
client (from the dashboard's node list) and the driver (from `ray.nodes()`) feed it the same shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Head-node labels a cluster uses to say what its autoscaler can grow to, e.g. `orch.io/max-GPU=8`.
# Ray's dashboard shows node labels but not the autoscaler's config, so the configs in cluster/ set these.
MAX_LABEL_PREFIX = "orch.io/max-"


@dataclass
class NodeOffer:
    name: str
    total: dict[str, float]
    available: dict[str, float]
    host: str = ""  # the machine; nodes on one machine share its disks and its loopback address
    is_head: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Verdict:
    problems: list[str]  # why the job can never start, each naming the shortfall; empty when it can
    waiting: str | None = None  # why it cannot start right now (busy resources, nodes still to come)

    @property
    def possible(self) -> bool:
        return not self.problems


def autoscaler_max(nodes: list[NodeOffer]) -> dict[str, float]:
    """{"GPU": 8.0, ...} from `orch.io/max-<resource>` labels; empty when no node declares an autoscaler."""
    limits: dict[str, float] = {}
    for node in nodes:
        for key, value in node.labels.items():
            if key.startswith(MAX_LABEL_PREFIX):
                try:
                    limits[key.removeprefix(MAX_LABEL_PREFIX)] = float(value)
                except ValueError:
                    continue
    return limits


def workers_that_fit(resources: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many identical workers one node holds: the scarcest resource decides."""
    counts = [math.floor(resources.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items() if amount > 0]
    return min(counts) if counts else 0


def _placement_problem(num_workers: int, per_worker: dict[str, float], placement: str,
                       per_node: list[tuple[str, float]], what: str) -> str | None:
    """None when `per_node` (name, workers it holds) can host the job under `placement`; else the reason."""
    need = _describe(per_worker)
    holding = [(name, count) for name, count in per_node if count >= 1]
    if placement == "STRICT_SPREAD":
        if len(holding) < num_workers:
            return (f"placement STRICT_SPREAD puts each of the {num_workers} workers on its own node, so it needs "
                    f"{num_workers} nodes with {need} free each; {what} {len(holding)} such node(s)"
                    f"{_names(holding)}, short by {num_workers - len(holding)}")
        return None
    if placement == "STRICT_PACK":
        best = max((count for _, count in per_node), default=0)
        if best < num_workers:
            return (f"placement STRICT_PACK puts all {num_workers} workers on one node ({_describe(per_worker, num_workers)}"
                    f" together); {what} at most {best:g} worker(s) on any single node")
        return None
    if sum(count for _, count in per_node) < num_workers:
        return (f"{num_workers} workers need {need} each; {what} room for {sum(c for _, c in per_node):g} "
                f"({', '.join(f'{name}: {count:g}' for name, count in holding)})")
    return None


def assess(num_workers: int, per_worker: dict[str, float], placement: str, nodes: list[NodeOffer]) -> Verdict:
    """Refuse what can never run (naming the shortfall); say why a job that can run must wait."""
    per_worker = {k: v for k, v in per_worker.items() if v > 0}
    limits = autoscaler_max(nodes)
    problems = []
    for name, amount in per_worker.items():
        wanted = amount * num_workers
        have = sum(node.total.get(name, 0.0) for node in nodes)
        ceiling = max(have, limits.get(name, 0.0))
        if wanted > ceiling + 1e-9:
            where = (f"the autoscaler can grow the cluster to {ceiling:g}" if name in limits
                     else f"the cluster has {have:g} in all")
            problems.append(f"asks for {wanted:g} {name} ({num_workers} workers x {amount:g}); {where}, "
                            f"short by {wanted - ceiling:g}")
    if problems:
        return Verdict(problems)
    totals = [(node.name, workers_that_fit(node.total, per_worker)) for node in nodes]
    if nodes and not any(count for _, count in totals) and not limits:
        largest = ", ".join(f"{max(n.total.get(k, 0.0) for n in nodes):g} {k}" for k in per_worker)
        return Verdict([f"one worker needs {_describe(per_worker)} on a single node; the largest node has "
                        f"{largest}. Lower scaling.cpus_per_worker / gpus_per_worker or add larger nodes"])
    placement_now = _placement_problem(num_workers, per_worker, placement, totals, "the cluster has")
    if placement_now and not limits:
        return Verdict([placement_now])
    if placement_now:
        grow = ", ".join(f"{k} {v:g}" for k, v in sorted(limits.items()))
        return Verdict([], f"the nodes up now cannot hold it ({placement_now}); it waits for the autoscaler "
                           f"to add nodes (it can grow to {grow})")
    free = [(node.name, workers_that_fit(node.available, per_worker)) for node in nodes]
    busy = _placement_problem(num_workers, per_worker, placement, free, "right now the cluster has")
    if busy:
        in_use = ", ".join(f"{name} {sum(n.total.get(name, 0) - n.available.get(name, 0) for n in nodes):g} of "
                           f"{sum(n.total.get(name, 0) for n in nodes):g}" for name in per_worker)
        return Verdict([], f"queued: other work holds the resources it needs ({in_use} in use); {busy}. "
                           f"It starts when they are released")
    return Verdict([])


def spans_hosts(nodes: list[NodeOffer]) -> bool:
    return len({node.host or node.name for node in nodes}) > 1


def _describe(per_worker: dict[str, float], times: int = 1) -> str:
    return ", ".join(f"{amount * times:g} {name}" for name, amount in per_worker.items()) or "nothing"


def _names(holding: list[tuple[str, float]]) -> str:
    return f" ({', '.join(name for name, _ in holding)})" if holding else ""
