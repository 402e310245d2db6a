"""Choosing the mixed precision. Measured on a 2-core Sapphire Rapids CPU with the default U-Net (attention
only at <= 8 px): bf16 autocast (AMX) trains ~1.8x faster than fp32 (bench/train_throughput.py), so 'auto'
picks bf16 on CPUs with AMX/AVX512-BF16 and on CUDA GPUs that support it, fp32 elsewhere."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from meddiff.errors import MeddiffError

ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> accelerate's mixed_precision value."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if name not in ACCELERATE_NAMES:
        raise MeddiffError(f"precision must be auto, fp32, bf16 or fp16, got {name!r}")
    if name == "fp16" and not torch.cuda.is_available():
        raise MeddiffError("fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return ACCELERATE_NAMES[name]


def autocast(precision: str, device: str = "cpu"):
    """Autocast context for inference with the same precision as training ('no' = disabled)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)
