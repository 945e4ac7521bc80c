"""Training precision that fits the hardware it runs on.

bf16 autocast is ~2.5x faster than fp32 where the device executes bf16 natively (CUDA GPUs
from Ampere on; CPUs with AVX512_BF16 or AMX), and ~10x *slower* where a CPU emulates it
(every AVX2-only laptop and most cloud CPUs). So the default is decided on the machine that
runs, never written into a config:

* ``bf16-mixed`` where bf16 is native,
* ``16-mixed`` (with gradient scaling) on CUDA devices without bf16,
* ``32-true`` otherwise.

>>> precision, reason = default_precision("cpu")
>>> precision in ("bf16-mixed", "32-true")
True
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional

import torch

__all__ = ["bf16_is_emulated", "cpu_has_native_bf16", "default_precision", "resolve_accelerator"]

# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) names that still include native bf16 instructions.
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 convolutions and matmuls in hardware (AVX512_BF16 or AMX)
    and nothing (``ONEDNN_MAX_CPU_ISA``) stops oneDNN from using them."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not cap.startswith(_BF16_ISAS):
        return False
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> set[str]:
    """The CPU's feature flags, from torch's cpuinfo where it has the query, else /proc."""
    flags = set()
    for name, probe in (
        ("avx512_bf16", "_is_avx512_bf16_supported"),
        ("amx_bf16", "_is_amx_tile_supported"),
    ):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            flags.add(name)
    if hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        return flags
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return flags


def resolve_accelerator(accelerator: Any = "auto") -> str:
    """The device type ``Trainer(accelerator=...)`` runs on: "cuda", "mps", "cpu", or the
    accelerator's own name for anything else (an ``Accelerator`` object counts by its class)."""
    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or "auto").lower()
    else:
        name = type(accelerator).__name__.lower().replace("accelerator", "")
    if name in ("auto", "gpu"):
        mps = getattr(torch.backends, "mps", None)
        if torch.cuda.is_available():
            return "cuda"
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu" if name == "auto" else "cuda"
    return name


def default_precision(accelerator: Any = "auto") -> tuple[str, str]:
    """``(precision, reason)``: the Lightning precision for ``accelerator`` on this machine."""
    device = resolve_accelerator(accelerator)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{name} executes bf16 natively"
        return "16-mixed", f"{name} has no native bf16; fp16 with gradient scaling"
    if device == "cpu":
        if cpu_has_native_bf16():
            return "bf16-mixed", "this CPU executes bf16 natively (AVX512_BF16/AMX)"
        return "32-true", "this CPU has no native bf16 (no AVX512_BF16/AMX): bf16 would be emulated"
    return "32-true", f"{device} device: float32"


def bf16_is_emulated(precision: Optional[str], accelerator: Any = "auto") -> bool:
    """True when ``precision`` asks for bf16 on a CPU that would emulate it."""
    return (
        precision is not None
        and str(precision).startswith("bf16")
        and resolve_accelerator(accelerator) == "cpu"
        and not cpu_has_native_bf16()
    )
