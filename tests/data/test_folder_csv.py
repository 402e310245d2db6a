import csv

import numpy as np
import pytest

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from tests.data.fixtures import class_folders, dicom_file, nifti_volume, phantom_png


def test_class_folders_with_split_folders(tmp_path):
    root = class_folders(tmp_path / "adni", split_folders=True)
    train = load_dataset(f"folder:{root}?subject=brain MRI", 32)
    assert train.label_names == ["AD", "NC"] and len(train) == 12 and train.multiclass
    assert train.labels.sum(1).eq(1).all()
    assert train.prompts[0] == "brain MRI with ad"
    assert len(load_dataset(f"folder:{root}?split=test", 32)) == 4
    assert load_dataset(f"folder:{root}?classes=NC,AD", 32).label_names == ["NC", "AD"]
    with pytest.raises(MeddiffError, match="unknown class"):
        load_dataset(f"folder:{root}?classes=MCI", 32)


def test_class_folders_without_split_folders_split_stably(tmp_path):
    root = class_folders(tmp_path / "fundus", split_folders=False, classes=("NRG", "RG"), per_class=10)
    (root / "RG" / "notes.txt").write_text("not an image")
    parts = {
        s: load_dataset(f"folder:{root}?split={s}&val_fraction=0.2&test_fraction=0.2", 32)
        for s in ("train", "val", "test")
    }
    total = sum(len(d) + d.skipped for d in parts.values())
    assert total == 21 and sum(d.skipped for d in parts.values()) == 1
    assert len(load_dataset(f"folder:{root}?split=all", 32)) == 20
    (tmp_path / "flat").mkdir()
    with pytest.raises(MeddiffError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path / 'flat'}", 32)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_generic_csv_labels_prompts_and_errors(tmp_path):
    rows = []
    for i in range(10):
        phantom_png(tmp_path / "img" / f"{i}.png", i)
        rows.append(
            {
                "image": f"img/{i}.png",
                "Cardiomegaly": i % 2,
                "Effusion": "" if i % 3 else "-1",
                "report": f"report {i}",
                "site": f"s{i}",
                "patient": f"p{i // 2}",
            }
        )
    write_csv(tmp_path / "t.csv", rows)
    ds = load_dataset(f"csv:{tmp_path / 't.csv'}?split=all&u=zeros", 32)
    assert ds.label_names == ["Cardiomegaly", "Effusion"] and len(ds) == 10
    with_prompt = load_dataset(f"csv:{tmp_path / 't.csv'}?split=all&prompt_col=report", 32)
    assert with_prompt.prompts[3] == "report 3"
    parts = [
        load_dataset(f"csv:{tmp_path / 't.csv'}?patient_col=patient&split={s}&val_fraction=0.3&test_fraction=0.3", 32)
        for s in ("train", "val", "test")
    ]
    assert sum(len(p) for p in parts) == 10
    with pytest.raises(MeddiffError, match="no path column"):
        load_dataset(f"csv:{tmp_path / 't.csv'}?path_col=file", 32)
    write_csv(tmp_path / "nolabels.csv", [{"image": "img/0.png", "site": "a"}])
    with pytest.raises(MeddiffError, match="no label columns"):
        load_dataset(f"csv:{tmp_path / 'nolabels.csv'}", 32)
    with pytest.raises(MeddiffError, match="label_cols: Edema not in"):
        load_dataset(f"csv:{tmp_path / 't.csv'}?label_cols=Edema", 32)


def test_csv_with_dicom_and_nifti(tmp_path):
    px = (np.arange(32 * 32).reshape(32, 32) % 4000).astype(np.uint16)
    dicom_file(tmp_path / "a.dcm", px, "MONOCHROME1", slope=2.0, intercept=-10.0)
    dicom_file(tmp_path / "multi.dcm", px, frames=3)
    nifti_volume(tmp_path / "vol.nii.gz", shape=(32, 32, 6))
    write_csv(
        tmp_path / "t.csv",
        [{"path": "a.dcm", "AD": 1}, {"path": "multi.dcm", "AD": 0}, {"path": "vol.nii.gz", "AD": 0}],
    )
    ds = load_dataset(f"csv:{tmp_path / 't.csv'}?split=all&slices=1:5", 32)
    assert len(ds) == 1 + 4 and ds.skipped == 1
    assert "multi-frame" in ds.problems[0][1]


def test_dicom_patient_ids_are_hashed_and_keep_patients_in_one_split(tmp_path):
    px = (np.arange(32 * 32).reshape(32, 32) % 4000).astype(np.uint16)
    for p in range(6):
        for k in range(2):
            dicom_file(
                tmp_path / ("AD" if p % 2 else "NC") / f"p{p}_{k}.dcm", px + 10 * p + k, patient_id=f"MRN{p:04d}"
            )
    dicom_file(tmp_path / "NC" / "anonymous.dcm", px)  # no PatientID: keeps its path as the id
    everything = load_dataset(f"folder:{tmp_path}?split=all", 32)
    ids = list(everything.patients)
    assert len(ids) == 13 and len(set(ids)) == 7
    assert all(i.startswith("dicom-") and "MRN" not in i for i in ids if i != "NC/anonymous.dcm")
    spec = f"folder:{tmp_path}?val_fraction=0&test_fraction=0.5&seed=3"
    train, test = load_dataset(spec, 32), load_dataset(spec + "&split=test", 32)
    assert len(train) + len(test) == 13 and not set(train.patients) & set(test.patients)
