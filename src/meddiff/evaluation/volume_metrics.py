"""Metrics of synthetic 3D volumes against real ones. Pure functions: volumes in, typed results out.

- `slice_distances`: FID and KID on 2D slices in each of the three planes and their mean, on features from a
  function the caller gives (e.g. the domain classifier's `embed`, or Inception), with slice and volume counts and a
  bootstrap interval over volumes (slices of one volume are not independent).
- `slice_consistency`: per-plane FID and the ratio orthogonal planes / acquisition plane (a model that is good
  slice by slice but inconsistent across slices scores > 1), plus the correlation of neighbouring slices along each
  axis, real against synthetic.
- `volume_diversity`: mean pairwise 3D MS-SSIM (SSIM where the volumes are too small for five scales) within the
  real and within the synthetic set. Identical volumes score 1; lower = more diverse.
- `volume_memorization`: each synthetic volume's nearest training volume by correlation, its closest slice in any
  training volume (partial copies), and the kNN distance ratio; thresholds from held-out real volumes against the
  training set, as in meddiff.evaluation.memorization.

Volumes are (N, C, X, Y, Z) or (N, X, Y, Z) arrays or tensors in [-1, 1]."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from meddiff.errors import MeddiffError
from meddiff.evaluation.distribution import fid, kid
from meddiff.evaluation.diversity import MS_SSIM_MIN_SIZE
from meddiff.evaluation.memorization import knn_ratio, nearest
from meddiff.results import JsonResult, json_field

PLANES = ("axial", "coronal", "sagittal")
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # spatial axis (of X, Y, Z) each plane cuts across
FeatureFn = Callable[[torch.Tensor], np.ndarray]  # slices (M, 1, H, W) in [-1, 1] -> features (M, D)
BOOTSTRAP_MAX_DIM = 256  # n_boot=None bootstraps FID only on features this small (an eigendecomposition each)


def as_volumes(volumes: np.ndarray | torch.Tensor, what: str = "volumes") -> torch.Tensor:
    """(N, C, X, Y, Z) float32 CPU tensor from (N, C, X, Y, Z) or (N, X, Y, Z) data."""
    t = volumes.detach() if isinstance(volumes, torch.Tensor) else torch.from_numpy(np.array(volumes))
    t = t.float().cpu()
    if t.ndim == 4:
        t = t[:, None]
    if t.ndim != 5:
        raise MeddiffError(f"{what} must be (N, C, X, Y, Z) or (N, X, Y, Z), got shape {tuple(t.shape)}")
    return t


def slice_indices(length: int, per_volume: int | None, central_fraction: float = 0.6) -> list[int]:
    """Up to `per_volume` evenly spaced slice positions within the central fraction of an axis (None: all of it)."""
    if not 0 < central_fraction <= 1:
        raise MeddiffError(f"central_fraction must be in (0, 1], got {central_fraction}")
    margin = (1 - central_fraction) / 2 * length
    first, last = int(np.floor(margin)), int(np.ceil(length - 1 - margin))
    last = max(first, min(last, length - 1))
    count = last - first + 1 if per_volume is None else min(per_volume, last - first + 1)
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})


def plane_slices(
    volumes: torch.Tensor, plane: str, per_volume: int | None = 16, central_fraction: float = 0.6
) -> torch.Tensor:
    """(N, C, X, Y, Z) -> (N, S, C, H, W): S slices of each volume across `plane`'s axis."""
    if plane not in AXIS:
        raise MeddiffError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")
    axis = 2 + AXIS[plane]
    index = torch.tensor(slice_indices(volumes.shape[axis], per_volume, central_fraction))
    return volumes.index_select(axis, index).movedim(axis, 1)


@dataclass(kw_only=True)
class PlaneDistance(JsonResult):
    plane: str
    fid: float
    fid_ci95: list[float] | None  # bootstrap spread over volumes, centred on the estimate (None: not computed)
    kid: float
    kid_std: float
    real_slices: int
    synthetic_slices: int
    real_volumes: int
    synthetic_volumes: int


@dataclass(kw_only=True)
class SliceDistances(JsonResult):
    planes: dict[str, PlaneDistance]
    mean_fid: float
    mean_kid: float
    feature_dim: int


