"""Memory planner: per-worker peak memory of a training step under a strategy, precision and micro-batch.

Model state comes from the parameter count; activations from one forward pass on fake tensors (no memory
behind them) that records what autograd saves for backward, block by block. No library estimates both for
Lightning/FSDP/DeepSpeed (DeepSpeed's estimators cover only its own model state), hence this module.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

# Bytes a parameter occupies while training: mixed precision keeps fp32 master weights.
BYTES_PER_PARAM = {
    "64-true": 8, "32-true": 4, "16-mixed": 4, "bf16-mixed": 4, "16-true": 2, "bf16-true": 2,
    "transformer-engine": 4, "transformer-engine-float16": 4,
}
# fp32 state tensors each optimizer keeps per parameter.
OPTIMIZER_STATES = {"Adam": 2, "AdamW": 2, "Adamax": 2, "NAdam": 2, "RAdam": 2, "Adagrad": 1, "RMSprop": 1,
                    "Adadelta": 2, "LBFGS": 2}
# Host memory Ray's local cluster keeps for its object store (its default: 30 % of memory).
OBJECT_STORE_SHARE = 0.3


@dataclass
class Setting:
    """The knobs the estimate depends on; recommendations are other settings."""

    strategy: str
    world_size: int
    precision: str
    micro_batch: int
    sharding: str = "NO_SHARD"  # FSDP sharding strategy, or "ZERO-<stage>" for DeepSpeed
    checkpointing: bool = False
    cpu_offload: bool = False
    bucket_view: bool = True  # DDP gradient_as_bucket_view


@dataclass
class ModelProfile:
    """What the estimate needs from the model, measured once on the meta device / fake tensors."""

    params: int
    trainable: int
    largest_block_params: int
    root_params: int  # parameters outside the repeated blocks (FSDP's root unit)
    optimizer: str
    optimizer_states: int
    step_temporaries: int  # parameter-sized temporaries the optimizer's step allocates
    traced_batch: int = 0
    saved_bytes: int = 0  # activations autograd keeps for backward at traced_batch
    block_saved_bytes: list[int] = field(default_factory=list)
    block_input_bytes: list[int] = field(default_factory=list)
    output_bytes: int = 0
    input_bytes: int = 0
    activations_note: str = ""


@dataclass
class MemoryEstimate:
    """Per worker, in bytes; `peak_bytes` is the estimated high-water mark of one training step."""

    parameters_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    optimizer: str
    total_bytes: int  # model state: parameters + gradients + optimizer state
    activations_bytes: int | None = None
    temporaries_bytes: int = 0  # DDP buckets, FSDP gathered units, optimizer step, loss gradients
    offloaded_bytes: int = 0  # moved to host memory by CPU offload
    peak_bytes: int = 0
    micro_batch: int = 0
    activations_note: str = ""
    budget_bytes: int | None = None
    budget_source: str = ""
    fits: bool | None = None
    recommendations: list[dict] = field(default_factory=list)


def setting_from_spec(spec, micro_batch: int) -> Setting:
    scaling, options = spec.scaling, spec.scaling.options
    sharding = "NO_SHARD"
    if scaling.strategy == "fsdp":
        sharding = options.sharding_strategy
    elif scaling.strategy == "deepspeed":
        sharding = f"ZERO-{options.stage}"
    return Setting(
        strategy=scaling.strategy, world_size=scaling.num_workers, precision=spec.trainer.precision,
        micro_batch=micro_batch, sharding=sharding, checkpointing=bool(spec.trainer.activation_checkpointing),
        cpu_offload=bool(getattr(options, "cpu_offload", False) or getattr(options, "offload_optimizer", False)),
        bucket_view=bool(getattr(options, "gradient_as_bucket_view", True)),
    )


def estimate(profile: ModelProfile, s: Setting) -> MemoryEstimate:
    w = max(1, s.world_size)
    pbytes = BYTES_PER_PARAM[s.precision]
    half = 2 if s.precision in ("16-mixed", "bf16-mixed") else pbytes  # FSDP's param/reduce dtype
    shard_params = s.sharding in ("FULL_SHARD", "HYBRID_SHARD", "ZERO-3")
    shard_grads = shard_params or s.sharding in ("SHARD_GRAD_OP", "ZERO-2")
    shard_optim = shard_grads or s.sharding == "ZERO-1"
    params = profile.params * pbytes // (w if shard_params else 1)
    grads = profile.trainable * pbytes // (w if shard_grads else 1)
    optim = profile.trainable * 4 * profile.optimizer_states // (w if shard_optim else 1)
    step = profile.trainable * 4 * profile.step_temporaries // (w if shard_optim else 1)
    # CPU offload: FSDP keeps parameters, gradients and optimizer state on the host; DeepSpeed the optimizer.
    offload_all = s.cpu_offload and s.strategy == "fsdp"
    on_host = (optim + step if s.cpu_offload else 0) + (params + grads if offload_all else 0)
    params_dev, grads_dev = (0, 0) if offload_all else (params, grads)
    optim_dev, step_dev = (0, 0) if s.cpu_offload else (optim, step)
    temporaries = 0
    if s.strategy == "ddp" and not s.bucket_view:
        temporaries += profile.trainable * pbytes  # DDP's buckets beside param.grad
    if s.strategy == "fsdp" and shard_params:
        # The root unit stays gathered; up to two block units are gathered at once (limit_all_gathers),
        # and one unit's full gradient exists before its reduce-scatter.
        temporaries += (profile.root_params + 3 * profile.largest_block_params) * half
    activations = _activations(profile, s) if profile.traced_batch else None
    acts = activations or 0
    scale = s.micro_batch / profile.traced_batch if profile.traced_batch else 0
    loss_grads = int(2 * profile.output_bytes * scale)
    # Lightning zeroes gradients after the forward, so the last step's gradients live through it (end of
    # forward); backward starts without them but with the loss's gradients; the optimizer step adds temporaries.
    end_of_forward = params_dev + grads_dev + optim_dev + acts + temporaries
    start_of_backward = params_dev + optim_dev + acts + loss_grads + temporaries
    optimizer_step = params_dev + grads_dev + optim_dev + step_dev
    peak = max(end_of_forward, start_of_backward, optimizer_step)
    return MemoryEstimate(
        parameters_bytes=params, gradients_bytes=grads, optimizer_bytes=optim, optimizer=profile.optimizer,
        total_bytes=params + grads + optim, activations_bytes=activations,
        temporaries_bytes=peak - (params_dev + grads_dev + optim_dev + acts), offloaded_bytes=on_host,
        peak_bytes=peak, micro_batch=s.micro_batch, activations_note=profile.activations_note)


def _activations(p: ModelProfile, s: Setting) -> int:
    saved = p.saved_bytes
    if s.checkpointing and p.block_saved_bytes:
        # Only each block's input is kept; one block's activations come back while its backward runs.
        saved = saved - sum(p.block_saved_bytes) + sum(p.block_input_bytes) + max(p.block_saved_bytes)
    per_sample = (saved + p.output_bytes + p.input_bytes) / p.traced_batch
    return int(per_sample * s.micro_batch)


def micro_batch_of(spec) -> tuple[int | None, str]:
    """data.init_args.batch_size, else the data class's default batch_size; None when it has neither."""
    if "batch_size" in spec.data.init_args:
        return int(spec.data.init_args["batch_size"]), "data.init_args.batch_size"
    try:
        from orchestrator.classpath import import_class

        default = inspect.signature(import_class(spec.data.class_path).__init__).parameters.get("batch_size")
    except Exception:
        return None, ""
    if default is not None and isinstance(default.default, int):
        return default.default, f"default batch_size of {spec.data.class_path}"
    return None, ""


