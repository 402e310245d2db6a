"""CheXpert's label-table layout, shared by the phantom writer, synthetic exports and the CheXpert reader."""

from __future__ import annotations

import csv
import math
from pathlib import Path

CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_META = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_COLUMNS = CHEXPERT_META + CHEXPERT_OBSERVATIONS


def format_value(value: float | None) -> str:
    """CheXpert cell: '1.0', '0.0', '-1.0', or '' for not mentioned."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.1f}"


def parse_value(cell: str) -> float | None:
    """Inverse of format_value; raises ValueError on anything that is not blank, 1, 0 or -1."""
    cell = cell.strip()
    if cell == "":
        return None
    value = float(cell)
    if math.isnan(value):
        return None
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {cell!r} is not 1, 0, -1 or blank")
    return value


def write_label_table(path: Path, rows: list[dict[str, object]], extra_columns: tuple[str, ...] = ()) -> None:
    """Write rows (dicts keyed by CheXpert columns, plus extras) atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    columns = CHEXPERT_COLUMNS + tuple(extra_columns)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            out = dict(row)
            for name in CHEXPERT_OBSERVATIONS:
                out[name] = format_value(row.get(name))  # type: ignore[arg-type]
            writer.writerow(out)
    tmp.replace(path)
