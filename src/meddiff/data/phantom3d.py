"""Procedural 3D brain MRI phantoms (a T1 post-contrast look) with exactly known ground truth.

SYNTHETIC TEST DATA, NOT MEDICAL DATA. Anatomy lives in millimetres in a RAS frame (x to the patient's right,
y anterior, z superior), so one seed renders the same head at any size; the field of view is fixed (208 mm),
so the head fills the volume at every size (3.25 mm voxels at 64^3). Each phantom has a scalp, skull, CSF, a
brain with grey/white matter texture and an interhemispheric fissure, two lateral ventricles and optionally a
tumour (enhancing rim, necrotic core, oedema) in the left or right hemisphere. Acquisition variation: a small
rotation and shift, a smooth multiplicative bias field and Rician noise. Tumour masks use BraTS labels
(1 necrotic core, 2 oedema, 4 enhancing rim); the tumour volume is the core (rim + necrosis), which is what
`meddiff.data.volume_measure.measure_tumour` measures from the image alone (re-exported here).
`write_phantom_volumes` writes a folder that `phantom3d:DIR` (and `volumes:DIR`) datasets read.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from meddiff.data.volume_io import write_nifti
from meddiff.data.volume_measure import TumourMeasurement, measure_tumour, tumour_from_mask
from meddiff.errors import MeddiffError

__all__ = [
    "BrainPhantom",
    "TumourMeasurement",
    "measure_tumour",
    "render_brain_phantom",
    "tumour_from_mask",
    "write_phantom_volumes",
]
FIELD_OF_VIEW_MM = 208.0
MIN_SIZE, MAX_SIZE = 16, 256
NECROTIC, OEDEMA, ENHANCING = 1, 2, 4
SIDES = ("left", "right")
TISSUE = {
    "scalp": 0.44,
    "skull": 0.06,
    "csf": 0.10,
    "grey": 0.31,
    "white": 0.46,
    "oedema": 0.27,
    "necrosis": 0.14,
    "rim": 0.80,
}


@dataclass
class BrainPhantom:
    """One rendered phantom: the image in [0, 1] (RAS voxel order), its tumour labels and the ground truth."""

    image: np.ndarray  # float32 (X, Y, Z) in [0, 1]
    mask: np.ndarray  # uint8 (X, Y, Z): 0, NECROTIC, OEDEMA, ENHANCING
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    tumour: bool
    tumour_volume_ml: float  # core (rim + necrosis) volume; 0 without a tumour
    side: str  # "left", "right" or "none"
    meta: dict[str, object] = field(default_factory=dict)  # centre_mm, radius_mm, rotation_deg, noise, ...

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])


def phantom_affine(size: int) -> np.ndarray:
    """The RAS affine of a phantom grid: isotropic voxels, the volume centred on the origin."""
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2
    return affine


def _soft(signed_distance: np.ndarray, voxel: float) -> np.ndarray:
    """Partial-volume membership of a region given its signed distance (mm, negative inside)."""
    return np.clip(0.5 - signed_distance / voxel, 0.0, 1.0).astype(np.float32)


def _ellipsoid_distance(p: np.ndarray, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid surface (exact on spheres, close near the surface)."""
    q = (p - np.asarray(centre, np.float32)[:, None]) / np.asarray(axes, np.float32)[:, None]
    k0 = np.sqrt((q**2).sum(0))
    k1 = np.sqrt(((q / np.asarray(axes, np.float32)[:, None]) ** 2).sum(0))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


class _Fields:
    """Smooth random fields defined in object space (the same anatomy at every size)."""

    def __init__(self, rng: np.random.Generator, points: np.ndarray):
        self.rng, self.points = rng, points

    def __call__(self, cells: int, sigma: float = 1.0) -> np.ndarray:
        lattice = ndimage.gaussian_filter(self.rng.standard_normal((cells + 1,) * 3), sigma, mode="wrap")
        lattice = (lattice - lattice.mean()) / (lattice.std() + 1e-8)
        half = FIELD_OF_VIEW_MM * 0.6
        coords = np.clip((self.points + half) / (2 * half) * cells, 0, cells)
        return ndimage.map_coordinates(lattice, coords, order=1, mode="nearest").astype(np.float32)


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _tumour_plan(rng: np.random.Generator, brain_axes: np.ndarray, side: str, radius: float):
    """Centre of a tumour core of `radius` mm inside one hemisphere, clear of the midline and the brain surface."""
    sign = -1.0 if side == "left" else 1.0  # RAS: the patient's left is -x
    ax, ay, az = brain_axes
    for _ in range(200):
        c = np.array(
            [
                sign * rng.uniform(radius + 6, max(ax - radius - 6, radius + 7)),
                rng.uniform(-0.5, 0.5) * ay,
                rng.uniform(-0.15, 0.45) * az,
            ]
        )
        inside = _ellipsoid_distance(c[:, None], (0, 0, 0), brain_axes - radius - 6)[0]
        if inside < 0:
            return c
    return np.array([sign * (radius + 6), 0.0, 0.0])


