"""Small synthetic BraTS-like cases with a known survival signal, for tests and for trying the tool without data.

Each case is a skull-stripped ellipsoidal "brain" in four modalities with a tumour: necrotic core (label 1) inside
an enhancing rim (4) inside oedema (2). Survival falls with tumour size and age and rises with distance from the
brain centre, plus noise, so a working pipeline must find size, location and age features. Synthetic test data,
not patient data."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# base brain intensity and (core, rim, oedema) contrast per modality, loosely like real MRI
CONTRAST = {
    "t1": (500, (-150, 60, -60)),
    "t1ce": (500, (-150, 400, -40)),
    "t2": (400, (300, 150, 250)),
    "flair": (400, (100, 120, 350)),
}


def survival_days(radius: float, age: float, distance: float, noise: float) -> float:
    return float(max(30.0, 1200.0 - 90.0 * radius - 8.0 * age + 15.0 * distance + noise))


def write_synthetic_brats(root: str | Path, n: int = 40, size: int = 24, seed: int = 0) -> Path:
    """n case folders BraTS20_Training_NNN/ (t1, t1ce, t2, flair, seg .nii.gz) and survival_info.csv under root."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"), axis=-1)
    centre = np.array([size / 2 - 0.5] * 3, np.float32)
    brain = (((grid - centre) / (np.array([0.45, 0.40, 0.38]) * size)) ** 2).sum(-1) <= 1
    rows = []
    for i in range(n):
        case_id = f"BraTS20_Training_{i + 1:03d}"
        radius = rng.uniform(0.08, 0.25) * size
        distance = rng.uniform(0.0, 0.18) * size
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        t_centre = centre + direction * distance
        r = np.sqrt(((grid - t_centre) ** 2).sum(-1))
        seg = np.zeros((size,) * 3, np.uint8)
        seg[(r <= radius * 1.6) & brain] = 2
        seg[(r <= radius) & brain] = 4
        seg[(r <= radius * 0.55) & brain] = 1
        age = float(np.round(rng.uniform(30, 80)))
        days = survival_days(radius * 24 / size, age, distance * 24 / size, rng.normal(0, 40))
        folder = root / case_id
        folder.mkdir(exist_ok=True)
        affine = np.eye(4)
        for modality, (base, (core, rim, oedema)) in CONTRAST.items():
            vol = np.where(brain, base, 0).astype(np.float32)
            vol[seg == 1] += core
            vol[seg == 4] += rim
            vol[seg == 2] += oedema
            vol += np.where(brain, rng.normal(0, 25, vol.shape), 0).astype(np.float32)
            nib.save(
                nib.Nifti1Image(np.clip(vol, 0, None).astype(np.float32), affine),
                str(folder / f"{case_id}_{modality}.nii.gz"),
            )
        nib.save(nib.Nifti1Image(seg, affine), str(folder / f"{case_id}_seg.nii.gz"))
        rows.append(
            {
                "Brats20ID": case_id,
                "Age": f"{age:.3f}",
                "Survival_days": f"{days:.0f}",
                "Extent_of_Resection": "GTR" if i % 3 else "STR",
            }
        )
    with open(root / "survival_info.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
