"""Measuring a contrast-enhancing tumour from a brain volume alone (no mask), deterministically.

The tumour core of a T1 post-contrast image (meddiff's 3D phantoms, and what a generator trained on them
should draw) is a bright enhancing rim around a dark necrotic centre. `measure_tumour`:

1. removes the background level and a smooth bias field (normalised convolution of the tissue intensities),
2. finds voxels far brighter than the local tissue (the rim; seeds, after light smoothing),
3. grows the largest seed component down to half-way between the rim and its surroundings, closes it and
   fills its holes (the necrotic centre), and counts the voxels: the core volume in mL,
4. calls the side from the core's centre against the head's centre along x (RAS: -x is the patient's left).

`tumour_from_mask` gives the same quantities from a label mask (e.g. BraTS labels), for ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEED_LEVEL = 1.6  # rim seeds: this many times the local tissue level
BIAS_SIGMA_MM = 25.0


@dataclass(frozen=True)
class TumourMeasurement:
    present: bool
    volume_ml: float  # 0 when absent
    side: str  # "left", "right" or "none"
    centre_voxel: tuple[float, float, float] | None = None  # in the RAS-ordered array measured


def _as_ras(volume, spacing, affine) -> tuple[np.ndarray, np.ndarray]:
    """A 3D float array in RAS voxel order and its (3,) spacing in mm."""
    arr = np.asarray(volume.detach().cpu() if hasattr(volume, "detach") else volume, dtype=np.float32)
    arr = arr.reshape(arr.shape[-3:]) if arr.ndim > 3 and int(np.prod(arr.shape[:-3])) == 1 else arr
    if arr.ndim != 3:
        raise ValueError(f"measure_tumour needs one 3D volume, got shape {arr.shape}")
    if affine is not None:
        import nibabel as nib

        ornt = nib.orientations.io_orientation(np.asarray(affine))
        arr = nib.orientations.apply_orientation(arr, ornt)
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
        return arr, zooms[ornt[:, 0].astype(int)]
    return arr, np.broadcast_to(np.asarray(spacing, np.float64), (3,)).copy()


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _fill(mask: np.ndarray) -> np.ndarray:
    """Holes filled in 3D, and in the slices of each axis (a rim with a one-voxel gap still encloses its centre)."""
    out = ndimage.binary_fill_holes(mask)
    for axis in range(3):  # background connected only within each slice (4-neighbours): holes per slice
        structure = np.expand_dims(ndimage.generate_binary_structure(2, 1), axis)
        out |= ndimage.binary_fill_holes(mask, structure)
    return out


def _side(centre_x: float, head: np.ndarray) -> str:
    head_x = float(np.argwhere(head)[:, 0].mean()) if head.any() else (head.shape[0] - 1) / 2
    return "left" if centre_x < head_x else "right"


def measure_tumour(volume, spacing=1.0, affine=None, min_volume_ml: float = 0.3) -> TumourMeasurement:
    """Tumour presence, core volume (mL) and side from one image (RAS voxel order unless `affine` is given)."""
    v, zooms = _as_ras(volume, spacing, affine)
    voxel_ml = float(np.prod(zooms)) / 1000.0
    faces = np.concatenate([v[[0, -1]].ravel(), v[:, [0, -1]].ravel(), v[:, :, [0, -1]].ravel()])
    v = v - float(np.median(faces))
    top = float(np.percentile(v, 99))
    if top <= 0:
        return TumourMeasurement(False, 0.0, "none")
    smooth = ndimage.gaussian_filter(v, 0.6)
    head = ndimage.binary_fill_holes(ndimage.gaussian_filter(v, 1.0) > 0.15 * top)
    ref = float(np.percentile(smooth[head], 75)) if head.any() else top
    tissue = (head & (smooth > 0.5 * ref) & (smooth < 1.3 * ref)).astype(np.float32)
    sigma = BIAS_SIGMA_MM / zooms
    local = ndimage.gaussian_filter(v * tissue, sigma) / np.maximum(ndimage.gaussian_filter(tissue, sigma), 1e-3)
    local = np.maximum(local, 0.2 * ref)
    norm, norm_smooth = v / local, smooth / local
    labels, n = ndimage.label((norm_smooth > SEED_LEVEL) & head, np.ones((3, 3, 3)))
    if n == 0:
        return TumourMeasurement(False, 0.0, "none")
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] * voxel_ml < min_volume_ml / 4:
        return TumourMeasurement(False, 0.0, "none")
    seed = labels == biggest
    filled = ndimage.binary_fill_holes(seed)
    ring = ndimage.binary_dilation(filled, _ball(2)) & ~ndimage.binary_dilation(filled)
    rim_level, around = float(np.median(norm[seed])), float(np.median(norm[ring])) if ring.any() else 0.0
    grown = (norm > (rim_level + around) / 2) & ndimage.binary_dilation(seed, _ball(2))
    parts, _ = ndimage.label(grown, np.ones((3, 3, 3)))
    keep = np.unique(parts[seed & grown])
    grown = np.isin(parts, keep[keep > 0]) | seed
    pad = 3
    core = ndimage.binary_closing(np.pad(grown, pad), _ball(2))
    core = _fill(core)[pad:-pad, pad:-pad, pad:-pad]
    volume_ml = float(core.sum()) * voxel_ml
    if volume_ml < min_volume_ml:
        return TumourMeasurement(False, 0.0, "none")
    centre = tuple(float(c) for c in np.argwhere(core).mean(0))
    return TumourMeasurement(True, volume_ml, _side(centre[0], head), centre)  # type: ignore[arg-type]


def tumour_from_mask(mask, spacing=1.0, affine=None, labels: tuple[int, ...] | None = None) -> TumourMeasurement:
    """Presence, volume (mL) and side of the voxels of a label mask (those in `labels`; default every non-zero)."""
    m, zooms = _as_ras(mask, spacing, affine)
    m = np.rint(m).astype(np.int64)
    tumour = np.isin(m, labels) if labels else m > 0
    if not tumour.any():
        return TumourMeasurement(False, 0.0, "none")
    centre = tuple(float(c) for c in np.argwhere(tumour).mean(0))
    side = "left" if centre[0] < (m.shape[0] - 1) / 2 else "right"
    return TumourMeasurement(True, float(tumour.sum()) * float(np.prod(zooms)) / 1000.0, side, centre)  # type: ignore[arg-type]