def render_brain_phantom(
    seed: int,
    size: int = 64,
    tumour: bool | None = None,
    side: str | None = None,
    radius_mm: float | None = None,
    noise: bool = True,
) -> BrainPhantom:
    """Render one phantom; deterministic per (seed, arguments). tumour/side/radius_mm None: drawn from the seed."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    # every draw happens whatever the arguments, so that the anatomy of a seed never depends on them
    head_axes = np.array([72.0, 92.0, 84.0]) * rng.uniform(0.92, 1.04) * rng.uniform(0.96, 1.04, 3)
    angles, shift = rng.uniform(-6, 6, 3), rng.uniform(-4, 4, 3)
    drawn_tumour, drawn_side = bool(rng.random() < 0.5), SIDES[int(rng.integers(2))]
    drawn_radius = float(rng.uniform(10, 20))
    ventricle = rng.uniform(0.8, 1.3)
    noise_sigma, bias_strength = float(rng.uniform(0.01, 0.03)), float(rng.uniform(0.04, 0.1))
    tumour = drawn_tumour if tumour is None else tumour
    side = drawn_side if side is None else side
    radius = drawn_radius if radius_mm is None else float(radius_mm)
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")

    affine = phantom_affine(size)
    voxel = float(affine[0, 0])
    grid = np.indices((size,) * 3, dtype=np.float32).reshape(3, -1) * voxel + affine[:3, 3:4].astype(np.float32)
    points = (_rotation(angles).T @ (grid - shift[:, None])).astype(np.float32)  # object-space mm
    fields = _Fields(rng, points)
    gyri, cortex, texture, scalp_tex = fields(40, 1.0), fields(24, 1.0), fields(16, 1.0), fields(20, 1.0)
    tumour_shape, oedema_shape, bias = fields(12, 1.0), fields(12, 1.0), fields(4, 0.7)

    head = _ellipsoid_distance(points, (0, 0, 0), head_axes)
    brain_axes = head_axes - 15.0
    brain = _ellipsoid_distance(points, (0, 0, -4), brain_axes) + 1.5 * gyri
    fissure = np.where(points[2] > -25, 1.2 - np.abs(points[0]), -1e3)  # CSF between the hemispheres
    brain = np.maximum(brain, fissure)
    white = brain + 3.5 + 1.2 * cortex
    vent_axes = np.array([6.0, 20.0, 8.0]) * ventricle
    ventricles = np.minimum(
        _ellipsoid_distance(points, (-8 * ventricle, 2, 8), vent_axes),
        _ellipsoid_distance(points, (8 * ventricle, 2, 8), vent_axes),
    )

    image = TISSUE["scalp"] * (1 + 0.08 * scalp_tex) * _soft(head, voxel)
    image = _mix(image, TISSUE["skull"], _soft(head + 5, voxel))
    image = _mix(image, TISSUE["csf"], _soft(head + 11, voxel))
    in_brain = _soft(brain, voxel)
    image = _mix(image, TISSUE["grey"] * (1 + 0.05 * texture), in_brain)
    image = _mix(image, TISSUE["white"] * (1 + 0.03 * texture), _soft(white, voxel) * in_brain)
    image = _mix(image, TISSUE["csf"], _soft(ventricles, voxel))
    mask = np.zeros(points.shape[1], np.uint8)
    meta: dict[str, object] = {
        "seed": seed,
        "size": size,
        "rotation_deg": angles.round(2).tolist(),
        "shift_mm": shift.round(2).tolist(),
        "noise_sigma": noise_sigma,
    }
    volume_ml = 0.0
    if tumour:
        centre = _tumour_plan(rng, brain_axes, side, radius)
        r_necrotic = min(radius * 0.55, radius - 5.5)
        dist = np.sqrt(((points - centre[:, None]) ** 2).sum(0))
        core = dist - radius * (1 + 0.06 * tumour_shape)
        r_oedema = radius * 1.7
        oedema = np.maximum(dist - r_oedema * (1 + 0.15 * oedema_shape), brain)
        necrotic = dist - r_necrotic * (1 + 0.06 * tumour_shape)
        image = _mix(image, TISSUE["oedema"], _soft(oedema, voxel))
        image = _mix(image, TISSUE["rim"], _soft(core, voxel))
        image = _mix(image, TISSUE["necrosis"], _soft(necrotic, voxel))
        mask[(oedema < 0)] = OEDEMA
        mask[core < 0] = ENHANCING
        mask[necrotic < 0] = NECROTIC
        volume_ml = float(_soft(core, voxel).sum() * voxel**3 / 1000.0)
        meta.update(
            centre_mm=(_rotation(angles) @ centre + shift).round(2).tolist(),
            radius_mm=round(radius, 2),
            necrotic_radius_mm=round(r_necrotic, 2),
            oedema_radius_mm=round(r_oedema, 2),
        )
    if noise:
        image = image * np.exp(bias_strength * bias)
        real = image + noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
        imag = noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
        image = np.sqrt(real**2 + imag**2)  # Rician magnitude noise
    shape = (size,) * 3
    return BrainPhantom(
        np.clip(image, 0, 1).astype(np.float32).reshape(shape),
        mask.reshape(shape),
        affine,
        tumour,
        volume_ml,
        side if tumour else "none",
        meta,
    )


def _mix(image: np.ndarray, value, weight: np.ndarray) -> np.ndarray:
    return image * (1 - weight) + value * weight


# a 15 mm core radius, the middle of the phantoms' 10-20 mm: the `Large` size label of the demo is core >= this
LARGE_TUMOUR_ML = round(4 / 3 * np.pi * 15.0**3 / 1000, 1)
VOLUME_COLUMNS = ("path", "mask", "Tumour", "Tumour volume mL", "side", "patient_id")
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv"}
PHANTOM_DESCRIPTION = "meddiff synthetic brain phantom, NOT medical data"


def write_phantom_volumes(
    out_dir: Path, n: int, size: int = 64, seed: int = 0, valid_fraction: float = 0.2, progress: bool = True
) -> dict[str, int]:
    """Render n phantoms (half with a tumour, sides alternating) as NIfTI images, tumour masks and label tables
    (`train.csv`, `valid.csv`; paths relative to `out_dir`). Returns volume counts per split."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MeddiffError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    if n < 2:
        raise MeddiffError("--n must be at least 2 (one training and one validation volume)")
    if not 0 < valid_fraction < 1:
        raise MeddiffError(f"valid_fraction must be between 0 and 1, got {valid_fraction}")
    out = Path(out_dir)
    n_valid = max(1, int(round(n * valid_fraction)))
    rows: dict[str, list[dict[str, object]]] = {split: [] for split in SPLIT_FILES}
    for i in tqdm(range(n), desc="3D phantoms", unit="vol", disable=not progress):
        split = "valid" if i >= n - n_valid else "train"
        case_seed = seed * 1_000_003 + i
        ph = render_brain_phantom(case_seed, size, tumour=i % 2 == 0, side=SIDES[(i // 2) % 2])
        image, mask = f"{split}/phantom3d_{i:05d}.nii.gz", f"{split}/phantom3d_{i:05d}_mask.nii.gz"
        write_nifti(out / image, ph.image, ph.affine, f"{PHANTOM_DESCRIPTION}; seed {case_seed}")
        write_nifti(out / mask, ph.mask, ph.affine, "meddiff phantom tumour labels 1/2/4", dtype=np.uint8)
        rows[split].append(
            {
                "path": image,
                "mask": mask,
                "Tumour": int(ph.tumour),
                "Tumour volume mL": round(ph.tumour_volume_ml, 3),
                "side": ph.side,
                "patient_id": f"phantom3d_{case_seed}",
            }
        )
    for split, name in SPLIT_FILES.items():
        tmp = out / f"{name}.tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=VOLUME_COLUMNS)
            writer.writeheader()
            writer.writerows(rows[split])
        tmp.replace(out / name)
    (out / "README.txt").write_text(
        "meddiff 3D brain PHANTOMS: procedurally drawn synthetic test data, NOT medical data.\n"
        f"n={n} size={size} seed={seed} spacing={FIELD_OF_VIEW_MM / size:g} mm (RAS); masks: 1 necrotic core, "
        "2 oedema, 4 enhancing rim; 'Tumour volume mL' is the core (rim + necrosis).\n"
    )
    return {split: len(r) for split, r in rows.items()}
