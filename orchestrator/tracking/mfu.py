"""Model FLOPs utilization: FLOPs per sample (recipe formula or torch's FLOP counter) over the device's peak."""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

TERA = 1e12

# Dense (no structured sparsity) peak FLOP/s per device, in TFLOP/s, from the vendors' datasheets, by the
# precision the matmuls run in. Hand-written because Lightning's table (lightning.fabric.utilities.throughput,
# private) reads "L40S" as an L4, misses the H200 under its real name ("NVIDIA H200") and quotes sparse figures
# for it and pair figures for the H100 NVL. fp64 is the tensor-core figure where one exists (cuBLAS uses it).
# A precision missing from a row means unknown (e.g. bf16 on V100/T4 is emulated): MFU is then not logged.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"tf32": 1100, "bf16": 2250, "fp16": 2250, "fp8": 4500},
    "H200 NVL": {"fp64": 60, "fp32": 60, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "H200": {"fp64": 67, "fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "GH200": {"fp64": 67, "fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "H100 NVL": {"fp64": 60, "fp32": 60, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5, "fp8": 1670.5},
    "H100 PCIe": {"fp64": 51, "fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756, "fp8": 1513},
    "H100 SXM": {"fp64": 67, "fp32": 67, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9},
    "A100": {"fp64": 19.5, "fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312},  # SXM4 and PCIe alike
    "L40S": {"fp32": 91.6, "tf32": 183, "bf16": 366.5, "fp16": 366.5, "fp8": 733},
    "L40": {"fp32": 90.5, "tf32": 90.5, "bf16": 181, "fp16": 181, "fp8": 362},
    "L4": {"fp32": 30.3, "tf32": 60, "bf16": 121, "fp16": 121, "fp8": 242.5},
    "A40": {"fp32": 37.4, "tf32": 74.8, "bf16": 149.7, "fp16": 149.7},
    # NVIDIA publishes no A10G datasheet: the A10's per-SM rates at the A10G's 80 SMs and 1710 MHz.
    "A10G": {"fp32": 35.0, "tf32": 70, "bf16": 140, "fp16": 140},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125, "fp16": 125},
    "V100S": {"fp64": 8.2, "fp32": 16.4, "fp16": 130},
    "V100 PCIe": {"fp64": 7, "fp32": 14, "fp16": 112},
    "V100 SXM": {"fp64": 7.8, "fp32": 15.7, "fp16": 125},
    "T4": {"fp32": 8.1, "fp16": 65},
    "MI300X": {"fp64": 163.4, "fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9},
    "MI250X": {"fp64": 95.7, "fp32": 95.7, "bf16": 383, "fp16": 383},
}

# What torch.cuda.get_device_name() says -> a row above. First match wins, so variants come before the family.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bB200\b", "B200"),
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\b(PCIE|HBM2E)\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"
    (r"\bA100\b", "A100"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"\bA40\b", "A40"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bV100S\b", "V100S"),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe"),
    (r"\bV100\b", "V100 SXM"),
    (r"\bT4\b", "T4"),
    (r"\bMI300X\b", "MI300X"),
    (r"\bMI250X\b", "MI250X"),
]

# Lightning's precision names -> the number format the matmuls run in.
_PRECISION_FORMATS = {
    "64-true": "fp64", "32-true": "fp32", "32": "fp32",
    "16-mixed": "fp16", "16-true": "fp16", "bf16-mixed": "bf16", "bf16-true": "bf16",
    "transformer-engine": "fp8", "transformer-engine-float16": "fp8",
}


def device_family(device_name: str | None) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100 SXM'; None for a device not in the table (a CPU, say)."""
    if not device_name:
        return None
    upper = device_name.upper().replace("-", " ")
    for pattern, family in _NAME_PATTERNS:
        if re.search(pattern, upper):
            return family
    return None


def number_format(precision: str, fp32_matmul_precision: str = "highest") -> str | None:
    """The format the matmuls run in; fp32 becomes tf32 when torch is allowed to use it."""
    fmt = _PRECISION_FORMATS.get(str(precision))
    if fmt == "fp32" and fp32_matmul_precision in ("high", "medium"):
        return "tf32"
    return fmt


def peak_flops(device_name: str | None, precision: str, fp32_matmul_precision: str = "highest") -> float | None:
    """Peak FLOP/s of one device at this precision, or None where either is unknown."""
    family = device_family(device_name)
    fmt = number_format(precision, fp32_matmul_precision)
    if family is None or fmt is None:
        return None
    tflops = PEAK_TFLOPS[family].get(fmt)
    return tflops * TERA if tflops else None


def mfu(flops_per_sample: float | None, samples_per_s: float, total_peak_flops: float | None) -> float | None:
    """Achieved model FLOP/s over the peak of all devices that produced them; None unless both are known."""
    if not flops_per_sample or not total_peak_flops or samples_per_s <= 0:
        return None
    return flops_per_sample * samples_per_s / total_peak_flops


def recipe_flops_per_sample(module: Any) -> float | None:
    """The recipe's own formula (e.g. 6N + attention for a transformer), when it defines one."""
    method = getattr(module, "flops_per_sample", None)
    if not callable(method):
        return None
    try:
        value = float(method())
    except Exception as exc:  # a broken formula must not stop training; the counter still can
        log.warning("%s.flops_per_sample() failed (%s); counting FLOPs instead", type(module).__name__, exc)
        return None
    return value if value > 0 else None


class StepFlopCounter:
    """torch's FlopCounterMode around one real training step (forward + backward), entered and left from hooks.

    Counted on a real step rather than a replayed batch so that nothing (batch-norm statistics, dropout's random
    stream, gradients) differs from a run without tracking. Recomputed activations are counted as well, so models
    using activation checkpointing should give `flops_per_sample()` for a true MFU.
    """

    def __init__(self) -> None:
        self._mode = None
        self._failures: list[str] = []

    def start(self) -> bool:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            self._failures = []
            self._mode = FlopCounterMode(display=False, custom_mapping=_guarded_formulas(self._failures))
            self._mode.__enter__()
            return True
        except Exception as exc:
            log.warning("cannot count FLOPs (%s); MFU will not be logged", exc)
            self._mode = None
            return False

    def stop(self, samples: int) -> float | None:
        """FLOPs per sample of the step just counted; None when nothing was counted."""
        mode, self._mode = self._mode, None
        if mode is None:
            return None
        try:
            mode.__exit__(None, None, None)
            total = mode.get_total_flops()
        except Exception as exc:
            log.warning("FLOP counting failed (%s); MFU will not be logged", exc)
            return None
        if self._failures:  # an undercount would pass for a low MFU: better none
            log.warning("FLOP counting failed (%s); MFU will not be logged", self._failures[0])
            return None
        return total / samples if total > 0 and samples > 0 else None

    @property
    def active(self) -> bool:
        return self._mode is not None


def _guarded_formulas(failures: list[str]) -> dict:
    """torch's formulas, each made unable to raise into the training step (a formula's shape assertion would
    otherwise fail the step it counts), plus the CPU attention kernel, which torch's counter does not know
    although it takes the same arguments as the CUDA ones."""
    import torch
    from torch.utils import flop_counter

    formulas = dict(flop_counter.flop_registry)  # already shape-wrapped: they take the raw arguments
    aten = torch.ops.aten
    for cpu_op, like in (("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention"),
                         ("_scaled_dot_product_flash_attention_for_cpu_backward",
                          "_scaled_dot_product_flash_attention_backward")):
        if hasattr(aten, cpu_op) and getattr(aten, like, None) in formulas:
            formulas[getattr(aten, cpu_op)] = formulas[getattr(aten, like)]

    def guard(op, formula):
        def count(*args, **kwargs):
            try:
                return formula(*args, **kwargs)
            except Exception as exc:
                failures.append(f"{op}: {type(exc).__name__}: {exc}")
                return 0

        count._get_raw = True  # tells FlopCounterMode not to wrap it again
        return count

    return {op: guard(op, formula) for op, formula in formulas.items()}
