"""Patient identity reaches the dataset (CheXpert paths, CSV patient_col, phantom repeat studies), held-out
phantom patients are disjoint from training ones, and repeat studies share the person but not the study."""

import numpy as np
import pytest

from meddiff.data.phantom import render_phantom
from meddiff.data.phantom_dataset import write_phantom_folder
from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from tests.data.fixtures import chexpert_small


def test_chexpert_patients_reach_the_dataset(tmp_path):
    root = chexpert_small(tmp_path)
    ds = load_dataset(f"chexpert:{root}?val_fraction=0&view=all", 32)
    assert len(ds.patients) == len(ds) and ds.patients[0].startswith("patient")
    assert len(set(ds.patients)) < len(ds)  # patient 1 has two studies, 2 and 5 a lateral view


def test_repeat_studies_are_the_same_person_in_another_study():
    a, b = render_phantom(1, 64, patient=77), render_phantom(2, 64, patient=77)
    other = render_phantom(3, 64, patient=78)
    assert (a.meta["sex"], a.meta["age"]) == (b.meta["sex"], b.meta["age"])
    assert a.meta["ctr"] == b.meta["ctr"] or a.findings["Cardiomegaly"] != b.findings["Cardiomegaly"]
    same = np.corrcoef(a.masks["lungs"].ravel(), b.masks["lungs"].ravel())[0, 1]
    different = np.corrcoef(a.masks["lungs"].ravel(), other.masks["lungs"].ravel())[0, 1]
    assert same > different  # the same thorax, up to positioning
    assert not np.array_equal(a.image, b.image)


def test_phantom_folders_with_studies_keep_patients_whole(tmp_path):
    counts = write_phantom_folder(tmp_path, n=40, size=32, seed=0, studies=4, progress=False)
    assert counts == {"train": 32, "valid": 8}
    train = load_dataset(f"phantom:{tmp_path}", 32)
    valid = load_dataset(f"phantom:{tmp_path}?split=valid", 32)
    assert len(set(train.patients)) == 8 and len(set(valid.patients)) == 2
    assert not set(train.patients) & set(valid.patients)  # patient-disjoint
    with pytest.raises(MeddiffError, match="leaves no training patient"):
        write_phantom_folder(tmp_path / "x", n=4, size=32, seed=0, studies=4, progress=False)


def test_calibration_halves_split_by_patient():
    from meddiff.evaluation.privacy_gate import split_parts

    patients = [f"p{i // 3}" for i in range(30)]
    first, how = split_parts(patients, 30)
    assert how == "by patient (10 patients)" and first.sum() == 15
    assert not {patients[i] for i in np.flatnonzero(first)} & {patients[i] for i in np.flatnonzero(~first)}
    first, how = split_parts([], 10)
    assert how.startswith("by image") and first.sum() == 5
