"""Activation memory of one forward pass, measured on fake tensors: shapes and dtypes, no memory behind them.

The meta-device model's parameters become FakeTensors on the CPU device, so autocast applies as in training;
a saved-tensors hook records every tensor autograd keeps for backward (deduplicated by storage, parameters
excluded), and block hooks attribute them to the repeated block that saved them.
"""

from __future__ import annotations

from typing import Any

AUTOCAST = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def trace(model, micro_batch: int, precision: str, blocks: tuple[type, ...]) -> dict[str, Any]:
    """Saved bytes in all, per block (and each block's input), the output's and the input's bytes, at micro_batch.

    Raises ValueError when the module has no `example_input_array` to build an input from.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    example = getattr(model, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        raise ValueError("the module sets no `example_input_array` (a tensor of one batch) to trace a forward with")
    mode = FakeTensorMode()
    _to_fake(model, mode)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> index of the block that saved it first
    block_inputs: list[int] = []
    stack: list[int] = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = storage.nbytes()
            if stack:
                owner[key] = stack[-1]
        return tensor

    def enter(module, args):
        stack.append(len(block_inputs))
        first = args[0] if args else None
        block_inputs.append(first.untyped_storage().nbytes() if isinstance(first, torch.Tensor) else 0)

    def leave(module, args, output):
        stack.pop()

    handles = []
    for module in model.modules():
        if blocks and isinstance(module, blocks):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    was_training = model.training
    model.train()
    try:
        with mode:
            shape = (micro_batch, *example.shape[1:])
            batch = torch.zeros(shape, dtype=example.dtype)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(precision):
                output = model(batch)
            outputs = [output] if isinstance(output, torch.Tensor) else [
                t for t in (output.values() if isinstance(output, dict) else output) if isinstance(t, torch.Tensor)]
            output_bytes = sum(t.untyped_storage().nbytes() for t in outputs
                               if t.untyped_storage()._cdata not in saved)
            # A classification/LM loss keeps log-softmax of the output in fp32 for its backward.
            loss_bytes = sum(t.numel() * 4 for t in outputs if t.is_floating_point())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    per_block = [0] * len(block_inputs)
    for key, index in owner.items():
        per_block[index] += saved[key]
    return {
        "saved_bytes": sum(saved.values()),
        "block_saved_bytes": per_block,
        "block_input_bytes": block_inputs,
        "output_bytes": output_bytes + loss_bytes,
        "input_bytes": batch.numel() * batch.element_size() * 2,  # the batch and its targets
    }


def _autocast(precision: str):
    import contextlib

    import torch

    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, AUTOCAST[precision]))


def _to_fake(model, mode) -> None:
    """Swap the meta model's parameters and buffers for fake CPU tensors in place, keeping tied weights tied."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensor

    cpu = torch.device("cpu")
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                memo[id(param)] = nn.Parameter(FakeTensor(mode, _meta(param.data), cpu),
                                               requires_grad=param.requires_grad)
            module._parameters[name] = memo[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                if id(buffer) not in memo:
                    memo[id(buffer)] = FakeTensor(mode, _meta(buffer), cpu)
                module._buffers[name] = memo[id(buffer)]
    example = getattr(model, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        model.example_input_array = _meta(example)


def _meta(tensor):
    return tensor if tensor.is_meta else tensor.to("meta")
