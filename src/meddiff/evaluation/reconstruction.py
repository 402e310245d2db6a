"""Autoencoder reconstruction quality: MSE, PSNR, SSIM and MS-SSIM (where the size allows) on images in [0, 1].
LPIPS is an optional extra (it needs torchvision) and is never required."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_msssim import ms_ssim, ssim

from meddiff.evaluation.diversity import MS_SSIM_MIN_SIZE


def reconstruction_metrics(original: np.ndarray, reconstructed: np.ndarray) -> dict[str, float | None]:
    """original, reconstructed: (N, H, W) in [0, 1]. PSNR is averaged per image (data range 1)."""
    if original.shape != reconstructed.shape:
        raise ValueError(f"shapes differ: {original.shape} vs {reconstructed.shape}")
    a = torch.from_numpy(np.asarray(original, np.float32)).unsqueeze(1)
    b = torch.from_numpy(np.asarray(reconstructed, np.float32)).unsqueeze(1)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp(min=1e-12))
    size = original.shape[-1]
    win = 11 if size >= 44 else 7 if size >= 16 else 3
    out = {
        "mse": float(mse.mean()),
        "psnr": float(psnr.mean()),
        "ssim": float(ssim(a, b, data_range=1.0, size_average=True, win_size=win)),
        "ms_ssim": None,
    }
    if size >= MS_SSIM_MIN_SIZE:
        out["ms_ssim"] = float(ms_ssim(a, b, data_range=1.0, size_average=True))
    return out