def _features(
    volumes: torch.Tensor, plane: str, feature_fn: FeatureFn, channel: int, per_volume, central_fraction, size
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N * S, D), owning volume of each row)."""
    slices = plane_slices(volumes[:, channel : channel + 1], plane, per_volume, central_fraction)
    n, s = slices.shape[:2]
    flat = slices.reshape(n * s, 1, *slices.shape[-2:])
    if size is not None:
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    features = np.asarray(feature_fn(flat), np.float64).reshape(n * s, -1)
    return features, np.repeat(np.arange(n), s)


def _bootstrap_fid(a, a_owner, b, b_owner, n_boot: int, seed: int) -> list[float]:
    """95 % spread of FID over resampled volumes (each volume brings all its slices), re-centred on the estimate:
    resampling with replacement repeats volumes, which biases every resampled FID upward."""
    rng = np.random.default_rng(seed)
    a_rows = [np.flatnonzero(a_owner == i) for i in range(a_owner.max() + 1)]
    b_rows = [np.flatnonzero(b_owner == i) for i in range(b_owner.max() + 1)]
    values = []
    for _ in range(n_boot):
        ia = np.concatenate([a_rows[i] for i in rng.integers(0, len(a_rows), len(a_rows))])
        ib = np.concatenate([b_rows[i] for i in rng.integers(0, len(b_rows), len(b_rows))])
        values.append(fid(a[ia], b[ib]))
    estimate, middle = fid(a, b), float(np.median(values))
    low, high = (float(np.quantile(values, q)) - middle + estimate for q in (0.025, 0.975))
    return [max(0.0, low), max(0.0, high)]


def slice_distances(
    real: np.ndarray | torch.Tensor,
    synthetic: np.ndarray | torch.Tensor,
    feature_fn: FeatureFn,
    planes: Sequence[str] = PLANES,
    per_volume: int | None = 16,
    central_fraction: float = 0.6,
    channel: int = 0,
    slice_size: int | None = None,
    n_boot: int | None = None,
    kid_subsets: int = 50,
    seed: int = 0,
) -> SliceDistances:
    """FID / KID between real and synthetic slices in each plane (features of `channel`'s slices, resized to
    slice_size x slice_size when given). n_boot None: 50 bootstrap resamples where features have at most
    BOOTSTRAP_MAX_DIM dimensions, else none."""
    real_t, synthetic_t = as_volumes(real, "real volumes"), as_volumes(synthetic, "synthetic volumes")
    if real_t.shape[1:] != synthetic_t.shape[1:]:
        raise MeddiffError(
            f"real volumes {tuple(real_t.shape[1:])} and synthetic volumes {tuple(synthetic_t.shape[1:])} "
            "are not on the same grid"
        )
    if len(real_t) < 1 or len(synthetic_t) < 1:
        raise MeddiffError("slice FID needs at least one real and one synthetic volume")
    if not 0 <= channel < real_t.shape[1]:
        raise MeddiffError(f"channel {channel} does not exist in volumes of {real_t.shape[1]} channels")
    results, dim = {}, 0
    for plane in planes:
        args = (feature_fn, channel, per_volume, central_fraction, slice_size)
        a, a_owner = _features(real_t, plane, *args)
        b, b_owner = _features(synthetic_t, plane, *args)
        if min(len(a), len(b)) < 2:
            raise MeddiffError(f"{plane}: FID needs at least 2 slices on each side, got {len(a)} and {len(b)}")
        dim = a.shape[1]
        boot = n_boot if n_boot is not None else (50 if dim <= BOOTSTRAP_MAX_DIM else 0)
        kid_mean, kid_std = kid(a, b, subsets=kid_subsets, subset_size=1000, seed=seed)
        results[plane] = PlaneDistance(
            plane=plane,
            fid=fid(a, b),
            fid_ci95=_bootstrap_fid(a, a_owner, b, b_owner, boot, seed) if boot > 0 else None,
            kid=kid_mean,
            kid_std=kid_std,
            real_slices=len(a),
            synthetic_slices=len(b),
            real_volumes=len(real_t),
            synthetic_volumes=len(synthetic_t),
        )
    return SliceDistances(
        planes=results,
        mean_fid=float(np.mean([r.fid for r in results.values()])),
        mean_kid=float(np.mean([r.kid for r in results.values()])),
        feature_dim=dim,
    )


def adjacent_slice_correlation(volumes: np.ndarray | torch.Tensor, plane: str) -> float:
    """Mean correlation between neighbouring slices across `plane`'s axis (all channels, central 60 %)."""
    slices = plane_slices(as_volumes(volumes), plane, None)
    flat = slices.reshape(*slices.shape[:2], -1).double()
    flat = flat - flat.mean(-1, keepdim=True)
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return float((flat[:, 1:] * flat[:, :-1]).sum(-1).mean())


