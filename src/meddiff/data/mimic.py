"""`mimic:ROOT` — MIMIC-CXR-JPG 2.0.0 as released: `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` joined with
`mimic-cxr-2.0.0-metadata.csv`, `-chexpert.csv` or `-negbio.csv`, and `-split.csv` (plain or .gz).

Options: split=train|validate|test (official), labeler=chexpert|negbio, view=PA,AP (ViewPosition values or
'all'), u=, blank=, labels=, prompts=labels|report (report: the impression section of
files/pXX/pSUBJECT/sSTUDY.txt, else findings; falls back to labels where no report), reports=DIR (where the
report tree lives, default ROOT), demographics=sex,age,view with patients=FILE (MIMIC-IV's `hosp/patients.csv(.gz)`:
sex from `gender`, age at each study from `anchor_age` + the study's year - `anchor_year`, the date shift being the
same in both releases; default ROOT/patients.csv(.gz) when present), plus the common fit/cache/prompt options."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

from meddiff.data.chexpert import policy_from
from meddiff.data.chexpert_format import CHEXPERT_OBSERVATIONS, parse_value
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.demographics import demographic_labels, parse_attributes
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.records import Record, RecordTable, parse_label_subset
from meddiff.data.registry import DatasetSpec, register
from meddiff.errors import MeddiffError

PREFIX = "mimic-cxr-2.0.0"
OPTIONS = ("split", "labeler", "view", "u", "blank", "labels", "prompts", "reports", "patients") + COMMON_OPTIONS


def _read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a plain or gzipped CSV (the MIMIC releases ship both)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def _open_table(root: Path, suffix: str) -> list[dict[str, str]]:
    for path in (root / f"{PREFIX}-{suffix}.csv", root / f"{PREFIX}-{suffix}.csv.gz"):
        if path.is_file():
            return _read_csv(path)
    raise MeddiffError(f"{root} lacks {PREFIX}-{suffix}.csv(.gz); point mimic: at the MIMIC-CXR-JPG 2.0.0 folder")


def _require(rows: list[dict[str, str]], columns: tuple[str, ...], what: str) -> None:
    if rows and (missing := [c for c in columns if c not in rows[0]]):
        raise MeddiffError(f"{PREFIX}-{what}.csv lacks column(s) {', '.join(missing)}; expected {', '.join(columns)}")


def report_text(path: Path) -> str | None:
    """The impression section of a MIMIC-CXR report, else its findings, whitespace collapsed."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    sections = {m.group(1).upper(): m.end() for m in re.finditer(r"^\s*([A-Z][A-Z /]+):", text, re.MULTILINE)}
    order = sorted(sections.items(), key=lambda kv: kv[1])
    for wanted in ("IMPRESSION", "FINDINGS"):
        if wanted in sections:
            start = sections[wanted]
            later = [pos for _, pos in order if pos > start]
            end = text.rfind("\n", 0, later[0]) if later else len(text)
            body = " ".join(text[start:end].split())
            # cut the next section's header if rfind landed before it
            body = re.sub(r"\s+[A-Z][A-Z /]+:$", "", body)
            if body:
                return body
    return None


def _patients_file(root: Path, option: str | None) -> Path | None:
    if option:
        path = Path(option).expanduser()
        if not path.is_file():
            raise MeddiffError(f"patients={path} does not exist; point it at MIMIC-IV's hosp/patients.csv(.gz)")
        return path
    for path in (root / "patients.csv", root / "patients.csv.gz"):
        if path.is_file():
            return path
    return None


def read_patients(path: Path) -> dict[str, tuple[str, float, int]]:
    """MIMIC-IV patients table -> subject_id: (gender, anchor_age, anchor_year)."""
    try:
        rows = _read_csv(path)
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as e:
        raise MeddiffError(f"cannot read the patients table {path}: {e}") from None
    needed = ("subject_id", "gender", "anchor_age", "anchor_year")
    if rows and (missing := [c for c in needed if c not in rows[0]]):
        raise MeddiffError(f"{path} lacks column(s) {', '.join(missing)}; expected MIMIC-IV's {', '.join(needed)}")
    out = {}
    for line, row in enumerate(rows, start=2):
        try:
            out[row["subject_id"].strip()] = (row["gender"].strip(), float(row["anchor_age"]), int(row["anchor_year"]))
        except (ValueError, TypeError, AttributeError):  # not numbers, or a short row (DictReader fills None)
            raise MeddiffError(
                f"{path} line {line}: anchor_age {row.get('anchor_age')!r} / anchor_year {row.get('anchor_year')!r} "
                "are not numbers (or the row is short)"
            ) from None
    return out


