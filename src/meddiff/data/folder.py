"""`folder:ROOT` — one subfolder per class (ADNI AD/NC, fundus RG/NRG, normal/abnormal), optionally under
train/ val/ test/ split folders. Images may be PNG/JPEG/TIFF, DICOM or NIfTI volumes (sliced).

Options: split=train|val|test (split folders, or else a stable hash of each file's path with val_fraction and
test_fraction; split=all takes everything), classes=A,B (subset and order), subject= (prompt subject, default
"image"), axis=0|1|2 and slices=START:STOP for NIfTI volumes, plus the common fit/cache/prompt options."""

from __future__ import annotations

from pathlib import Path

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.demographics import demographic_labels
from meddiff.data.materialize import COMMON_OPTIONS, MaterializePlan, Preprocess
from meddiff.data.records import LabelPolicy, Record, RecordTable, dicom_patient_ids, split_by_patient
from meddiff.data.registry import DatasetSpec, register
from meddiff.data.volumes import VOLUME_OPTIONS, expand_volumes
from meddiff.errors import MeddiffError

SPLITS = ("train", "val", "test")
OPTIONS = ("split", "classes", "subject", "val_fraction", "test_fraction", "seed") + VOLUME_OPTIONS + COMMON_OPTIONS


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@demographic_labels
def index_folder(spec: DatasetSpec) -> RecordTable:
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise MeddiffError(f"class folder {root} does not exist or is not a folder")
    split = spec.options.get("split", "train")
    if split not in SPLITS + ("all",):
        raise MeddiffError(f"split= must be one of {', '.join(SPLITS)}, got {split!r}")
    has_split_dirs = (root / "train").is_dir()
    if has_split_dirs and split == "all":
        raise MeddiffError(f"{root} has split folders; choose split=train, val or test")
    base = root / split if has_split_dirs else root
    if has_split_dirs and not base.is_dir():
        raise MeddiffError(f"{root} has split folders but no {split}/")
    classes = [d.name for d in _class_dirs(root / "train" if has_split_dirs else root)]
    if spec.options.get("classes"):
        wanted = [c.strip() for c in spec.options["classes"].split(",") if c.strip()]
        unknown = [c for c in wanted if c not in classes]
        if unknown:
            raise MeddiffError(f"classes=: unknown class(es) {', '.join(unknown)}; found {', '.join(classes)}")
        classes = wanted
    if not classes:
        raise MeddiffError(f"{root} has no class subfolders; expected ROOT/CLASS/image files")
    records = []
    for cls in classes:
        folder = base / cls
        if not folder.is_dir():
            continue
        # every visible file becomes a record: non-image files are then counted and listed as unreadable
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            values: dict[str, float | None] = {c: float(c == cls) for c in classes}
            records.append(Record(path=path, values=values, patient=str(path.relative_to(base))))
    if not records:
        raise MeddiffError(f"no image files under {base} (looked in {', '.join(classes)})")
    table = dicom_patient_ids(RecordTable(records, classes, str(spec)))
    table = expand_volumes(table, spec.options)
    if not has_split_dirs and split != "all":
        try:
            val = float(spec.options.get("val_fraction", "0.1"))
            test = float(spec.options.get("test_fraction", "0.1"))
            seed = int(spec.options.get("seed", "0"))
        except ValueError:
            raise MeddiffError("val_fraction/test_fraction must be numbers and seed an integer") from None
        table = split_by_patient(table, split, val, test, seed)
    return table


def plan_folder(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    prep = Preprocess.from_options(spec.options, resolution, subject=spec.options.get("subject", "image"))
    return MaterializePlan(index_folder(spec), LabelPolicy(), prep, multiclass=True)


@register("folder", heldout_split="test", options=OPTIONS, index=index_folder, plan=plan_folder)
def load_folder(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    return plan_folder(spec, resolution).materialize(str(spec))
