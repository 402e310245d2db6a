"""BraTS-style cases: one folder per case with *_t1, *_t1ce, *_t2, *_flair and *_seg NIfTI volumes, plus
survival_info.csv (Brats20ID, Age, Survival_days, Extent_of_Resection).

Survival values that are not a number of days are handled explicitly, never guessed: "ALIVE (361 days later)" is a
censored observation (the patient lived at least that long; the true survival is unknown), so the case is left out
of regression and counted as censored; anything else unparseable is counted as unparseable. Every case left out is
listed with its reason."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from meddiff.errors import MeddiffError

if TYPE_CHECKING:
    import nibabel as nib

MODALITIES = ("t1", "t1ce", "t2", "flair")
SURVIVAL_FILES = ("survival_info.csv", "survival_data.csv")
ID_COLUMNS = ("brats20id", "brats_id", "bratsid", "brats19id", "brats18id", "id")
_ALIVE = re.compile(r"^\s*alive\s*\(?\s*(\d+(?:\.\d+)?)\s*days?\s*later\s*\)?\s*$", re.IGNORECASE)
_NUMBER = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


@dataclass(frozen=True)
class SurvivalValue:
    days: float | None  # survival in days when it is known
    status: str  # "known", "censored" (alive after `censored_days`), "missing" or "unparseable"
    censored_days: float | None = None


def parse_survival(text: str | None) -> SurvivalValue:
    """'289' -> 289 days; 'ALIVE (361 days later)' -> censored at 361; '' -> missing; anything else unparseable."""
    text = (text or "").strip()
    if not text or text.lower() in ("na", "nan", "n/a"):
        return SurvivalValue(None, "missing")
    if _NUMBER.match(text):
        return SurvivalValue(float(text), "known")
    alive = _ALIVE.match(text)
    if alive:
        return SurvivalValue(None, "censored", float(alive.group(1)))
    return SurvivalValue(None, "unparseable")


@dataclass
class Case:
    case_id: str
    folder: Path
    age: float
    survival_days: float
    resection: str
    paths: dict[str, Path]  # modality -> file, plus "seg"


@dataclass
class CaseTable:
    cases: list[Case]
    skipped: dict[str, str] = field(default_factory=dict)  # case id -> reason

    def skip_summary(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for reason in self.skipped.values()))


def _find_volume(folder: Path, key: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        hits = sorted(folder.glob(f"*_{key}{suffix}"))
        if hits:
            return hits[0]
    return None


def find_survival_csv(root: Path) -> Path:
    for name in SURVIVAL_FILES:
        for candidate in (root / name, *sorted(root.glob(f"*/{name}"))):
            if candidate.is_file():
                return candidate
    raise MeddiffError(f"no {' or '.join(SURVIVAL_FILES)} in {root}; the BraTS layout has one beside the case folders")


def read_survival_csv(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """case id -> {age, survival, resection}; plus id -> reason for rows that cannot be used."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        rows = list(reader)
    id_col = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    age_col = columns.get("age")
    surv_col = columns.get("survival_days") or columns.get("survival")
    missing = [
        name for name, col in (("Brats20ID", id_col), ("Age", age_col), ("Survival_days", surv_col)) if col is None
    ]
    if missing:
        raise MeddiffError(f"{path} lacks the column(s) {', '.join(missing)}; it has: {', '.join(columns.values())}")
    res_col = columns.get("extent_of_resection") or columns.get("resectionstatus")
    table, problems = {}, {}
    for line, row in enumerate(rows, start=2):
        case_id = (row.get(id_col) or "").strip()
        if not case_id:
            problems[f"line {line}"] = "no case id"
            continue
        survival = parse_survival(row.get(surv_col))
        try:
            age = float(row.get(age_col) or "nan")
        except ValueError:
            age = math.nan
        if survival.status != "known":
            detail = (
                f" (alive at {survival.censored_days:g} days; true survival unknown)"
                if survival.censored_days
                else f" ({row.get(surv_col)!r})"
                if survival.status == "unparseable"
                else ""
            )
            problems[case_id] = f"survival {survival.status}{detail}"
        elif not math.isfinite(age):
            problems[case_id] = f"age not a number ({row.get(age_col)!r})"
        else:
            table[case_id] = {
                "age": age,
                "survival": survival.days,
                "resection": (row.get(res_col) or "").strip() if res_col else "",
            }
    return table, problems


def discover_cases(root: str | Path, modalities: tuple[str, ...] = MODALITIES) -> CaseTable:
    """The usable cases under root; the others counted with their reason (missing modality, no survival...)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MeddiffError(f"{root} is not a folder; pass the BraTS training folder (case folders + survival_info.csv)")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities:
        raise MeddiffError(
            f"unknown modality {unknown[0] if unknown else '(none)'}; choose from {', '.join(MODALITIES)}"
        )
    survival, problems = read_survival_csv(find_survival_csv(root))
    folders = sorted({p.parent for p in root.rglob("*_seg.nii*")})
    if not folders:
        raise MeddiffError(f"no case folders with a *_seg.nii.gz segmentation under {root}")
    by_id = {folder.name: folder for folder in folders}
    cases, skipped = [], {}
    for case_id, folder in by_id.items():
        if case_id in problems:
            skipped[case_id] = problems[case_id]
            continue
        if case_id not in survival:
            skipped[case_id] = "no survival row"
            continue
        paths = {m: _find_volume(folder, m) for m in (*modalities, "seg")}
        absent = [m for m, p in paths.items() if p is None]
        if absent:
            skipped[case_id] = f"missing modality: {', '.join(absent)}"
            continue
        info = survival[case_id]
        cases.append(Case(case_id, folder, info["age"], info["survival"], info["resection"], paths))  # type: ignore
    for case_id, reason in problems.items():
        if case_id not in by_id and case_id not in skipped and not case_id.startswith("line "):
            skipped[case_id] = f"no case folder ({reason})"
    for case_id in survival:
        if case_id not in by_id:
            skipped[case_id] = "no case folder"
    return CaseTable(cases, skipped)


def _load_image(path: Path) -> nib.spatialimages.SpatialImage:
    """A NIfTI image (nibabel types load() as any file image)."""
    import nibabel as nib

    return cast("nib.spatialimages.SpatialImage", nib.load(str(path)))


def load_case(case: Case, modalities: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray, tuple]:
    """(modality -> float32 volume, integer label volume, voxel spacing); MeddiffError naming the problem."""
    try:
        seg_img = _load_image(case.paths["seg"])
        seg = np.asarray(seg_img.dataobj).astype(np.int16)
        volumes = {m: np.asarray(_load_image(case.paths[m]).dataobj, dtype=np.float32) for m in modalities}
    except Exception as exc:  # nibabel raises many kinds for corrupt files
        raise MeddiffError(f"unreadable volume: {str(exc).splitlines()[0][:120]}") from None
    shapes = {m: v.shape for m, v in volumes.items()}
    if any(shape != seg.shape for shape in shapes.values()):
        raise MeddiffError(
            "mismatched shapes: seg " + str(seg.shape) + ", " + ", ".join(f"{m} {s}" for m, s in shapes.items())
        )
    labels = set(np.unique(seg).tolist()) - {0}
    if not labels:
        raise MeddiffError("empty segmentation")
    if labels - {1, 2, 4}:
        raise MeddiffError(f"unexpected segmentation labels {sorted(labels - {1, 2, 4})} (BraTS uses 1, 2, 4)")
    spacing = tuple(float(z) for z in seg_img.header.get_zooms()[:3])
    return volumes, seg, spacing
