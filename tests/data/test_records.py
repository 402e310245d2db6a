"""meddiff.data.records: label policies on raw values, filtering, patient-level splits, label subsets."""

from pathlib import Path

import numpy as np
import pytest

from meddiff.data.records import (
    LabelPolicy,
    Record,
    RecordTable,
    parse_label_subset,
    patient_fraction,
    split_by_patient,
)
from meddiff.errors import MeddiffError

NAMES = ["A", "B", "C", "D"]


def record(values, patient="", **kw):
    return Record(path=Path(f"{patient or 'x'}.png"), values=values, patient=patient, **kw)


@pytest.fixture
def raw():
    """One record with each raw value: A present, B absent, C uncertain, D blank (not mentioned)."""
    return [record({"A": 1.0, "B": 0.0, "C": -1.0, "D": None}), record({"A": 0.0})]


@pytest.mark.parametrize(
    "uncertain, blank, labels, known",
    [
        ("ones", "zeros", [1, 0, 1, 0], [1, 1, 1, 1]),
        ("zeros", "zeros", [1, 0, 0, 0], [1, 1, 1, 1]),
        ("ignore", "zeros", [1, 0, 0, 0], [1, 1, 0, 1]),
        ("ones", "ignore", [1, 0, 1, 0], [1, 1, 1, 0]),
        ("ignore", "ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ],
)
def test_label_policy_applies_each_rule(raw, uncertain, blank, labels, known):
    got_labels, got_known = LabelPolicy(uncertain, blank).apply(raw, NAMES)
    assert got_labels.dtype == np.float32 and got_labels.shape == (2, 4) and got_known.dtype == bool
    assert got_labels[0].tolist() == labels and got_known[0].astype(int).tolist() == known
    # the second record names only A: the other labels are blank (missing from the dict)
    assert got_labels[1].tolist() == [0, 0, 0, 0]
    assert got_known[1].tolist() == [True] + [blank == "zeros"] * 3


def test_label_values_are_thresholded(raw):
    labels, _ = LabelPolicy().apply([record({"A": 0.7, "B": 0.3})], ["A", "B"])
    assert labels.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"uncertain": "maybe"}, "u= must be ones, zeros or ignore"),
        ({"blank": "ones"}, "blank= must be zeros or ignore"),
    ],
)
def test_bad_policy_is_one_line(kwargs, message):
    with pytest.raises(MeddiffError, match=message):
        LabelPolicy(**kwargs)


def test_filtered_keeps_notes_and_refuses_an_empty_result():
    table = RecordTable([record({}, view="PA"), record({}, view="AP"), record({}, view="PA")], NAMES, "src")
    pa = table.filtered(lambda r: r.view == "PA", "view PA")
    assert len(pa.records) == 2 and pa.notes == ["view PA: 3 -> 2"] and pa.label_names == NAMES
    assert table.notes == []  # the original is not changed
    with pytest.raises(MeddiffError, match=r"src: no images left after filtering by view LL \(had 2\)"):
        pa.filtered(lambda r: r.view == "LL", "view LL")
    empty = RecordTable([], NAMES, "src")
    assert empty.filtered(lambda r: False, "anything").records == []  # nothing to lose, nothing to report


def test_patient_split_is_disjoint_complete_and_stable():
    records = [record({}, patient=f"p{i // 3}") for i in range(300)]  # 100 patients, 3 images each
    table = RecordTable(records, NAMES, "src")
    parts = {
        s: split_by_patient(table, s, val_fraction=0.2, test_fraction=0.1, seed=4) for s in ("train", "val", "test")
    }
    patients = {s: {r.patient for r in t.records} for s, t in parts.items()}
    assert sum(len(t.records) for t in parts.values()) == 300
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert 50 <= len(patients["train"]) <= 90 and len(patients["val"]) >= 8 and len(patients["test"]) >= 3
    again = split_by_patient(table, "val", val_fraction=0.2, test_fraction=0.1, seed=4)
    assert [r.patient for r in again.records] == [r.patient for r in parts["val"].records]
    other_seed = split_by_patient(table, "val", val_fraction=0.2, test_fraction=0.1, seed=5)
    assert {r.patient for r in other_seed.records} != patients["val"]


def test_patient_fraction_is_uniform_ish_and_in_range():
    values = [patient_fraction(f"patient-{i}") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < float(np.mean(values)) < 0.55
    assert patient_fraction("x", 0) == patient_fraction("x", 0) != patient_fraction("x", 1)


def test_records_without_patient_split_by_path():
    table = RecordTable([record({}) for _ in range(5)], NAMES, "src")  # no patient id, one path: one split
    home, away = ("val", "train") if patient_fraction("x.png") < 0.5 else ("train", "val")
    assert len(split_by_patient(table, home, val_fraction=0.5).records) == 5
    with pytest.raises(MeddiffError, match=f"patient split '{away}' is empty \\(5 images of 1 patients.*another seed="):
        split_by_patient(table, away, val_fraction=0.5)


def test_parse_label_subset():
    assert parse_label_subset(None, NAMES) == NAMES
    assert parse_label_subset("", NAMES) == NAMES
    assert parse_label_subset("c, a,,", NAMES) == ["C", "A"]  # case-insensitive, order kept, empties skipped
    with pytest.raises(MeddiffError, match="labels=: unknown label 'E'; available: A, B, C, D"):
        parse_label_subset("A,E", NAMES)
