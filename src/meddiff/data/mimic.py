"""`mimic:ROOT` — MIMIC-CXR-JPG 2.0.0 as released: `files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg` joined with
`mimic-cxr-2.0.0-metadata.csv`, `-chexpert.csv` or `-negbio.csv`, and `-split.csv` (plain or .gz).

Options: split=train|validate|test (official), labeler=chexpert|negbio, view=PA,AP (ViewPosition values or
'all'), u=, blank=, labels=, prompts=labels|report (report: the impression section of
files/pXX/pSUBJECT/sSTUDY.txt, else findings; falls back to labels where no report), reports=DIR (where the
report tree lives, default ROOT), plus the common fit/cache/prompt options."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

from meddiff.data.chexpert import policy_from
from meddiff.data.chexpert_format import CHEXPERT_OBSERVATIONS, parse_value
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.demographics import demographic_labels
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.records import Record, RecordTable, parse_label_subset
from meddiff.data.registry import DatasetSpec, register
from meddiff.errors import MeddiffError

PREFIX = "mimic-cxr-2.0.0"
OPTIONS = ("split", "labeler", "view", "u", "blank", "labels", "prompts", "reports") + COMMON_OPTIONS


def _open_table(root: Path, suffix: str) -> list[dict[str, str]]:
    for path in (root / f"{PREFIX}-{suffix}.csv", root / f"{PREFIX}-{suffix}.csv.gz"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", newline="") as f:
                return list(csv.DictReader(f))
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
    records = []
    for row in meta:
        subject, study, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
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
                text=text,
                split=split_of.get(dicom),
            )
        )
    table = RecordTable(records, names, str(spec))
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
