"""Choosing the mixed precision. Measured on a 2-core Sapphire Rapids CPU with the default U-Net (attention
only at <= 8 px): bf16 autocast (AMX) trains ~1.8x faster than fp32 (bench/train_throughput.py), so 'auto'
picks bf16 on CPUs with AMX/AVX512-BF16, on CUDA GPUs that support it (fp16 on older ones) and on Apple GPUs
that support it (macOS 14+), fp32 elsewhere.

fp16 is a CUDA (or mps) precision: accelerate's mixed_precision='fp16' then keeps fp32 master weights, autocasts
the forward pass and scales the loss with a GradScaler (Accelerator.backward scales, clip_grad_norm_ unscales, the
prepared optimizer steps through the scaler and skips steps whose gradients overflowed). bf16 needs no scaler.
`enable_tf32()` lets fp32 matrix products and convolutions on Ampere+ GPUs use TF32 tensor cores."""

from __future__ import annotations

import torch

from meddiff.devices import cpu_has_fast_bf16  # noqa: F401 (a hardware fact; precision's users import it here)
from meddiff.errors import MeddiffError

ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def mps_supports_bf16() -> bool:
    backend = getattr(torch.backends, "mps", None)
    if backend is None or not backend.is_available():
        return False
    try:
        return bool(backend.is_macos_or_newer(14, 0))
    except AttributeError:  # older torch
        return False


def _device_type(device) -> str:
    if device is None:
        from meddiff.devices import run_device

        device = run_device()
    return torch.device(device).type


def resolve_precision(name: str, device=None) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> accelerate's mixed_precision value for work on `device` (default: the
    run's device, see meddiff.devices.run_device)."""
    name = (name or "auto").lower()
    if name not in ACCELERATE_NAMES and name != "auto":
        raise MeddiffError(f"precision must be auto, fp32, bf16 or fp16, got {name!r}")
    kind = _device_type(device)
    if name == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if kind == "mps":
            return "bf16" if mps_supports_bf16() else "no"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if name == "fp16" and kind not in ("cuda", "mps"):
        raise MeddiffError("fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if name == "bf16" and kind == "mps" and not mps_supports_bf16():
        raise MeddiffError("bf16 on Apple's mps needs macOS 14 or newer; use fp16 or fp32")
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise MeddiffError("this GPU does not support bf16; use fp16 (or auto)")
    return ACCELERATE_NAMES[name]


def autocast(precision: str, device: str = "cpu"):
    """Autocast context for inference with the same precision as training ('no' = disabled)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device = torch.device(device).type if not isinstance(device, str) or ":" in device else device
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def enable_tf32(enabled: bool = True) -> bool:
    """Let fp32 matrix products and cuDNN convolutions on CUDA use TF32 on Ampere or newer GPUs (10-bit mantissa
    products, fp32 accumulation; PyTorch's 'high' float32 matmul precision). The CPU is not affected. Returns
    whether CUDA is there to use it; harmless without a GPU. Uses PyTorch's per-backend `fp32_precision` settings
    where they exist (mixing them with the legacy allow_tf32 flags is an error in recent PyTorch)."""
    matmul, cudnn_conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        cudnn_conv.fp32_precision = "tf32" if enabled else "ieee"
    else:  # older PyTorch
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
    return torch.cuda.is_available()


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matrix products may use TF32 (either API)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that the next `Accelerator` may use another mixed precision.

    accelerate keeps one `AcceleratorState` per process and refuses a second `Accelerator` with another
    `mixed_precision` ("AcceleratorState has already been initialized and cannot be changed"); a second run in one
    process (tests, notebooks, benchmarks) may need one. accelerate has no public way to start over: its own test
    base class (`accelerate.test_utils.AccelerateTestCase`) and transformers' `TrainingArguments` call the same
    private method. This is meddiff's only use of it; tests/test_private_apis.py fails if accelerate drops it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
