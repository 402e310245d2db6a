"""Finding the cases of a volume dataset: a folder of NIfTI files or DICOM series folders, a CSV, a folder with
train.csv/valid.csv (meddiff's 3D phantoms), or the BraTS layout (one folder per case, one file per modality,
optionally under train/ validation/ test/ folders).

A case is a list of channel sources (NIfTI files or DICOM folders), an optional mask and the labels read from a
CSV; `modalities=flair,t1c` picks one file per modality in each case folder (a file whose name holds the
modality as a word, e.g. `Flair_subtrMeanDivStd.nii.gz`, `BraTS2021_00000_t1ce.nii.gz` for t1ce; or
`name=GLOB` for an explicit pattern), and `label_from_mask=PATTERN` names the mask file the same way."""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from meddiff.data.volume_io import is_nifti_path, nifti_stem
from meddiff.errors import MeddiffError

SPLIT_FOLDERS = {"train": ("train", "training"), "valid": ("valid", "validation", "val"), "test": ("test", "testing")}
# never labels: paths and ids, and the run columns of meddiff's own manifests (sampling.volume_export.RUN_COLUMNS),
# so that generated volumes read back with `volumes:MANIFEST.csv` carry only their labels
RESERVED_COLUMNS = {"path", "mask", "patient_id", "side", "seed", "guidance", "steps", "model"}


@dataclass
class VolumeCase:
    case_id: str
    channels: list[Path]  # one source per channel (NIfTI file or DICOM series folder)
    mask: Path | None = None
    brainmask: Path | None = None  # where z-scores and the foreground are taken (brainmask=PATTERN)
    values: dict[str, float | None] = field(default_factory=dict)  # CSV labels; None where blank
    problem: str = ""  # set when the case cannot be used (a missing modality, an ambiguous file)


def _modalities(text: str) -> list[tuple[str, str | None]]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if item:
            name, _, pattern = item.partition("=")
            out.append((name.strip(), pattern.strip() or None))
    return out


def _words(path: Path) -> list[str]:
    return [w for w in re.split(r"[_\-. ]+", nifti_stem(path).lower()) if w]


