"""Diversity: mean pairwise structural similarity within each condition (MS-SSIM where the images are large
enough for five scales, SSIM otherwise), real against synthetic. Lower = more diverse."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from pytorch_msssim import ms_ssim, ssim

MS_SSIM_MIN_SIZE = 161  # five scales with an 11-pixel window


def mean_pairwise_similarity(images: np.ndarray, max_pairs: int = 500, seed: int = 0) -> tuple[float | None, str]:
    """images (N, H, W) in [0, 1]; returns (mean similarity over random distinct pairs, metric name)."""
    n = len(images)
    if n < 2:
        return None, "n/a"
    rng = np.random.default_rng(seed)
    distinct = {(int(i), int(j)) for i, j in rng.integers(0, n, size=(max_pairs * 2, 2)) if i != j}
    pairs = sorted(distinct)[:max_pairs] if n > 2 else [(0, 1)]
    a = torch.from_numpy(images[[p[0] for p in pairs]]).float().unsqueeze(1)
    b = torch.from_numpy(images[[p[1] for p in pairs]]).float().unsqueeze(1)
    size = images.shape[-1]
    if size >= MS_SSIM_MIN_SIZE:
        return float(ms_ssim(a, b, data_range=1.0, size_average=True)), "MS-SSIM"
    win = 11 if size >= 44 else 7 if size >= 16 else 3
    return float(ssim(a, b, data_range=1.0, size_average=True, win_size=win)), "SSIM"


def diversity_by_condition(images: np.ndarray, keys: list[str], max_per_group: int = 200) -> dict[str, dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    out = {}
    for key, idx in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        value, metric = mean_pairwise_similarity(images[idx[:max_per_group]])
        out[key] = {"n": len(idx), "similarity": value, "metric": metric}
    return out
