"""`csv:FILE` — a table with a path column plus label columns and/or a free-text prompt column.

Options: path_col= (default: Path, path, file, filename or image, whichever exists), label_cols=A,B (default:
every other column whose values are all 1 / 0 / -1 / blank), prompt_col=, root= (folder the paths are relative
to, default the CSV's folder), split_col= with split=, else a patient-level hash split (patient_col=,
val_fraction=, test_fraction=, seed=; split=all takes every row); u=, blank=, axis=, slices=, and the common
fit/cache/prompt options.
Manifests written by `meddiff generate` read back directly."""

from __future__ import annotations

import csv
from pathlib import Path

from meddiff.data.chexpert import policy_from
from meddiff.data.chexpert_format import parse_value
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.demographics import demographic_labels
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.records import Record, RecordTable, dicom_patient_ids, split_by_patient
from meddiff.data.registry import DatasetSpec, register
from meddiff.data.volumes import VOLUME_OPTIONS, expand_volumes
from meddiff.errors import MeddiffError

OPTIONS = (
    (
        "path_col",
        "label_cols",
        "prompt_col",
        "root",
        "split_col",
        "split",
        "patient_col",
        "val_fraction",
        "test_fraction",
        "seed",
        "u",
        "blank",
        "subject",
    )
    + VOLUME_OPTIONS
    + COMMON_OPTIONS
)
PATH_COLUMNS = ("Path", "path", "file", "filename", "image")
NOT_LABELS = {
    *("Sex", "Age", "Frontal/Lateral", "AP/PA", "ViewPosition", "view", "View"),
    *("seed", "steps", "guidance", "scheduler", "model", "prompt"),
}


def _age(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None  # an unreadable age is an unknown age


def _view(row: dict[str, str]) -> str:
    """CheXpert's Frontal/Lateral + AP/PA, or a plain view / ViewPosition column."""
    if (row.get("Frontal/Lateral") or "").strip().lower() == "lateral":
        return "LATERAL"
    return (row.get("AP/PA") or row.get("ViewPosition") or row.get("view") or row.get("View") or "").strip().upper()


def _is_label_column(rows: list[dict[str, str]], column: str) -> bool:
    seen = False
    for row in rows:
        try:
            value = parse_value(row.get(column) or "")
        except ValueError:
            return False
        seen |= value is not None
    return seen


@demographic_labels
def index_csv(spec: DatasetSpec) -> RecordTable:
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise MeddiffError(f"CSV file {path} not found")
    opts = spec.options
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MeddiffError(f"{path} is not a readable CSV ({exc})") from None
    path_col = opts.get("path_col") or next((c for c in PATH_COLUMNS if c in columns), None)
    if path_col is None or path_col not in columns:
        raise MeddiffError(
            f"{path} has no path column; expected one of {', '.join(PATH_COLUMNS)} or path_col=NAME "
            f"(columns: {', '.join(columns)})"
        )
    prompt_col = opts.get("prompt_col")
    if prompt_col and prompt_col not in columns:
        raise MeddiffError(f"prompt_col={prompt_col} is not a column of {path} (columns: {', '.join(columns)})")
    special = {path_col, prompt_col, opts.get("split_col"), opts.get("patient_col")}
    if opts.get("label_cols"):
        labels = [c.strip() for c in opts["label_cols"].split(",") if c.strip()]
        missing = [c for c in labels if c not in columns]
        if missing:
            raise MeddiffError(f"label_cols: {', '.join(missing)} not in {path} (columns: {', '.join(columns)})")
    else:
        labels = [c for c in columns if c not in special and c not in NOT_LABELS and _is_label_column(rows, c)]
    if not labels and not prompt_col:
        raise MeddiffError(
            f"{path} has no label columns (values 1/0/-1/blank) and no prompt_col=; name them with "
            "label_cols=A,B or prompt_col=COLUMN"
        )
    root = Path(opts.get("root", path.parent)).expanduser()
    records = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {c: parse_value(row.get(c) or "") for c in labels}
        except ValueError as exc:
            raise MeddiffError(f"{path} line {line}: {exc}") from None
        rel = (row.get(path_col) or "").strip()
        if not rel:
            raise MeddiffError(f"{path} line {line}: empty {path_col}")
        text = (row.get(prompt_col) or "").strip() or None if prompt_col else None
        split = row.get(opts["split_col"]) if opts.get("split_col") else None
        patient = row.get(opts["patient_col"], "") if opts.get("patient_col") else rel
        records.append(
            Record(
                path=root / rel,
                values=values,
                patient=patient,
                text=text,
                split=split,
                sex=row.get("Sex", "") or "",
                age=_age(row.get("Age")),
                view=_view(row),
            )
        )
    table = RecordTable(records, labels, str(spec))
    if not opts.get("patient_col"):  # DICOM files carry their own patient id
        table = dicom_patient_ids(table)
    table = expand_volumes(table, opts)
    split = opts.get("split", "train")
    if opts.get("split_col"):
        if opts["split_col"] not in columns:
            raise MeddiffError(f"split_col={opts['split_col']} is not a column of {path}")
        return table.filtered(lambda r: r.split == split, f"{opts['split_col']}={split}")
    if split != "all":  # train and held-out splits never share a patient
        try:
            val, test = float(opts.get("val_fraction", "0.1")), float(opts.get("test_fraction", "0.1"))
            seed = int(opts.get("seed", "0"))
        except ValueError:
            raise MeddiffError("val_fraction/test_fraction must be numbers and seed an integer") from None
        return split_by_patient(table, split, val, test, seed)
    return table


def plan_csv(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    prep = Preprocess.from_options(spec.options, resolution, subject=spec.options.get("subject", "chest x-ray"))
    return MaterializePlan(index_csv(spec), policy_from(spec), prep)


@register("csv", heldout_split="test", options=OPTIONS, index=index_csv, plan=plan_csv)
def load_csv(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    return plan_csv(spec, resolution).materialize(str(spec))