def age_at_study(anchor_age: float, anchor_year: int, study_date: str) -> float | None:
    """MIMIC-IV's rule: the age in anchor_year is anchor_age; a study's (equally shifted) year adds the difference.
    None when the study date is missing or malformed."""
    date = (study_date or "").strip()
    if len(date) < 4 or not date[:4].isdigit():
        return None
    return anchor_age + (int(date[:4]) - anchor_year)


@demographic_labels
def index_mimic(spec: DatasetSpec) -> RecordTable:
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise MeddiffError(f"MIMIC-CXR-JPG folder {root} does not exist")
    labeler = spec.options.get("labeler", "chexpert")
    if labeler not in ("chexpert", "negbio"):
        raise MeddiffError(f"labeler= must be chexpert or negbio, got {labeler!r}")
    split = spec.options.get("split", "train")
    if split not in ("train", "validate", "test"):
        raise MeddiffError(f"split= must be train, validate or test (the official MIMIC splits), got {split!r}")
    prompts = spec.options.get("prompts", "labels")
    if prompts not in ("labels", "report"):
        raise MeddiffError(f"prompts= must be labels or report, got {prompts!r}")
    names = parse_label_subset(spec.options.get("labels"), list(CHEXPERT_OBSERVATIONS))
    meta = _open_table(root, "metadata")
    _require(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), "metadata")
    labels = _open_table(root, labeler)
    _require(labels, ("subject_id", "study_id", *names), labeler)
    splits = _open_table(root, "split")
    _require(splits, ("dicom_id", "split"), "split")
    split_of = {r["dicom_id"]: r["split"] for r in splits}
    by_study = {}
    for line, row in enumerate(labels, start=2):
        try:
            by_study[row["study_id"]] = {n: parse_value(row.get(n) or "") for n in names}
        except ValueError as exc:
            raise MeddiffError(f"{PREFIX}-{labeler}.csv line {line}: {exc}") from None
    views = spec.options.get("view", "PA,AP")
    wanted_views = None if views.lower() == "all" else {v.strip().upper() for v in views.split(",")}
    reports_root = Path(spec.options.get("reports", root)).expanduser()
    wanted = parse_attributes(spec.options.get("demographics"))
    patients_path = _patients_file(root, spec.options.get("patients"))
    if {"sex", "age"} & set(wanted) and patients_path is None:
        raise MeddiffError(
            "MIMIC-CXR-JPG has no sex or age: add patients=FILE (MIMIC-IV's hosp/patients.csv.gz) to use "
            "demographics=sex/age, or keep demographics=view"
        )
    patients = read_patients(patients_path) if patients_path is not None else {}
    records = []
    for row in meta:
        subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        gender, age = "", None
        if (known := patients.get(subject.strip())) is not None:
            gender, anchor_age, anchor_year = known
            age = age_at_study(anchor_age, anchor_year, row.get("StudyDate", ""))
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        text = report_text(reports_root / folder / f"s{study}.txt") if prompts == "report" else None
        records.append(
            Record(
                path=root / folder / f"s{study}" / f"{dicom}.jpg",
                values=by_study.get(study, {n: None for n in names}),
                patient=subject,
                study=study,
                view=(row.get("ViewPosition") or "").upper(),
                frontal=(row.get("ViewPosition") or "").upper() in ("PA", "AP"),
                sex=gender,
                age=age,
                text=text,
                split=split_of.get(dicom),
            )
        )
    table = RecordTable(records, names, str(spec))
    if patients_path is not None:
        matched = sum(r.patient.strip() in patients for r in records)  # keyed as looked up: stripped
        table.notes.append(f"sex and age from {patients_path.name}: {matched} of {len(records)} images' subjects found")
    table = table.filtered(lambda r: r.study in by_study, f"studies with {labeler} labels")
    table = table.filtered(lambda r: r.split == split, f"official split {split!r}")
    if wanted_views is not None:
        table = table.filtered(lambda r: r.view in wanted_views, f"view={views}")
    return table


def plan_mimic(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    return MaterializePlan(index_mimic(spec), policy_from(spec), Preprocess.from_options(spec.options, resolution))


@register("mimic", heldout_split="test", options=OPTIONS, index=index_mimic, plan=plan_mimic)
def load_mimic(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    return plan_mimic(spec, resolution).materialize(str(spec))
