"""Plan a job before anything starts: the model on the meta device, memory per worker, resources, fit."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import Problem, ResourceError
from orchestrator.resources import MachineResources, local_resources
from orchestrator.spec import JobSpec
from orchestrator.tracking.uri import redact, resolve_tracking_uri

# Bytes a parameter occupies while training: mixed precision keeps fp32 master weights.
BYTES_PER_PARAM = {
    "64-true": 8, "32-true": 4, "16-mixed": 4, "bf16-mixed": 4, "16-true": 2, "bf16-true": 2,
    "transformer-engine": 4, "transformer-engine-float16": 4,
}
# fp32 state tensors each optimizer keeps per parameter.
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "RMSprop": 1,
                    "Adadelta": 2, "LBFGS": 2}
DEFAULT_STORAGE_FOLDER = "orch_runs"


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    non_trainable: int
    by_module: dict[str, int]
    size_bytes: int  # at the training precision


@dataclass
class MemoryEstimate:
    """Per worker, model state only: activations depend on the batch and are not counted here."""

    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    optimizer: str
    total_bytes: int


@dataclass
class Plan:
    source: str
    spec: dict[str, Any]
    world_size: int
    accelerator: str
    resources_per_worker: dict[str, float]
    placement: str
    strategy: str
    cluster: str
    tracking_uri: str
    storage_path: str
    parameters: ParameterCounts
    memory: MemoryEstimate
    offered: dict[str, Any] | None
    model_summary: str = field(repr=False, default="")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("model_summary")
        data["tracking_uri"] = redact(self.tracking_uri)
        return data


def build_plan(spec: JobSpec, source: str, check_fit: bool = True) -> Plan:
    """Raise ResourceError when the request can never be met on the local machine."""
    model = _meta_model(spec)
    counts = count_parameters(model, spec.trainer.precision)
    memory = estimate_memory(model, counts, spec)
    accelerator = "gpu" if spec.scaling.use_gpu else "cpu"
    per_worker = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        per_worker["GPU"] = spec.scaling.gpus_per_worker
    from orchestrator.cluster import requested_address

    address = requested_address(spec.cluster.address)
    offered = None
    if address is None:
        machine = local_resources()
        offered = {"CPU": machine.cpus, "GPU": machine.gpus, "gpu_names": list(machine.gpu_names),
                   "memory_bytes": machine.memory_bytes}
        if check_fit:
            _check_local_fit(spec, source, machine)
    return Plan(
        source=source,
        spec=spec.model_dump(mode="json"),
        world_size=spec.world_size,
        accelerator=accelerator,
        resources_per_worker=per_worker,
        placement=spec.scaling.placement,
        strategy=spec.scaling.strategy,
        cluster=address or "local (in-process Ray on 127.0.0.1)",
        tracking_uri=resolve_tracking_uri(spec.tracking.uri),
        storage_path=storage_path(spec),
        parameters=counts,
        memory=memory,
        offered=offered,
        model_summary=_summary(model),
    )


def storage_path(spec: JobSpec) -> str:
    """The spec's folder, else the cluster's (ORCH_STORAGE_PATH on its head), else ./orch_runs.

    A Ray job's working folder is a temporary copy, so a job on a cluster with no default keeps ~/orch_runs.
    """
    default = "~/orch_runs" if os.environ.get("ORCH_RAY_JOB_ID") else DEFAULT_STORAGE_FOLDER
    path = spec.checkpoint.storage_path or os.environ.get("ORCH_STORAGE_PATH") or default
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _meta_model(spec: JobSpec):
    """Build the model with no memory behind its tensors, however large it is."""
    import torch

    from orchestrator.classpath import instantiate

    with torch.device("meta"):
        return instantiate(spec.model.model_dump())


def count_parameters(model, precision: str) -> ParameterCounts:
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    by_module = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return ParameterCounts(total, trainable, total - trainable, by_module, total * BYTES_PER_PARAM[precision])


def estimate_memory(model, counts: ParameterCounts, spec: JobSpec) -> MemoryEstimate:
    bytes_per_param = BYTES_PER_PARAM[spec.trainer.precision]
    optimizer, states = _optimizer_states(model)
    params = counts.total * bytes_per_param
    grads = counts.trainable * bytes_per_param
    optim = counts.trainable * 4 * states
    return MemoryEstimate(params, grads, optim, optimizer, params + grads + optim)


def _optimizer_states(model) -> tuple[str, int]:
    """Ask the module which optimizer it builds; its state is not allocated until the first step."""
    try:
        configured = model.configure_optimizers()
    except Exception:  # modules that read self.trainer here cannot answer before training
        return "unknown (assumed Adam)", 2
    optimizer = configured
    if isinstance(configured, dict):
        optimizer = configured.get("optimizer")
    elif isinstance(configured, (list, tuple)) and configured:
        optimizer = configured[0][0] if isinstance(configured[0], (list, tuple)) else configured[0]
    name = type(optimizer).__name__
    if name == "SGD":
        momentum = optimizer.defaults.get("momentum", 0) if hasattr(optimizer, "defaults") else 0
        return name, 1 if momentum else 0
    return name, OPTIMIZER_STATES.get(name, 2)


def _summary(model) -> str:
    from lightning.pytorch.utilities.model_summary import ModelSummary

    return f"{ModelSummary(model, max_depth=2)}\n\n{model}\n"


def _check_local_fit(spec: JobSpec, source: str, machine: MachineResources) -> None:
    problems = []
    workers = spec.scaling.num_workers
    cpus = workers * spec.scaling.cpus_per_worker
    if cpus > machine.cpus:
        problems.append(Problem(source, "scaling", (
            f"asks for {cpus:g} CPUs ({workers} workers x {spec.scaling.cpus_per_worker:g}); this machine has "
            f"{machine.cpus}, short by {cpus - machine.cpus:g}. Lower scaling.num_workers or "
            f"scaling.cpus_per_worker, or name a larger cluster in cluster.address")))
    if spec.scaling.use_gpu:
        gpus = workers * spec.scaling.gpus_per_worker
        if gpus > machine.gpus:
            problems.append(Problem(source, "scaling.use_gpu", (
                f"asks for {gpus:g} GPUs ({workers} workers x {spec.scaling.gpus_per_worker:g}); this machine has "
                f"{machine.gpus}, short by {gpus - machine.gpus:g}. Set scaling.use_gpu=false to train on CPUs, "
                f"or name a cluster with GPUs in cluster.address")))
    if problems:
        raise ResourceError(problems)
