"""Distribution metrics on features: FID, KID (with its standard deviation over subsets), and k-NN precision,
recall, density and coverage (Naeem et al., 2020)."""

from __future__ import annotations

import numpy as np
import torch


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    The last trace is computed as the sum of square roots of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2)
    (the same eigenvalues as S1 S2), so it is real by construction: the usual `scipy.linalg.sqrtm(S1 @ S2)` turns
    complex when rounding makes an eigenvalue of a (near-)singular product slightly negative, and dropping the
    imaginary part then silently changes the value. Eigenvalues at rounding level are set to zero."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2, computed in real arithmetic."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(_floor(w))) @ v.T
    middle = root1 @ s2 @ root1
    return float(np.sqrt(_floor(np.linalg.eigvalsh((middle + middle.T) / 2))).sum())


def _floor(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise removed: below 1e-10 of the largest they are zero (their square
    roots would otherwise add up to visible error over many null directions)."""
    top = float(eigenvalues.max()) if eigenvalues.size else 0.0
    return np.where(eigenvalues > top * 1e-10, eigenvalues, 0.0)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, mean and std over subsets."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(a), len(b))
    d = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)].astype(np.float64)
        y = b[rng.choice(len(b), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def _kth_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density, coverage of `fake` against `real` on k-NN manifolds."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    r_radius, f_radius = _kth_distance(r, k), _kth_distance(f, k)
    d = torch.cdist(r, f)  # (n_real, n_fake)
    inside_real = d < r_radius[:, None]
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float((d < f_radius[None, :]).any(1).double().mean()),
        "density": float(inside_real.double().sum(0).mean() / k),
        "coverage": float((d.min(1).values < r_radius).double().mean()),
    }