def optimizer_of(model) -> tuple[str, int, int]:
    """(name, fp32 states per parameter, parameter-sized temporaries of its step), asked of the module itself."""
    try:
        configured = model.configure_optimizers()
    except Exception:  # modules that read self.trainer here cannot answer before training
        return "unknown (assumed Adam)", 2, 1
    optimizer = configured
    if isinstance(configured, dict):
        optimizer = configured.get("optimizer")
    elif isinstance(configured, (list, tuple)) and configured:
        optimizer = configured[0][0] if isinstance(configured[0], (list, tuple)) else configured[0]
    name = type(optimizer).__name__
    defaults = getattr(optimizer, "defaults", {})
    if name == "SGD":
        momentum = defaults.get("momentum", 0)
        # foreach SGD copies the gradients to add weight decay, and again for Nesterov's look-ahead
        temporaries = int(bool(defaults.get("weight_decay"))) + int(bool(defaults.get("nesterov")))
        return name, 1 if momentum else 0, temporaries
    # foreach Adam-family steps build sqrt(v) for every parameter at once; fused ones work in place
    temporaries = 0 if defaults.get("fused") else 1
    return name, OPTIMIZER_STATES.get(name, 2), temporaries


def with_micro_batch(profile: ModelProfile, setting: Setting, micro_batch: int) -> MemoryEstimate:
    return estimate(profile, replace(setting, micro_batch=micro_batch))
