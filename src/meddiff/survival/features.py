"""Radiomic features per case: for each tumour region and chosen modality, pyradiomics' first-order and texture
(GLCM by default) features; per region, pyradiomics' shape features plus extent and the tumour centroid's distance
and offset from the brain centre; plus age.

Regions from the BraTS labels (1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour): whole tumour
{1, 2, 4}, tumour core {1, 4}, enhancing tumour {4}, oedema {2}. Intensities are z-scored inside the brain mask
(voxels > 0 in any modality: BraTS volumes are skull-stripped) and scaled by 100 before pyradiomics bins them
(bin width 25), so features compare across scanners. A region a case does not have (no enhancing tumour, say)
gives missing values, imputed later inside each training fold.

Features are cached per case (features/<case>.json) with the settings they were computed with, so a rerun with
other thresholds or models does not extract again."""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from meddiff.errors import MeddiffError
from meddiff.survival.cases import Case, load_case

REGIONS = {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,), "ed": (2,)}
REGION_NAMES = {"wt": "whole tumour", "tc": "tumour core", "et": "enhancing tumour", "ed": "oedema"}
INTENSITY_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
EXTRA = "pip install 'meddiff[survival]' (or: bash scripts/install.sh survival)"


@dataclass(frozen=True)
class FeatureSettings:
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    classes: tuple[str, ...] = ("firstorder", "shape", "glcm")  # shape is per region; the others per modality
    bin_width: float = 25.0
    scale: float = 100.0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def check(self) -> None:
        unknown = [c for c in self.classes if c != "shape" and c not in INTENSITY_CLASSES]
        if unknown:
            raise MeddiffError(
                f"unknown feature class {unknown[0]!r}; choose from shape, {', '.join(INTENSITY_CLASSES)}"
            )


def require_pyradiomics():
    try:
        import radiomics  # noqa: F401
        import SimpleITK  # noqa: F401
    except ImportError:
        raise MeddiffError(f"meddiff survival needs pyradiomics, the optional 'survival' extra: {EXTRA}") from None
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    return radiomics


def _extractors(settings: FeatureSettings):
    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)  # also in worker processes
    common = {
        "binWidth": settings.bin_width,
        "label": 1,
        "additionalInfo": False,
        "minimumROIDimensions": 1,
        "minimumROISize": 1,
        "normalize": False,
    }
    intensity = featureextractor.RadiomicsFeatureExtractor(**common)
    intensity.disableAllFeatures()
    for name in settings.classes:
        if name != "shape":
            intensity.enableFeatureClassByName(name)
    shape = None
    if "shape" in settings.classes:
        shape = featureextractor.RadiomicsFeatureExtractor(**common)
        shape.disableAllFeatures()
        shape.enableFeatureClassByName("shape")
    return intensity, shape


def _sitk(array: np.ndarray, spacing: tuple):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # nibabel x,y,z -> sitk z,y,x
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _values(result: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in result.items():
        if key.startswith("original_"):
            _, cls, name = key.split("_", 2)
            value = np.asarray(value)
            # GLCM's Imc2 can come out complex (sqrt of a tiny negative): that is no value, not its real part
            out[f"{prefix}_{cls}_{name}"] = (
                float(value.real) if not np.iscomplexobj(value) or value.imag == 0 else float("nan")
            )
    return out


def _location(mask: np.ndarray, brain: np.ndarray, spacing: tuple, region: str) -> dict[str, float]:
    sp = np.asarray(spacing, dtype=np.float64)
    brain_centre = np.argwhere(brain).mean(axis=0) * sp
    voxels = np.argwhere(mask)
    centre = voxels.mean(axis=0) * sp
    offset = centre - brain_centre
    lo, hi = voxels.min(axis=0), voxels.max(axis=0)
    extent = len(voxels) / float(np.prod(hi - lo + 1))
    return {
        f"{region}_location_CentroidDistance": float(np.linalg.norm(offset)),
        f"{region}_location_OffsetX": float(offset[0]),
        f"{region}_location_OffsetY": float(offset[1]),
        f"{region}_location_OffsetZ": float(offset[2]),
        f"{region}_shape_Extent": float(extent),
    }


def case_features(case: Case, settings: FeatureSettings) -> dict[str, float]:
    """Every feature of one case (NaN where a region is absent); MeddiffError for an unusable case."""
    volumes, seg, spacing = load_case(case, settings.modalities)
    brain = np.zeros(seg.shape, bool)
    for v in volumes.values():
        brain |= v > 0
    brain |= seg > 0
    intensity, shape = _extractors(settings)
    images = {}
    for m, v in volumes.items():
        inside = v[brain]
        std = float(inside.std()) or 1.0
        images[m] = _sitk((v - float(inside.mean())) / std * settings.scale, spacing)
    features: dict[str, float] = {"age": float(case.age)}
    for region, labels in REGIONS.items():
        mask = np.isin(seg, labels)
        if not mask.any():
            continue  # absent region: missing values, imputed within each training fold
        mask_image = _sitk(mask.astype(np.uint8), spacing)
        features.update(_location(mask, brain, spacing, region))
        try:
            if shape is not None:
                features.update(_values(shape.execute(next(iter(images.values())), mask_image), region))
            if any(c != "shape" for c in settings.classes):
                for m, image in images.items():
                    features.update(_values(intensity.execute(image, mask_image), f"{region}_{m}"))
        except (ValueError, RuntimeError) as exc:  # pyradiomics refuses some one-voxel regions
            features[f"{region}_failed"] = 1.0
            logging.getLogger("meddiff").debug("pyradiomics failed on %s %s: %s", case.case_id, region, exc)
    return features


def _one(args) -> tuple[str, dict[str, float] | None, str | None]:
    case, settings, cache = args
    path = cache / f"{case.case_id}.json" if cache else None
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") == settings.key():
            return case.case_id, stored["features"], None
    try:
        values = case_features(case, settings)
    except MeddiffError as exc:
        return case.case_id, None, str(exc)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": settings.key(), "features": values}))
        tmp.replace(path)
    return case.case_id, values, None


def extract_all(
    cases: list[Case], settings: FeatureSettings, cache: Path | None = None, workers: int = 1, progress: bool = True
) -> tuple[list[str], list[str], np.ndarray, dict[str, str]]:
    """(case ids, feature names, (cases, features) matrix with NaN for missing, case id -> skip reason)."""
    require_pyradiomics()
    settings.check()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    jobs = [(case, settings, cache) for case in cases]
    results = []
    bar = tqdm(total=len(jobs), desc="radiomic features", unit="case", disable=not progress, dynamic_ncols=True)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_one, jobs):
                results.append(result)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_one(job))
            bar.update(1)
    bar.close()
    skipped = {case_id: reason for case_id, values, reason in results if values is None and reason is not None}
    kept = [(case_id, values) for case_id, values, _ in results if values is not None]
    if not kept:
        raise MeddiffError(f"no case gave features ({len(skipped)} skipped, e.g. {next(iter(skipped.values()), '')})")
    names = sorted({name for _, values in kept for name in values if not name.endswith("_failed")})
    names = ["age"] + [n for n in names if n != "age"]
    matrix = np.array([[values.get(n, np.nan) for n in names] for _, values in kept], dtype=np.float64)
    return [case_id for case_id, _ in kept], names, matrix, skipped
