"""`phantom:` datasets: phantom folders written by `meddiff data phantom`, or phantoms rendered in memory.

A phantom folder mirrors CheXpert's layout: `train.csv` and `valid.csv` in CheXpert column format, with
`Path` relative to the folder (`train/phantom_00000.png`). It is synthetic test data, not medical data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data.chexpert import read_label_csv
from meddiff.data.chexpert_format import write_label_table
from meddiff.data.dataset import ImageLabelDataset, to_model_range
from meddiff.data.demographics import demographic_labels, parse_attributes, present_labels, values_for
from meddiff.data.io import resize, write_png
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.phantom import FINDINGS, MAX_SIZE, MIN_SIZE, NO_FINDING, render_phantom
from meddiff.data.records import LabelPolicy, RecordTable
from meddiff.data.registry import DatasetSpec, register
from meddiff.errors import MeddiffError

PHANTOM_LABELS = (NO_FINDING,) + FINDINGS
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv"}


def write_phantom_folder(
    out: Path,
    n: int,
    size: int,
    seed: int,
    valid_fraction: float = 0.2,
    bit_depth: int = 8,
    progress: bool = True,
    studies: int = 1,
) -> dict[str, int]:
    """Render n phantoms into `out` (PNG + CheXpert-format CSVs). Returns image counts per split. `studies` > 1:
    each synthetic patient has that many studies (same anatomy, sex and age; new findings and acquisition), named
    `SPLIT/patientPPPPP_studyS.png` so that the patient id reaches the dataset; the validation split holds whole
    patients (patient-disjoint), for re-identification and patient-level privacy tests."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MeddiffError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}, got {size}")
    if n < 2:
        raise MeddiffError("--n must be at least 2 (one training and one validation image)")
    if studies < 1:
        raise MeddiffError(f"--studies must be at least 1, got {studies}")
    out = Path(out)
    n_valid = max(1, int(round(n * valid_fraction)))
    if studies > 1:  # whole patients in the validation split
        n_valid = max(studies, int(round(n_valid / studies)) * studies)
        if n_valid >= n:
            raise MeddiffError(f"--n {n} with --studies {studies} leaves no training patient; raise --n")
    rows: dict[str, list[dict[str, object]]] = {"train": [], "valid": []}
    for split in rows:
        (out / split).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc="phantoms", unit="img", disable=not progress):
        split = "valid" if i >= n - n_valid else "train"
        if studies > 1:
            patient, study = (n - 1 - i) // studies, (n - 1 - i) % studies  # counted from the end: whole valid patients
            ph = render_phantom(seed * 1_000_003 + i, size, patient=seed * 1_000_003 + 500_000 + patient)
            rel = f"{split}/patient{patient:05d}_study{study + 1}.png"
        else:
            ph = render_phantom(seed * 1_000_003 + i, size)
            rel = f"{split}/phantom_{i:06d}.png"
        write_png(
            out / rel,
            ph.image,
            bit_depth=bit_depth,
            text={"meddiff": "synthetic phantom, not medical data", "seed": str(seed * 1_000_003 + i)},
        )
        row: dict[str, object] = {
            "Path": rel,
            "Sex": ph.meta["sex"],
            "Age": ph.meta["age"],
            "Frontal/Lateral": "Frontal",
            "AP/PA": ph.meta["view"],
        }
        row.update({name: float(ph.findings[name]) for name in PHANTOM_LABELS})
        rows[split].append(row)
    for split, file in SPLIT_FILES.items():
        write_label_table(out / file, rows[split])
    (out / "README.txt").write_text(
        "meddiff chest radiograph PHANTOMS: procedurally drawn synthetic test data, NOT medical data.\n"
        f"n={n} size={size} seed={seed}; labels in CheXpert column format (train.csv, valid.csv).\n"
    )
    return {split: len(r) for split, r in rows.items()}


def _phantom_csv(spec: DatasetSpec) -> Path:
    """The split's label table of a phantom folder, with one-line errors for everything that can be wrong."""
    root = Path(spec.path).expanduser()
    split = spec.options.get("split", "train")
    if not root.exists():
        raise MeddiffError(f"phantom folder {root} does not exist; create it with `meddiff data phantom --out {root}`")
    if not root.is_dir():
        raise MeddiffError(f"phantom path {root} is not a folder")
    if split not in SPLIT_FILES:
        raise MeddiffError(f"phantom split must be one of {list(SPLIT_FILES)}, got {split!r}")
    csv_path = root / SPLIT_FILES[split]
    if not csv_path.is_file():
        raise MeddiffError(
            f"{root} has no {SPLIT_FILES[split]}; create phantoms with `meddiff data phantom --out {root}`"
        )
    return csv_path


def render_phantom_dataset(
    n: int, resolution: int, seed: int, progress: bool = False, attributes: tuple[str, ...] = ()
) -> ImageLabelDataset:
    """Phantoms rendered straight into memory (no files); `attributes` adds demographic labels (demographics=)."""
    size = min(max(resolution, MIN_SIZE), MAX_SIZE)
    images: list = []
    labels: list[list[float]] = []
    derived = []
    for i in tqdm(range(n), desc="phantoms", unit="img", disable=not progress):
        ph = render_phantom(seed * 1_000_003 + i, size)
        images.append(resize(ph.image, resolution))
        labels.append([float(ph.findings[name]) for name in PHANTOM_LABELS])
        meta = ph.meta
        derived.append(values_for(attributes, str(meta["sex"]), float(str(meta["age"])), str(meta["view"])))
    names = list(PHANTOM_LABELS)
    if attributes:
        extra = present_labels(attributes, derived, "phantom")
        labels = [row + [float(d[name] or 0.0) for name in extra] for row, d in zip(labels, derived)]
        names += extra
    lab = torch.tensor(labels, dtype=torch.float32)
    return ImageLabelDataset(to_model_range(np.stack(images)), lab, torch.ones_like(lab, dtype=torch.bool), names)


@demographic_labels
def index_phantom(spec: DatasetSpec) -> RecordTable:
    return read_label_csv(_phantom_csv(spec), PHANTOM_LABELS, str(spec))


def plan_phantom(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    if spec.path == "":
        raise MeddiffError(
            f"{spec} is rendered in memory; write phantom files with `meddiff data phantom --out DIR` to prepare them"
        )
    return MaterializePlan(index_phantom(spec), LabelPolicy(), Preprocess.from_options(spec.options, resolution))


@register(
    "phantom",
    heldout_split="valid",
    options=("split", "n", "seed") + COMMON_OPTIONS,
    index=index_phantom,
    plan=plan_phantom,
)
def load_phantom(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    split = spec.options.get("split", "train")
    if spec.path == "":  # in memory: phantom:?n=2000&seed=0 ; the held-out split uses another seed
        try:
            n, seed = int(spec.options.get("n", "2000")), int(spec.options.get("seed", "0"))
        except ValueError:
            raise MeddiffError(f"{spec}: n and seed must be integers") from None
        return render_phantom_dataset(
            n if split == "train" else max(n // 4, 1),
            resolution,
            seed if split == "train" else seed + 7919,
            attributes=parse_attributes(spec.options.get("demographics")),
        )
    return plan_phantom(spec, resolution).materialize(str(spec))
