"""The index layer between a dataset's own layout and the images meddiff trains on.

Every loader of a file-based dataset (CheXpert, MIMIC, class folders, CSV, phantom folders) first turns the
public layout into a RecordTable: one Record per image with its raw label values (1 / 0 / -1 / blank exactly
as the source has them) and metadata. Label policies, filters, splits and prompts are then applied the same
way for every kind, and `meddiff data inspect` reads the same table."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiff.data.demographics import ALL_LABELS as DEMOGRAPHIC_LABELS
from meddiff.errors import MeddiffError


@dataclass
class Record:
    path: Path
    values: dict[str, float | None]  # raw label values: 1, 0, -1 (uncertain) or None (blank)
    patient: str = ""
    study: str = ""
    view: str = ""  # PA, AP, LATERAL, LL, ... ("" if unknown)
    frontal: bool | None = None
    sex: str = ""
    age: float | None = None
    text: str | None = None  # free-text prompt (report section, CSV column)
    slice_index: int | None = None  # for slices of volumes
    slice_axis: int = 2
    split: str | None = None  # split given by the source (official split files, split folders)


@dataclass
class RecordTable:
    records: list[Record]
    label_names: list[str]
    source: str
    notes: list[str] = field(default_factory=list)  # what filtering did, for reports

    def filtered(self, keep, what: str) -> RecordTable:
        """Keep records where keep(record); an empty result is an error naming the filter."""
        before = len(self.records)
        kept = [r for r in self.records if keep(r)]
        if before and not kept:
            raise MeddiffError(f"{self.source}: no images left after filtering by {what} (had {before})")
        return RecordTable(kept, self.label_names, self.source, self.notes + [f"{what}: {before} -> {len(kept)}"])


@dataclass(frozen=True)
class LabelPolicy:
    uncertain: str = "ones"  # ones | zeros | ignore  (-1 values)
    blank: str = "zeros"  # zeros | ignore           (not mentioned)

    def __post_init__(self):
        if self.uncertain not in ("ones", "zeros", "ignore"):
            raise MeddiffError(f"u= must be ones, zeros or ignore, got {self.uncertain!r}")
        if self.blank not in ("zeros", "ignore"):
            raise MeddiffError(f"blank= must be zeros or ignore, got {self.blank!r}")

    def apply(self, records: list[Record], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw values -> (labels, known) arrays of shape (N, K)."""
        labels = np.zeros((len(records), len(names)), np.float32)
        known = np.zeros_like(labels, dtype=bool)
        for i, rec in enumerate(records):
            for k, name in enumerate(names):
                v = rec.values.get(name)
                if v is None:
                    if self.blank == "zeros" and name not in DEMOGRAPHIC_LABELS:  # a missing age is not "absent"
                        known[i, k] = True
                elif v < 0:
                    if self.uncertain != "ignore":
                        labels[i, k], known[i, k] = float(self.uncertain == "ones"), True
                else:
                    labels[i, k], known[i, k] = float(v > 0.5), True
        return labels, known


def dicom_patient_ids(table: RecordTable) -> RecordTable:
    """DICOM files (by suffix, or no suffix and the DICM magic) get the PatientID of their header as patient id,
    as a keyed pseudonym (meddiff.data.pseudonyms: HMAC with this site's secret, so the id itself never reaches
    records, splits or stores, and cannot be recovered by hashing candidate MRNs), so splits and the privacy
    calibration are patient-level. Files without a PatientID, or unreadable ones (counted later, when decoded), keep
    the id they had. Noted in the table."""
    from meddiff.data.io import DICOM_SUFFIXES, is_dicom
    from meddiff.data.pseudonyms import key_fingerprint, pseudonym

    found = 0
    for record in table.records:
        suffix = Path(record.path).suffix.lower()
        if not (suffix in DICOM_SUFFIXES or (suffix == "" and is_dicom(record.path))):
            continue
        try:
            import pydicom

            header = pydicom.dcmread(record.path, stop_before_pixels=True, specific_tags=["PatientID"])
        except Exception:  # noqa: BLE001  # pydicom raises many types; the decoder reports the file
            continue
        patient_id = str(getattr(header, "PatientID", "") or "").strip()
        if patient_id:
            record.patient = pseudonym("dicom", patient_id)
            found += 1
    if found:
        table.notes.append(
            f"patient ids from the DICOM PatientID (keyed pseudonyms, key {key_fingerprint()}: splits follow the "
            f"key): {found} files"
        )
    return table


def patient_fraction(patient: str, seed: int = 0) -> float:
    """A stable number in [0, 1) per patient: the basis of patient-level splits."""
    digest = hashlib.sha1(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_patient(
    table: RecordTable, split: str, val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> RecordTable:
    """train / val / test by a hash of the patient id: one patient never lands in two splits."""

    def which(r: Record) -> str:
        f = patient_fraction(r.patient or str(r.path), seed)
        if f < test_fraction:
            return "test"
        if f < test_fraction + val_fraction:
            return "val"
        return "train"

    kept = {id(r) for r in table.records if which(r) == split}  # each record hashed once
    if table.records and not kept:
        patients = len({r.patient or str(r.path) for r in table.records})
        raise MeddiffError(
            f"{table.source}: the patient split {split!r} is empty ({len(table.records)} images of {patients} "
            f"patients; each patient falls in a split by a hash, so few patients can leave a split empty): use "
            f"another seed= or a larger fraction"
        )
    return table.filtered(lambda r: id(r) in kept, f"patient split {split!r}")


def parse_label_subset(text: str | None, available: list[str]) -> list[str]:
    if not text:
        return available
    lookup = {name.lower(): name for name in available}
    chosen = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() not in lookup:
            raise MeddiffError(f"labels=: unknown label {part!r}; available: {', '.join(available)}")
        chosen.append(lookup[part.lower()])
    return chosen
