"""Strategy options, typed per strategy (ddp | fsdp | deepspeed): validated with the spec, turned into Lightning kwargs.

No Ray and no torch at import: the spec validates options with this module, the worker builds from them.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from orchestrator.errors import did_you_mean, short_repr


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DDPOptions(_Options):
    find_unused_parameters: bool = False
    # Gradients live inside DDP's communication buckets instead of beside them: one copy of the gradients, not two.
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    bucket_cap_mb: float | None = Field(default=None, gt=0)


class FSDPOptions(_Options):
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    # "blocks": one FSDP unit per repeated block of the model (its `block_classes`, else found); or class paths.
    auto_wrap: Literal["blocks", "none"] | list[str] = "blocks"
    cpu_offload: bool = False
    state_dict_type: Literal["full", "sharded"] = "full"
    limit_all_gathers: bool = True
    forward_prefetch: bool = False


class DeepSpeedOptions(_Options):
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False


OPTIONS: dict[str, type[_Options]] = {"ddp": DDPOptions, "fsdp": FSDPOptions, "deepspeed": DeepSpeedOptions}


def parse_options(strategy: str, raw: dict[str, Any]) -> _Options:
    """Raise a pydantic ValidationError located at strategy_options.<key>, with messages that say what is allowed."""
    model = OPTIONS[strategy]
    try:
        options = model.model_validate(raw)
    except ValidationError as exc:
        raise _located(exc, strategy, model) from None
    return options


def check_scaling(strategy: str, options: _Options, use_gpu: bool) -> list[tuple[tuple[str, ...], str, Any]]:
    """Combinations the types alone cannot refuse: (loc inside scaling, message, given)."""
    problems = []
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append((("strategy",), "deepspeed is an optional extra and is not installed here; install it with "
                         "`pip install 'orchestrator[deepspeed]'`, or use strategy fsdp (FULL_SHARD shards like "
                         "ZeRO stage 3, SHARD_GRAD_OP like stage 2)", strategy))
    if isinstance(options, FSDPOptions) and options.cpu_offload and not use_gpu:
        problems.append((("strategy_options", "cpu_offload"), "moves parameters from GPU memory to the host; with "
                         "scaling.use_gpu false they are on the host already. Set it to false", True))
    if isinstance(options, DeepSpeedOptions) and options.offload_parameters and options.stage != 3:
        problems.append((("strategy_options", "offload_parameters"), f"needs stage 3 (parameters are only sharded "
                         f"there); got stage {options.stage}. Set stage: 3 or offload_parameters: false", True))
    return problems


def raise_problems(problems: list[tuple[tuple[str, ...], str, Any]], title: str = "ScalingSpec") -> None:
    if problems:
        raise ValidationError.from_exception_data(title, [
            InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": message}),
                             loc=loc, input=given) for loc, message, given in problems])


def _located(exc: ValidationError, strategy: str, model: type[_Options]) -> ValidationError:
    fields = list(model.model_fields)
    problems: dict[tuple[str, ...], tuple[str, Any]] = {}  # one message per option (unions report each member)
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        given, ctx = error.get("input"), error.get("ctx") or {}
        if ("strategy_options", key) in problems:
            continue
        if error["type"] == "extra_forbidden":
            owners = [name for name, other in OPTIONS.items() if key in other.model_fields]
            hint = (f" ({key!r} is an option of {' and '.join(owners)}; when switching strategy, clear the "
                    f"others with scaling.strategy_options={{}})") if owners else did_you_mean(key, fields)
            message = f"unknown option {key!r} for strategy {strategy}{hint}; allowed: {', '.join(fields)}"
        elif error["type"] == "literal_error" or key == "auto_wrap":
            options = [o.strip(" '") for o in ctx.get("expected", "").replace(" or ", ", ").split(",")]
            allowed = ", ".join(options)
            if key == "auto_wrap":
                options, allowed = ["blocks", "none"], "blocks, none, or a list of class paths"
            message = f"{short_repr(given)} is not allowed{did_you_mean(str(given), options)}; allowed: {allowed}"
        elif error["type"] in _BOUNDS:
            message = f"must be {_BOUNDS[error['type']]} {next(iter(ctx.values()))}; got {short_repr(given)}"
        else:
            text = error["msg"]
            message = f"{text[0].lower()}{text[1:]}; got {short_repr(given)}"
        problems[("strategy_options", key)] = (message, given)
    return ValidationError.from_exception_data("ScalingSpec", [
        InitErrorDetails(type=PydanticCustomError("value_error", "{message}", {"message": m}), loc=loc, input=g)
        for loc, (m, g) in problems.items()])


_BOUNDS = {"greater_than_equal": "≥", "greater_than": ">", "less_than_equal": "≤", "less_than": "<"}


def block_classes(model, wanted: bool | str | list[str]) -> tuple[type, ...]:
    """The model's repeated block classes: named class paths, else its `block_classes`, else the class that repeats.

    Raises ValueError with the fix when none can be found.
    """
    from orchestrator.classpath import import_class

    if isinstance(wanted, list):
        return tuple(import_class(path) for path in wanted)
    declared = getattr(model, "block_classes", None)
    if declared:
        return tuple(declared)
    found = _repeated_class(model)
    if found is None:
        raise ValueError(f"cannot tell which layers of {type(model).__name__} are its repeated blocks; name them "
                         f"as class paths (e.g. [my_models.Block]) or set `block_classes = (Block,)` on the module")
    return (found,)


def _repeated_class(model) -> type | None:
    """The class with the most instances among the children of the model's lists/sequentials (2 or more)."""
    from torch import nn

    counts: dict[type, int] = {}
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for child in module.children():
                if any(True for _ in child.parameters()) and not isinstance(child, (nn.ModuleList, nn.Sequential)):
                    counts[type(child)] = counts.get(type(child), 0) + 1
    best = max(counts.items(), key=lambda item: item[1], default=None)
    return best[0] if best and best[1] >= 2 else None


def strategy_kwargs(strategy: str, options: _Options, blocks: tuple[type, ...] | None,
                    checkpoint_blocks: tuple[type, ...] | None) -> dict[str, Any]:
    """Keyword arguments for Lightning's DDPStrategy / FSDPStrategy / DeepSpeedStrategy (and Ray's subclasses)."""
    if isinstance(options, DDPOptions):
        kwargs = options.model_dump(exclude_none=True)
        return kwargs
    if isinstance(options, FSDPOptions):
        kwargs = {
            "sharding_strategy": options.sharding_strategy,
            "cpu_offload": options.cpu_offload,
            "state_dict_type": options.state_dict_type,
            "limit_all_gathers": options.limit_all_gathers,
            "forward_prefetch": options.forward_prefetch,
        }
        if blocks:
            kwargs["auto_wrap_policy"] = set(blocks)
        if checkpoint_blocks:
            kwargs["activation_checkpointing_policy"] = set(checkpoint_blocks)
        return kwargs
    assert isinstance(options, DeepSpeedOptions)
    return {"stage": options.stage, "offload_optimizer": options.offload_optimizer,
            "offload_parameters": options.offload_parameters}