@dataclass(kw_only=True)
class SliceConsistency(JsonResult):
    acquisition_plane: str
    fid: dict[str, float]
    orthogonal_ratio: float | None  # mean FID of the other planes / FID of the acquisition plane; None if that is 0
    adjacent_real: dict[str, float]  # neighbouring-slice correlation along each plane's axis
    adjacent_synthetic: dict[str, float]


def slice_consistency(
    distances: SliceDistances,
    real: np.ndarray | torch.Tensor,
    synthetic: np.ndarray | torch.Tensor,
    acquisition_plane: str = "axial",
) -> SliceConsistency:
    """How much worse synthetic volumes look across the acquisition plane than within it (from `slice_distances`
    over all three planes), and how smoothly they change from slice to slice compared with real ones."""
    if acquisition_plane not in distances.planes or len(distances.planes) < 2:
        raise MeddiffError(
            f"slice consistency needs FID in the acquisition plane {acquisition_plane!r} and at least one other "
            f"plane; have {list(distances.planes)}"
        )
    per_plane = {p: r.fid for p, r in distances.planes.items()}
    across = float(np.mean([v for p, v in per_plane.items() if p != acquisition_plane]))
    within = per_plane[acquisition_plane]
    return SliceConsistency(
        acquisition_plane=acquisition_plane,
        fid=per_plane,
        orthogonal_ratio=across / within if within > 1e-9 else None,
        adjacent_real={p: adjacent_slice_correlation(real, p) for p in PLANES},
        adjacent_synthetic={p: adjacent_slice_correlation(synthetic, p) for p in PLANES},
    )


