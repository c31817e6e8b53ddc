"""What this machine offers (CPUs, GPUs, memory), read without starting Ray or initialising CUDA."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MachineResources:
    cpus: int
    gpus: int
    gpu_names: tuple[str, ...]
    gpu_memory_bytes: tuple[int, ...]
    memory_bytes: int


def local_resources() -> MachineResources:
    import psutil

    names, memories = _nvml_gpus()
    return MachineResources(
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        gpus=len(names),
        gpu_names=tuple(names),
        gpu_memory_bytes=tuple(memories),
        memory_bytes=psutil.virtual_memory().total,
    )


def _nvml_gpus() -> tuple[list[str], list[int]]:
    """NVML sees GPUs without creating a CUDA context (torch.cuda would, in the driver, for nothing)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no library: no GPU to offer
        return [], []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        indices = range(pynvml.nvmlDeviceGetCount())
        if visible is not None:
            indices = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        names, memories = [], []
        for index in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            names.append(name.decode() if isinstance(name, bytes) else name)
            memories.append(int(pynvml.nvmlDeviceGetMemoryInfo(handle).total))
        return names, memories
    finally:
        pynvml.nvmlShutdown()
