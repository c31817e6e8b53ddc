"""A small stand-in for the `pynvml` module (nvidia-ml-py) at the sampler's one seam, for machines without a GPU.

Only the calls the sampler makes exist here; tests check each one also exists in the real module, so the fake
cannot drift from the API it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1


class NVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str
    utilization: list[int] = field(default_factory=lambda: [50])  # cycled through, one value per read
    memory_total: int = 80 * 10**9
    memory_used: int = 20 * 10**9
    power_mw: int = 300_000
    temperature_c: int = 60
    sm_clock_mhz: int = 1980
    reads: int = 0


class FakeNvml:
    """Install with `SystemSampler(..., nvml_loader=lambda: fake)`."""

    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], unsupported: set[str] = frozenset(), fail_init: bool = False):
        self.gpus = gpus
        self.unsupported = set(unsupported)
        self.fail_init = fail_init
        self.calls: dict[str, int] = {}
        self.initialized = False

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.unsupported:
            raise NVMLError(f"{name}: Not Supported")

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise NVMLError("Not Found")

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        return self.gpus.index(handle)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu):
        self._count("utilization")
        value = handle.utilization[handle.reads % len(handle.utilization)]
        handle.reads += 1
        return SimpleNamespace(gpu=value, memory=value // 2)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu):
        self._count("memory")
        return SimpleNamespace(total=handle.memory_total, used=handle.memory_used,
                               free=handle.memory_total - handle.memory_used)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._count("power")
        return handle.power_mw

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._count("temperature")
        assert sensor == NVML_TEMPERATURE_GPU
        return handle.temperature_c

    def nvmlDeviceGetClockInfo(self, handle: FakeGpu, clock: int) -> int:
        self._count("sm_clock")
        assert clock == NVML_CLOCK_SM
        return handle.sm_clock_mhz


API = [name for name in vars(FakeNvml) if name.startswith(("nvml", "NVML"))]