def _pairs(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    every = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(every) <= max_pairs:
        return every
    rng = np.random.default_rng(seed)
    return [every[k] for k in sorted(rng.choice(len(every), max_pairs, replace=False))]


def pairwise_similarity(
    volumes: np.ndarray | torch.Tensor, max_pairs: int = 100, seed: int = 0, batch: int = 4, device=None
) -> tuple[float | None, str, int]:
    """(mean 3D MS-SSIM / SSIM over distinct pairs, the metric's name, pairs used); None for fewer than 2 volumes.
    Pairs go `batch` at a time to `device` (3D SSIM of 240 x 240 x 155 volumes takes seconds a pair on a CPU)."""
    v = (as_volumes(volumes).clamp(-1, 1) + 1) / 2
    pairs = _pairs(len(v), max_pairs, seed)
    if not pairs:
        return None, "n/a", 0
    smallest = min(v.shape[2:])
    use_ms = smallest >= MS_SSIM_MIN_SIZE
    win = 11 if smallest >= 44 else 7 if smallest >= 16 else 3
    values = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        a, b = (v[[p[side] for p in chunk]].to(device or "cpu") for side in (0, 1))
        if use_ms:
            values.append(ms_ssim(a, b, data_range=1.0, size_average=False))
        else:
            values.append(ssim(a, b, data_range=1.0, size_average=False, win_size=win))
    return float(torch.cat(values).float().mean().cpu()), "MS-SSIM" if use_ms else "SSIM", len(pairs)


@dataclass(kw_only=True)
class VolumeDiversity(JsonResult):
    metric: str
    real: float | None  # mean pairwise similarity; lower = more diverse
    synthetic: float | None
    real_pairs: int
    synthetic_pairs: int


def volume_diversity(
    real: np.ndarray | torch.Tensor,
    synthetic: np.ndarray | torch.Tensor,
    max_pairs: int = 100,
    seed: int = 0,
    device=None,
) -> VolumeDiversity:
    real_value, metric, real_pairs = pairwise_similarity(real, max_pairs, seed, device=device)
    synthetic_value, synthetic_metric, synthetic_pairs = pairwise_similarity(synthetic, max_pairs, seed, device=device)
    return VolumeDiversity(
        metric=metric if real_pairs else synthetic_metric,
        real=real_value,
        synthetic=synthetic_value,
        real_pairs=real_pairs,
        synthetic_pairs=synthetic_pairs,
    )


@dataclass(kw_only=True)
class VolumeMemorization(JsonResult):
    volume_similarity: list[float] = json_field(saved=False)  # per synthetic volume: nearest training volume
    volume_match: list[int] = json_field(saved=False)
    slice_similarity: list[float] = json_field(saved=False)  # per synthetic volume: its closest training slice
    slice_match: list[int] = json_field(saved=False)  # the training volume holding that slice
    knn_ratio: list[float] = json_field(saved=False)  # distance to the nearest / that volume's own nearest spacing
    volume_threshold: float
    slice_threshold: float
    knn_ratio_threshold: float
    thresholds_from: str  # "held-out" or "fixed"
    rate_volume: float
    rate_slice: float
    rate_knn_ratio: float
    rate_flagged: float
    max_volume_similarity: float
    max_slice_similarity: float

    @property
    def flagged(self) -> list[bool]:
        return [
            v > self.volume_threshold or s > self.slice_threshold or r < self.knn_ratio_threshold
            for v, s, r in zip(self.volume_similarity, self.slice_similarity, self.knn_ratio)
        ]


def _slice_rows(volumes: torch.Tensor, planes: Sequence[str], per_volume: int, central_fraction: float):
    """{plane: (slices as rows (N * S, C * H * W), owning volume per row)}."""
    out = {}
    for plane in planes:
        slices = plane_slices(volumes, plane, per_volume, central_fraction)
        n, s = slices.shape[:2]
        out[plane] = (slices.reshape(n * s, -1).numpy(), np.repeat(np.arange(n), s))
    return out


def _closest_slices(queries, references, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query volume: its highest slice correlation with any reference slice of the same plane, and the
    reference volume holding that slice."""
    best, match = np.full(n_queries, -1.0), np.zeros(n_queries, np.int64)
    for plane, (rows, owner) in queries.items():
        ref_rows, ref_owner = references[plane]
        similarity, where = nearest(rows, ref_rows, center=True)
        for volume in range(n_queries):
            mine = np.flatnonzero(owner == volume)
            k = mine[np.argmax(similarity[mine])]
            if similarity[k] > best[volume]:
                best[volume], match[volume] = similarity[k], ref_owner[where[k]]
    return best, match


def volume_memorization(
    synthetic: np.ndarray | torch.Tensor,
    train: np.ndarray | torch.Tensor,
    heldout: np.ndarray | torch.Tensor | None = None,
    quantile: float = 0.99,
    planes: Sequence[str] = PLANES,
    per_volume: int = 16,
    central_fraction: float = 0.6,
) -> VolumeMemorization:
    """Flags a synthetic volume whose nearest training volume (correlation), closest training slice (correlation
    of one slice with any training slice in the same plane: partial copies) or kNN distance ratio is more extreme
    than `quantile` of held-out real volumes; without held-out volumes the fixed thresholds 0.95, 0.98 and 0.1."""
    s, t = as_volumes(synthetic, "synthetic volumes"), as_volumes(train, "training volumes")
    if s.shape[1:] != t.shape[1:]:
        raise MeddiffError(f"synthetic {tuple(s.shape[1:])} and training {tuple(t.shape[1:])} volumes differ in shape")
    if len(t) < 2:
        raise MeddiffError("the memorization audit needs at least 2 training volumes")
    flat_s, flat_t = s.reshape(len(s), -1).numpy(), t.reshape(len(t), -1).numpy()
    volume_sim, volume_match = nearest(flat_s, flat_t, center=True)
    ratio, _ = knn_ratio(flat_s, flat_t)
    train_slices = _slice_rows(t, planes, per_volume, central_fraction)
    slice_sim, slice_match = _closest_slices(_slice_rows(s, planes, per_volume, central_fraction), train_slices, len(s))
    vt, st, rt, source = 0.95, 0.98, 0.1, "fixed"
    if heldout is not None and len(heldout):
        h = as_volumes(heldout, "held-out volumes")
        flat_h = h.reshape(len(h), -1).numpy()
        vt = float(np.quantile(nearest(flat_h, flat_t, center=True)[0], quantile))
        rt = float(np.quantile(knn_ratio(flat_h, flat_t)[0], 1 - quantile))
        heldout_slices = _slice_rows(h, planes, per_volume, central_fraction)
        st = float(np.quantile(_closest_slices(heldout_slices, train_slices, len(h))[0], quantile))
        source = "held-out"
    by_volume, by_slice, by_ratio = volume_sim > vt, slice_sim > st, ratio < rt
    return VolumeMemorization(
        volume_similarity=volume_sim.tolist(),
        volume_match=volume_match.tolist(),
        slice_similarity=slice_sim.tolist(),
        slice_match=slice_match.tolist(),
        knn_ratio=ratio.tolist(),
        volume_threshold=vt,
        slice_threshold=st,
        knn_ratio_threshold=rt,
        thresholds_from=source,
        rate_volume=float(by_volume.mean()),
        rate_slice=float(by_slice.mean()),
        rate_knn_ratio=float(by_ratio.mean()),
        rate_flagged=float((by_volume | by_slice | by_ratio).mean()),
        max_volume_similarity=float(volume_sim.max()),
        max_slice_similarity=float(slice_sim.max()),
    )
