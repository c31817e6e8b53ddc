"""Will it fit: the memory estimate for the spec, the memory a worker is offered, and the cheapest change that fits."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.memory import (
    OBJECT_STORE_SHARE, MemoryEstimate, ModelProfile, Setting, estimate, micro_batch_of, optimizer_of,
    setting_from_spec,
)

GIB = 1024 ** 3


def plan_memory(spec, model, offered: dict | None) -> MemoryEstimate:
    """Estimate per worker, compare with what a worker is offered, and recommend changes when it does not fit.

    `model` is the meta-device model; its parameters are swapped for fake tensors while tracing activations.
    """
    micro_batch, _ = micro_batch_of(spec)
    profile = model_profile(spec, model, micro_batch)
    setting = setting_from_spec(spec, micro_batch or 1)
    result = estimate(profile, setting)
    result.budget_bytes, result.budget_source = worker_budget(spec, offered)
    if result.budget_bytes is not None:
        result.fits = result.peak_bytes <= result.budget_bytes
        if not result.fits:
            result.recommendations = recommend(profile, setting, result.budget_bytes, spec, offered)
    return result


def model_profile(spec, model, micro_batch: int | None) -> ModelProfile:
    from orchestrator.strategies import block_classes

    name, states, temporaries = optimizer_of(model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    try:
        blocks = block_classes(model, spec.trainer.activation_checkpointing
                               if isinstance(spec.trainer.activation_checkpointing, list) else True)
    except (ValueError, ImportError):
        blocks = ()
    block_sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if blocks and isinstance(m, blocks)]
    profile = ModelProfile(params=params, trainable=trainable, largest_block_params=max(block_sizes, default=0),
                           root_params=params - sum(block_sizes), optimizer=name, optimizer_states=states,
                           step_temporaries=temporaries)
    if micro_batch is None:
        profile.activations_note = "not estimated: no micro-batch size (set data.init_args.batch_size)"
        return profile
    from orchestrator.activations import trace

    try:
        if getattr(model, "example_input_array", None) is None:
            model.example_input_array = _first_input(spec)
        traced = trace(model, micro_batch, spec.trainer.precision, blocks)
    except Exception as exc:  # a forward that fake tensors cannot run: say so, keep the model-state estimate
        profile.activations_note = f"not estimated: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return profile
    profile.traced_batch = micro_batch
    for key, value in traced.items():
        setattr(profile, key, value)
    return profile


def _first_input(spec):
    """One sample of the data module's first training batch, for modules without `example_input_array`."""
    import torch

    from orchestrator.classpath import instantiate

    data = instantiate(spec.data.model_dump())
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(first, torch.Tensor):
        raise ValueError("the first training batch is not a tensor or a tuple starting with one; set "
                         "`example_input_array` on the module")
    return first[:1].to("meta")


def worker_budget(spec, offered: dict | None) -> tuple[int | None, str]:
    """Memory one worker may use: the spec's word, else this machine's GPU memory or its share of host memory."""
    scaling = spec.scaling
    if scaling.memory_per_worker_gb is not None:
        return int(scaling.memory_per_worker_gb * GIB), "scaling.memory_per_worker_gb"
    if offered is None:
        return None, "not checked: a remote cluster's memory is unknown here; set scaling.memory_per_worker_gb"
    if scaling.use_gpu:
        memories = offered.get("gpu_memory_bytes") or []
        if not memories:
            return None, "not checked: no GPU on this machine to compare with"
        share = min(1.0, scaling.gpus_per_worker)  # fractional GPUs share one device's memory
        return int(min(memories) * share), f"GPU memory ({min(memories) / GIB:.1f} GiB) x {share:g}"
    usable = offered["memory_bytes"] * (1 - OBJECT_STORE_SHARE)
    return int(usable / scaling.num_workers), (
        f"host memory {offered['memory_bytes'] / GIB:.1f} GiB less Ray's object store "
        f"({OBJECT_STORE_SHARE:.0%}), shared by {scaling.num_workers} workers")


def _max_workers(spec, offered: dict | None) -> int:
    if offered is None:
        return 4096  # a remote cluster: the recommendation says how many, the cluster decides
    if spec.scaling.use_gpu:
        return int(offered.get("GPU", 0) / spec.scaling.gpus_per_worker)
    return int(offered.get("CPU", 0) / spec.scaling.cpus_per_worker)


def recommend(profile: ModelProfile, setting: Setting, budget: int, spec, offered) -> list[dict]:
    """Changes that fit, cheapest first: shard (FSDP), more workers, activation checkpointing, smaller micro-batch.

    Each is a set of dotted overrides the user can paste after `orch submit job.yaml`.
    """
    fsdp = replace(setting, strategy="fsdp", sharding="FULL_SHARD")
    candidates: list[tuple[str, str, Setting, dict[str, object]]] = []  # (group, why, setting, overrides)
    if setting.sharding not in ("FULL_SHARD", "ZERO-3") and setting.world_size > 1:
        candidates.append(("fsdp", "shard parameters, gradients and optimizer state across the workers", fsdp,
                           {"scaling.strategy": "fsdp", "scaling.strategy_options.sharding_strategy": "FULL_SHARD"}))
    limit = _max_workers(spec, offered)
    for workers in _doublings(setting.world_size, limit):
        candidates.append(("workers", f"shard over {workers} workers", replace(fsdp, world_size=workers),
                           {"scaling.strategy": "fsdp", "scaling.num_workers": workers}))
    if not setting.checkpointing and profile.block_saved_bytes:
        candidates.append(("checkpointing", "recompute block activations in backward (~30 % more compute)",
                           replace(setting, checkpointing=True), {"trainer.activation_checkpointing": True}))
        candidates.append(("checkpointing", "FSDP and activation checkpointing", replace(fsdp, checkpointing=True),
                           {"scaling.strategy": "fsdp", "trainer.activation_checkpointing": True}))
    accumulate = spec.trainer.accumulate_grad_batches
    for factor in (2, 4, 8, 16, 32, 64):
        smaller = setting.micro_batch // factor
        if smaller < 1 or not profile.traced_batch:
            break
        candidates.append(("batch", f"micro-batch {smaller}, accumulating {accumulate * factor} to keep the global batch",
                           replace(setting, micro_batch=smaller),
                           {"data.init_args.batch_size": smaller, "trainer.accumulate_grad_batches": accumulate * factor}))
    if spec.scaling.use_gpu and not setting.cpu_offload:
        candidates.append(("offload", "FSDP with CPU offload (slow: parameters cross PCIe every step)",
                           replace(fsdp, cpu_offload=True, checkpointing=bool(profile.block_saved_bytes)),
                           {"scaling.strategy": "fsdp", "scaling.strategy_options.cpu_offload": True}))
    fitting, groups = [], set()
    for group, why, candidate, overrides in candidates:
        if group in groups:
            continue  # the first (smallest) change of a kind that fits is the one worth showing
        peak = estimate(profile, candidate).peak_bytes
        if peak <= budget:
            groups.add(group)
            fitting.append({"change": why, "overrides": overrides, "peak_bytes": peak})
    return fitting[:3]


def _doublings(start: int, limit: int) -> list[int]:
    counts, workers = [], start * 2
    while workers <= limit:
        counts.append(workers)
        workers *= 2
    return counts