def match_file(folder: Path, name: str, pattern: str | None, exclude: tuple[Path, ...] = ()) -> Path:
    """The one NIfTI file (or DICOM subfolder) of `folder` for a modality; MeddiffError names what is wrong."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p not in exclude)
    if pattern:
        found = [p for p in entries if fnmatch.fnmatch(p.name.lower(), pattern.lower())]
    else:
        found = [p for p in entries if (is_nifti_path(p) or p.is_dir()) and name.lower() in _words(p)]
        if not found:  # a looser match: the name anywhere in the file name
            found = [p for p in entries if (is_nifti_path(p) or p.is_dir()) and name.lower() in p.name.lower()]
    if not found:
        raise MeddiffError(f"no file for {name!r} in {folder.name}/")
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4])
        raise MeddiffError(f"{len(found)} files match {name!r} in {folder.name}/ ({names}); give name=GLOB")
    return found[0]


def _match_named(folder: Path, name_or_glob: str) -> Path:
    """A file given by a name (matched like a modality) or a glob pattern (with * ? or [)."""
    is_glob = any(ch in name_or_glob for ch in "*?[")
    return match_file(folder, name_or_glob, name_or_glob if is_glob else None)


def _case_from_folder(folder: Path, modalities, mask_pattern: str | None, brain_pattern: str | None) -> VolumeCase:
    case = VolumeCase(folder.name, [])
    try:
        case.mask = _match_named(folder, mask_pattern) if mask_pattern else None
        case.brainmask = _match_named(folder, brain_pattern) if brain_pattern else None
        masks = tuple(p for p in (case.mask, case.brainmask) if p is not None)
        if modalities:
            case.channels = [match_file(folder, n, p, exclude=masks) for n, p in modalities]
        else:
            files = [p for p in sorted(folder.iterdir()) if is_nifti_path(p) and p not in masks]
            if len(files) > 1:
                raise MeddiffError(f"{folder.name}/ holds {len(files)} NIfTI files; choose with modalities=")
            case.channels = files or [folder]  # no NIfTI: a DICOM series folder
    except MeddiffError as err:
        case.problem = str(err)
    return case


def _split_base(root: Path, split: str) -> Path | None:
    for name in SPLIT_FOLDERS.get(split, ()):
        if (root / name).is_dir():
            return root / name
    return None


def _hash_fraction(text: str, seed: int) -> float:
    return int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _number(text: str) -> float | None:
    text = (text or "").strip()
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return float("nan")  # a text column (not a label)


def read_case_table(csv_path: Path, options: dict[str, str]) -> tuple[list[VolumeCase], list[str]]:
    """Cases from a CSV: a `path` column (or one column per modality), optional `mask`, `patient_id`, labels."""
    try:
        rows = list(csv.DictReader(open(csv_path, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MeddiffError(f"cannot read {csv_path}: {err}") from None
    if not rows:
        raise MeddiffError(f"{csv_path} has no rows")
    columns = list(rows[0])
    modalities = _modalities(options.get("modalities", ""))
    path_columns = [n for n, _ in modalities if n in columns] if modalities else ["path"]
    if not path_columns or any(c not in columns for c in path_columns):
        raise MeddiffError(f"{csv_path.name} needs a 'path' column (or one column per modality); has {columns}")
    if options.get("labels"):
        label_names = [c.strip() for c in options["labels"].split(",") if c.strip()]
        missing = [c for c in label_names if c not in columns]
        if missing:
            raise MeddiffError(f"labels=: {csv_path.name} has no column(s) {', '.join(missing)}")
    else:  # every numeric column that is not a path, mask or id
        label_names = [
            c
            for c in columns
            if c not in RESERVED_COLUMNS
            and c not in path_columns
            and all(not (v := _number(r[c])) or v == v for r in rows)
        ]
    base, cases = csv_path.parent, []
    for i, row in enumerate(rows):
        sources = [base / row[c].strip() for c in path_columns]
        case_id = (row.get("patient_id") or "").strip() or nifti_stem(sources[0]) or f"row{i}"
        case = VolumeCase(case_id, sources, values={n: _number(row[n]) for n in label_names})
        if "mask" in row and row["mask"].strip():
            case.mask = base / row["mask"].strip()
        if len(sources) == 1 and sources[0].is_dir() and modalities and path_columns == ["path"]:
            folder_case = _case_from_folder(sources[0], modalities, None, options.get("brainmask") or None)
            case.channels, case.problem = folder_case.channels, folder_case.problem
        cases.append(case)
    return cases, label_names


def find_cases(root: Path, options: dict[str, str]) -> tuple[list[VolumeCase], list[str]]:
    """The cases of one split (options split=train|valid|test|all) and the CSV label names."""
    split = options.get("split", "train")
    if split not in (*SPLIT_FOLDERS, "all"):
        raise MeddiffError(f"split= must be train, valid, test or all, got {split!r}")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise MeddiffError(f"{root} is a file but not a CSV; give a folder of volumes or a CSV of paths")
        return read_case_table(root, options)
    if not root.is_dir():
        raise MeddiffError(f"volume folder {root} does not exist")
    for name in SPLIT_FOLDERS.get(split, (split,)):
        if (root / f"{name}.csv").is_file():
            return read_case_table(root / f"{name}.csv", options)
    base = _split_base(root, split) or root
    has_splits = base is not root or any(_split_base(root, s) for s in SPLIT_FOLDERS)
    if has_splits and base is root:
        raise MeddiffError(f"{root} has split folders but none for split={split}")
    modalities = _modalities(options.get("modalities", ""))
    mask_pattern = options.get("label_from_mask") or None
    cases = []
    for entry in sorted(p for p in base.iterdir() if not p.name.startswith(".")):
        if entry.is_dir():
            cases.append(_case_from_folder(entry, modalities, mask_pattern, options.get("brainmask") or None))
        elif is_nifti_path(entry) and not modalities:
            if mask_pattern and (
                fnmatch.fnmatch(entry.name.lower(), mask_pattern.lower()) or mask_pattern.lower() in _words(entry)
            ):
                continue  # a mask next to its image, not a case
            cases.append(VolumeCase(nifti_stem(entry), [entry]))
    if not cases:
        raise MeddiffError(f"no NIfTI files, DICOM series or case folders under {base}")
    if not has_splits and split != "all":
        fraction = float(options.get("valid_fraction", "0.2"))
        seed = int(options.get("seed", "0"))
        in_valid = [_hash_fraction(c.case_id, seed) < fraction for c in cases]
        cases = [c for c, v in zip(cases, in_valid) if v == (split != "train")]
    return cases, []
