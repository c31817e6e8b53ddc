"""Plan a job before anything starts: the model on the meta device, memory per worker, resources, fit."""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import Problem, ResourceError, SpecError
from orchestrator.memory import BYTES_PER_PARAM, MemoryEstimate
from orchestrator.resources import MachineResources, local_resources
from orchestrator.spec import JobSpec
from orchestrator.tracking.uri import redact, resolve_tracking_uri

DEFAULT_STORAGE_FOLDER = "orch_runs"


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    non_trainable: int
    by_module: dict[str, int]
    size_bytes: int  # at the training precision


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
    strategy_options: dict[str, Any] = field(default_factory=dict)  # as the worker will build the strategy
    planned_by: str = "driver"  # where the model was built and planned (ModelFacts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("model_summary")
        data["tracking_uri"] = redact(self.tracking_uri)
        return data


@dataclass
class ModelFacts:
    """What the plan learns by building the model (on the meta device): the part that needs PyTorch and Lightning.

    Made by plan_model(), in the driver or, on a cold start of the local default, in a worker process that
    imports Lightning anyway (worker_plan.py); plain data, so that it pickles across processes."""
    parameters: ParameterCounts
    memory: MemoryEstimate
    model_summary: str
    strategy_options: dict[str, Any]
    planned_by: str = "driver"  # or "worker process <pid>"


def plan_model(spec: JobSpec, source: str, offered: dict[str, Any] | None, check_classes: bool = True) -> ModelFacts:
    """Build the model on the meta device and plan it; first (check_classes) check the model's and data's classes
    and init_args, which the driver's own path does beforehand (cli._check_classes, with its import retry)."""
    from orchestrator.classpath import check_spec_classes
    from orchestrator.fit import plan_memory

    if check_classes:
        check_spec_classes(spec, source)
    model = _meta_model(spec, source)
    counts = count_parameters(model, spec.trainer.precision)
    summary, strategy_options = _summary(model), _strategy_options(spec, model, source)
    memory = plan_memory(spec, model, offered)  # last: it turns the meta model's tensors into fake ones
    return ModelFacts(counts, memory, summary, strategy_options)


def offered_resources(machine: MachineResources) -> dict[str, Any]:
    """What the local machine offers a job of the local default, as the plan records it."""
    return {"CPU": machine.cpus, "GPU": machine.gpus, "gpu_names": list(machine.gpu_names),
            "memory_bytes": machine.memory_bytes}


def build_plan(spec: JobSpec, source: str, check_fit: bool = True, check_memory: bool = False,
               facts: ModelFacts | None = None) -> Plan:
    """Raise ResourceError when the request can never be met on the local machine, or (check_memory) when
    the estimated peak memory per worker exceeds what a worker is offered. `facts`: the model already planned
    elsewhere (worker_plan.py); else it is planned here, which imports the user's classes and Lightning."""
    from orchestrator.cluster import requested_address

    address = requested_address(spec.cluster.address)
    machine = local_resources() if address is None else None  # a named cluster is asked later, once joined
    if machine is not None and check_fit:
        check_local_fit(spec, source, machine)
    offered = offered_resources(machine) if machine is not None else None
    facts = facts or plan_model(spec, source, offered, check_classes=False)
    per_worker = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        per_worker["GPU"] = spec.scaling.gpus_per_worker
    if check_memory and facts.memory.fits is False:
        raise ResourceError([Problem(source, "scaling", _does_not_fit(facts.memory))])
    return Plan(
        source=source,
        spec=spec.model_dump(mode="json"),
        world_size=spec.world_size,
        accelerator="gpu" if spec.scaling.use_gpu else "cpu",
        resources_per_worker=per_worker,
        placement=spec.scaling.placement,
        strategy=spec.scaling.strategy,
        cluster=address or "local (in-process Ray on 127.0.0.1)",
        tracking_uri=resolve_tracking_uri(spec.tracking.uri),
        storage_path=storage_path(spec),
        parameters=facts.parameters,
        memory=facts.memory,
        offered=offered,
        model_summary=facts.model_summary,
        strategy_options=facts.strategy_options,
        planned_by=facts.planned_by,
    )


def storage_path(spec: JobSpec) -> str:
    """The spec's folder, else the cluster's (ORCH_STORAGE_PATH on its head), else ./orch_runs.

    A Ray job's working folder is a temporary copy, so a job on a cluster with no default keeps ~/orch_runs.
    """
    default = "~/orch_runs" if os.environ.get("ORCH_RAY_JOB_ID") else DEFAULT_STORAGE_FOLDER
    path = spec.checkpoint.storage_path or os.environ.get("ORCH_STORAGE_PATH") or default
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _meta_model(spec: JobSpec, source: str):
    """Build the model with no memory behind its tensors, however large it is; the model's own error in doing
    so is the spec's (its init_args), reported where it was raised rather than as a traceback of ours."""
    import torch

    from orchestrator.classpath import instantiate

    try:
        with torch.device("meta"):
            return instantiate(spec.model.model_dump())
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        module = sys.modules.get(spec.model.class_path.rpartition(".")[0])
        in_module = [f for f in frames if f.filename == getattr(module, "__file__", None)]
        frame = (in_module or frames)[-1]  # the model's own line, rather than the library's that raised
        raise SpecError([Problem(source, "model", (
            f"building {spec.model.class_path} with its init_args failed: {type(exc).__name__}: {exc} "
            f"(raised at {frame.filename}:{frame.lineno})"))]) from exc


def count_parameters(model, precision: str) -> ParameterCounts:
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    by_module = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return ParameterCounts(total, trainable, total - trainable, by_module, total * BYTES_PER_PARAM[precision])


def _strategy_options(spec: JobSpec, model, source: str) -> dict[str, Any]:
    from orchestrator.distributed import describe

    try:
        return describe(spec, model)
    except (ValueError, ImportError) as exc:
        field_name = "trainer.activation_checkpointing" if spec.trainer.activation_checkpointing else \
            "scaling.strategy_options.auto_wrap"
        raise SpecError([Problem(source, field_name, str(exc))]) from None


def _does_not_fit(memory: MemoryEstimate) -> str:
    from orchestrator.report import human_bytes

    text = (f"the estimated peak memory per worker, {human_bytes(memory.peak_bytes)}, exceeds the "
            f"{human_bytes(memory.budget_bytes)} a worker has ({memory.budget_source})")
    if memory.recommendations:
        best = memory.recommendations[0]
        overrides = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in best["overrides"].items())
        text += f". Cheapest change that fits: {best['change']}: {overrides} ({human_bytes(best['peak_bytes'])})"
    else:
        text += ". No single change fits; a larger cluster (more or bigger devices) is needed"
    return text + ". `orch plan` shows the breakdown; `orch submit --force` runs it anyway"


def _summary(model) -> str:
    from lightning.pytorch.utilities.model_summary import ModelSummary

    return f"{ModelSummary(model, max_depth=2)}\n\n{model}\n"


def check_local_fit(spec: JobSpec, source: str, machine: MachineResources | None = None) -> None:
    """The CPUs and GPUs asked for exist on this machine (for the local default, which has no other)."""
    machine = machine or local_resources()
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
