"""Builders of small datasets in the exact public layouts, for tests."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from meddiff.data.chexpert_format import CHEXPERT_COLUMNS, CHEXPERT_OBSERVATIONS
from meddiff.data.phantom import render_phantom


def phantom_png(path: Path, seed: int, size: int = 40, findings=None, mode: str = "L", shape=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = render_phantom(seed, size, findings).image
    if shape is not None:  # non-square
        img = np.asarray(Image.fromarray(img, "F").resize(shape))
    arr = np.round(img * 255).astype(np.uint8)
    if mode == "RGB":
        Image.fromarray(np.stack([arr] * 3, -1)).save(path)
    elif mode == "I;16":
        Image.fromarray((img * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray(arr).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)
    return img


def chexpert_small(root: Path) -> Path:
    """CheXpert-v1.0-small/ with train.csv and valid.csv, real column names and awkward rows:
    uncertain labels, blanks, lateral views, one patient with several studies, a missing and a corrupt file."""
    rel = root / "CheXpert-v1.0-small"
    rows_train, rows_valid = [], []

    def row(path, sex, age, fl, apa, **labels):
        r = {"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": fl, "AP/PA": apa}
        for name in CHEXPERT_OBSERVATIONS:
            v = labels.get(name.replace(" ", "_"), "")
            r[name] = "" if v == "" else f"{float(v):.1f}"
        return r

    for p in range(1, 13):
        for s in (1, 2) if p == 1 else (1,):  # patient 1 has two studies
            base = f"CheXpert-v1.0-small/train/patient{p:05d}/study{s}"
            cardio = p % 3 == 0
            effusion = -1 if p % 4 == 1 else (1 if p % 2 == 0 else 0)
            phantom_png(
                root / base / "view1_frontal.jpg",
                p * 10 + s,
                findings={"Cardiomegaly": int(cardio), "Pleural Effusion": int(effusion == 1)},
            )
            rows_train.append(
                row(
                    f"{base}/view1_frontal.jpg",
                    "Female" if p % 2 else "Male",
                    40 + p,
                    "Frontal",
                    "AP" if p % 2 else "PA",
                    Cardiomegaly=int(cardio),
                    Pleural_Effusion=effusion,
                    No_Finding=1 if not cardio and effusion == 0 else "",
                    Edema="" if p % 5 else -1,
                    Support_Devices=1 if p == 7 else "",
                )
            )
            if p in (2, 5):
                phantom_png(root / base / "view2_lateral.jpg", p * 10 + 5)
                rows_train.append(
                    row(f"{base}/view2_lateral.jpg", "Male", 40 + p, "Lateral", "", Cardiomegaly=int(cardio))
                )
    rows_train.append(
        row(
            "CheXpert-v1.0-small/train/patient00013/study1/view1_frontal.jpg",
            "Male",
            70,
            "Frontal",
            "PA",
            Cardiomegaly=1,
        )
    )  # missing file
    corrupt = root / "CheXpert-v1.0-small/train/patient00014/study1/view1_frontal.jpg"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    rows_train.append(row(str(corrupt.relative_to(root)), "Female", 30, "Frontal", "PA", Edema=1))
    for p in range(64541, 64545):
        base = f"CheXpert-v1.0-small/valid/patient{p}/study1"
        phantom_png(root / base / "view1_frontal.jpg", p, findings={"Cardiomegaly": p % 2})
        rows_valid.append(
            row(f"{base}/view1_frontal.jpg", "Male", 60, "Frontal", "PA", Cardiomegaly=p % 2, No_Finding=1 - p % 2)
        )
    for name, rows in (("train.csv", rows_train), ("valid.csv", rows_valid)):
        with open(rel / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CHEXPERT_COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return rel


def mimic_jpg(root: Path, gz: bool = True) -> Path:
    """MIMIC-CXR-JPG 2.0.0 layout: files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg and the four CSVs, plus reports."""
    root.mkdir(parents=True, exist_ok=True)
    meta, labels, splits = [], [], []
    k = 0
    for subj in (10000032, 10000764, 11000011, 12000123, 13000456, 14000789):
        for study in (50000001 + subj % 97, 50000002 + subj % 97):
            lab = {n: "" for n in CHEXPERT_OBSERVATIONS}
            cardio = (subj + study) % 2
            lab["Cardiomegaly"] = f"{float(cardio):.1f}"
            lab["Edema"] = "-1.0" if study % 3 == 0 else ""
            if not cardio:
                lab["No Finding"] = "1.0"
            labels.append({"subject_id": subj, "study_id": study, **lab})
            split = "test" if subj == 14000789 else ("validate" if subj == 13000456 else "train")
            folder = root / "files" / f"p{str(subj)[:2]}" / f"p{subj}"
            (folder / f"s{study}").mkdir(parents=True, exist_ok=True)
            (folder / f"s{study}.txt").write_text(
                "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n FINDINGS: Lungs are clear.\n\n"
                f" IMPRESSION: {'Cardiomegaly.' if cardio else 'No acute cardiopulmonary process.'}\n"
            )
            for view in ("PA", "LATERAL"):
                k += 1
                dicom = f"{k:08x}-abcdef01-23456789-abcdef01-23456789"
                phantom_png(folder / f"s{study}" / f"{dicom}.jpg", k, findings={"Cardiomegaly": cardio})
                meta.append(
                    {
                        "dicom_id": dicom,
                        "subject_id": subj,
                        "study_id": study,
                        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                        "ViewPosition": view,
                        "Rows": 40,
                        "Columns": 40,
                        "StudyDate": 21800101,
                        "StudyTime": 1200,
                        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                        "ViewCodeSequence_CodeMeaning": "postero-anterior",
                        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
                    }
                )
                splits.append({"dicom_id": dicom, "study_id": study, "subject_id": subj, "split": split})

    def write(name, rows):
        path = root / (f"mimic-cxr-2.0.0-{name}.csv" + (".gz" if gz else ""))
        opener = gzip.open if gz else open
        with opener(path, "wt", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write("metadata", meta)
    write("chexpert", labels)
    write("negbio", labels)
    write("split", splits)
    return root


def class_folders(root: Path, split_folders: bool, classes=("AD", "NC"), per_class: int = 6) -> Path:
    for s_i, split in enumerate(("train", "val", "test") if split_folders else ("",)):
        for c_i, cls in enumerate(classes):
            for i in range(per_class if split in ("", "train") else 2):
                phantom_png(
                    root / split / cls / f"img_{i}.png",
                    1000 * s_i + 100 * c_i + i,
                    findings={"Cardiomegaly": int(c_i == 0)},
                )
    return root


def dicom_file(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | None = None,
    frames: int = 1,
    patient_id: str | None = None,
) -> Path:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if patient_id is not None:
        ds.PatientID = patient_id
    arr = np.asarray(pixels, np.uint16)
    if frames > 1:
        arr = np.stack([arr] * frames)
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def nifti_volume(path: Path, shape=(32, 32, 10)) -> np.ndarray:
    import nibabel as nib

    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, shape).astype(np.float32)
    vol[8:24, 8:24, :] += np.arange(shape[2])[None, None, :] * 10
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return vol
