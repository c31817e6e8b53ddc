"""Worker side of scale: the Ray strategy for the spec, activation checkpointing and torch.compile on the blocks."""

from __future__ import annotations

from typing import Any

from orchestrator.spec import JobSpec
from orchestrator.strategies import block_classes, strategy_kwargs


def wrap_and_checkpoint_blocks(spec: JobSpec, model) -> tuple[tuple[type, ...] | None, tuple[type, ...] | None]:
    """(classes FSDP wraps one unit each, classes whose activations are recomputed), per the spec."""
    options = spec.scaling.options
    wrap = None
    if spec.scaling.strategy == "fsdp" and options.auto_wrap != "none":
        wrap = block_classes(model, options.auto_wrap if isinstance(options.auto_wrap, list) else True)
    checkpoint = None
    if spec.trainer.activation_checkpointing:
        checkpoint = block_classes(model, spec.trainer.activation_checkpointing)
    return wrap, checkpoint


def build_strategy(spec: JobSpec, model):
    """Ray's Lightning strategy for `scaling.strategy`, configured from the typed `scaling.strategy_options`."""
    from ray.train import lightning as ray_lightning

    wrap, checkpoint = wrap_and_checkpoint_blocks(spec, model)
    kwargs = strategy_kwargs(spec.scaling.strategy, spec.scaling.options, wrap,
                             checkpoint if spec.scaling.strategy == "fsdp" else None)
    if spec.scaling.strategy == "ddp":
        return _ddp_class()(**kwargs)
    if spec.scaling.strategy == "fsdp":
        return _fsdp_class()(**kwargs)
    return ray_lightning.RayDeepSpeedStrategy(**kwargs)


def prepare_model(spec: JobSpec, model) -> None:
    """Activation checkpointing (FSDP applies its own after wrapping) and torch.compile, in place, before fit."""
    _, checkpoint = wrap_and_checkpoint_blocks(spec, model)
    if checkpoint and spec.scaling.strategy != "fsdp":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, checkpoint))
    if spec.trainer.compile:
        compile_blocks(model)


def trainer_gradient_clip(spec: JobSpec) -> float | None:
    """Lightning's FSDP refuses trainer-level norm clipping; FSDPGradientClipping does it there instead."""
    return None if spec.scaling.strategy == "fsdp" else spec.trainer.gradient_clip_val


def scale_callbacks(spec: JobSpec) -> list:
    if spec.scaling.strategy == "fsdp" and spec.trainer.gradient_clip_val:
        return [fsdp_gradient_clipping(spec.trainer.gradient_clip_val)]
    return []


def fsdp_gradient_clipping(max_norm: float):
    """Clip the global gradient norm across shards with FSDP's own clip_grad_norm_ (a plain clip would see
    only this rank's shard). Runs after AMP's unscale, before the optimizer step."""
    import lightning.pytorch as pl

    class FSDPGradientClipping(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            trainer.strategy.model.clip_grad_norm_(max_norm)

    return FSDPGradientClipping()


def compile_blocks(model) -> list[str]:
    """Compile each repeated block (torchtitan's way: small graphs, compiled once, shared by all layers of a kind,
    and compatible with FSDP's per-block units); a model without blocks is compiled whole."""
    try:
        classes = block_classes(model, True)
    except ValueError:
        model.compile()
        return [type(model).__name__]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, classes):
            module.compile()
            names.append(name)
    return names


def _ddp_class():
    from ray.train.lightning import RayDDPStrategy

    class DDPWithoutWrapperOnOneRank(RayDDPStrategy):
        """Ray's DDP strategy, which on a world of one rank leaves the model unwrapped.

        DistributedDataParallel has no other rank to reduce gradients with there, yet it still copies every
        gradient into its buckets and through the process group each step: +2-6 ms a step (4-11 %) for the step
        benchmark's MLP on this CPU, the same in plain Lightning with strategy="ddp" and devices=1. Everything
        else stays as it was: the process group, the distributed sampler (so the data order does not change),
        the checkpoints (Lightning saves the unwrapped module either way). Lightning's DDP strategy already runs
        an unwrapped model outside of fit() and checks for the wrapper wherever it needs it.
        """

        def configure_ddp(self) -> None:
            if self.world_size > 1:
                super().configure_ddp()

    return DDPWithoutWrapperOnOneRank


def _fsdp_class():
    from ray.train.lightning import RayFSDPStrategy

    return fsdp_any_device(RayFSDPStrategy)


def fsdp_any_device(base: type) -> type:
    """`base` (Lightning's FSDPStrategy or Ray's) able to run on CPU: Lightning hands FSDP `device_id=None` there,
    which FSDP refuses ("needs a non-CPU accelerator device"); given `torch.device('cpu')` it works on gloo."""
    from lightning.pytorch.strategies import fsdp as lightning_fsdp

    class FSDPAnyDevice(base):
        def _setup_model(self, model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                return super()._setup_model(model)
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs)
            lightning_fsdp._move_torchmetrics_to_device(model, self.root_device)
            lightning_fsdp._setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
            return model

    FSDPAnyDevice.__name__ = FSDPAnyDevice.__qualname__ = f"{base.__name__}AnyDevice"
    return FSDPAnyDevice


def describe(spec: JobSpec, model) -> dict[str, Any]:
    """What the worker will do, as plain data for the plan: wrapped and checkpointed classes, strategy kwargs."""
    wrap, checkpoint = wrap_and_checkpoint_blocks(spec, model)
    kwargs = strategy_kwargs(spec.scaling.strategy, spec.scaling.options, wrap, checkpoint)
    return {k: sorted(c.__qualname__ for c in v) if isinstance(v, set) else v for k, v in kwargs.items()}
