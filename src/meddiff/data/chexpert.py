"""`chexpert:ROOT` — CheXpert-v1.0 and CheXpert-v1.0-small exactly as released.

ROOT may be the release folder (holding train.csv / valid.csv), its parent, or one CheXpert-format CSV file
(such as the manifest of `meddiff generate`); `Path` values start with the
release folder name and resolve either way. Options:
  split=train|val|valid   train.csv minus a patient-level validation fraction | that fraction | official valid.csv
  u=ones|zeros|ignore     uncertain (-1) labels; ignore = masked out of conditioning (not treated as 0)
  blank=zeros|ignore      what a blank (not mentioned) cell means
  view=frontal|lateral|ap|pa|all
  labels=A,B              a subset of the 14 observations
  val_fraction=0.1, seed=0, plus fit=crop|pad, cache=0|1, prompt_view=1, prompt_demographics=1, uncertain=omit|possible
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from meddiff.data.chexpert_format import CHEXPERT_OBSERVATIONS, parse_value
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.demographics import demographic_labels
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.records import LabelPolicy, Record, RecordTable, parse_label_subset, split_by_patient
from meddiff.data.registry import DatasetSpec, register
from meddiff.errors import MeddiffError

OPTIONS = ("split", "u", "blank", "view", "labels", "val_fraction", "seed") + COMMON_OPTIONS
VIEWS = ("frontal", "lateral", "ap", "pa", "all")


def find_csv(root: Path, name: str) -> Path | None:
    for candidate in [root / name, *sorted(root.glob(f"*/{name}"))]:
        if candidate.is_file():
            return candidate
    return None


def resolve_image(csv_dir: Path, rel: str) -> Path:
    """CheXpert `Path` values begin with the release folder ('CheXpert-v1.0-small/train/...'): accept the CSV's
    folder or its parent as the root."""
    rel_path = Path(rel)
    candidates = [csv_dir.parent / rel_path, csv_dir / rel_path]
    if len(rel_path.parts) > 1:
        candidates.append(csv_dir / Path(*rel_path.parts[1:]))
    return next((c for c in candidates if c.exists()), candidates[0])


def read_label_csv(csv_path: Path, label_names: tuple[str, ...] | list[str], source: str) -> RecordTable:
    """A CheXpert-format table -> RecordTable (raw 1 / 0 / -1 / blank values kept)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in ("Path", *label_names) if c not in columns]
        if missing:
            raise MeddiffError(
                f"{csv_path} lacks column(s) {', '.join(missing)}; expected CheXpert columns "
                f"Path, Sex, Age, Frontal/Lateral, AP/PA, {', '.join(label_names)}"
            )
        rows = list(reader)
    records = []
    for line, row in enumerate(rows, start=2):
        values = {}
        for name in label_names:
            try:
                values[name] = parse_value(row.get(name) or "")
            except ValueError as exc:
                raise MeddiffError(f"{csv_path} line {line}, column {name!r}: {exc}") from None
        rel = row["Path"]
        patient = re.search(r"(patient\d+)", rel)
        study = re.search(r"(study\d+)", rel)
        fl = (row.get("Frontal/Lateral") or "").strip().lower()
        view = "LATERAL" if fl == "lateral" else (row.get("AP/PA") or "").strip().upper()
        try:
            age = float(row["Age"]) if row.get("Age") not in (None, "") else None
        except ValueError:
            age = None
        records.append(
            Record(
                path=resolve_image(csv_path.parent, rel),
                values=values,
                patient=patient.group(1) if patient else rel,
                study=study.group(1) if study else "",
                view=view,
                frontal=None if not fl else fl == "frontal",
                sex=(row.get("Sex") or "").strip(),
                age=age,
            )
        )
    return RecordTable(records, list(label_names), source)


def filter_view(table: RecordTable, view: str) -> RecordTable:
    view = view.lower()
    if view not in VIEWS:
        raise MeddiffError(f"view= must be one of {', '.join(VIEWS)}, got {view!r}")
    if view == "all":
        return table
    if view == "frontal":
        return table.filtered(lambda r: r.frontal is not False and r.view != "LATERAL", "view=frontal")
    if view == "lateral":
        return table.filtered(lambda r: r.frontal is False or r.view == "LATERAL", "view=lateral")
    return table.filtered(lambda r: r.view == view.upper(), f"view={view}")


@demographic_labels
def index_chexpert(spec: DatasetSpec) -> RecordTable:
    root = Path(spec.path).expanduser()
    if not root.exists():
        raise MeddiffError(
            f"CheXpert folder {root} does not exist; point chexpert: at CheXpert-v1.0-small/ or its parent"
        )
    labels = parse_label_subset(spec.options.get("labels"), list(CHEXPERT_OBSERVATIONS))
    if root.is_file():  # a single CheXpert-format table, e.g. a manifest written by `meddiff generate`
        return filter_view(read_label_csv(root, labels, str(spec)), spec.options.get("view", "all"))
    split = spec.options.get("split", "train")
    if split not in ("train", "val", "valid", "test"):
        raise MeddiffError(f"split= must be train, val or valid, got {split!r}")
    name = "valid.csv" if split in ("valid", "test") else "train.csv"
    csv_path = find_csv(root, name)
    if csv_path is None:
        raise MeddiffError(f"no {name} in {root} or its subfolders; is this a CheXpert-v1.0(-small) folder?")
    table = read_label_csv(csv_path, labels, str(spec))
    table = filter_view(table, spec.options.get("view", "frontal"))
    if split in ("train", "val"):
        try:
            fraction = float(spec.options.get("val_fraction", "0.1"))
            seed = int(spec.options.get("seed", "0"))
        except ValueError:
            raise MeddiffError("val_fraction must be a number and seed an integer") from None
        table = split_by_patient(table, split, fraction, seed=seed)
    return table


def policy_from(spec: DatasetSpec, default_uncertain: str = "ones") -> LabelPolicy:
    return LabelPolicy(spec.options.get("u", default_uncertain), spec.options.get("blank", "zeros"))


def plan_chexpert(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    return MaterializePlan(index_chexpert(spec), policy_from(spec), Preprocess.from_options(spec.options, resolution))


@register("chexpert", heldout_split="valid", options=OPTIONS, index=index_chexpert, plan=plan_chexpert)
def load_chexpert(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    return plan_chexpert(spec, resolution).materialize(str(spec))
