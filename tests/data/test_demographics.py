"""demographics=sex,age,view: label groups from record metadata (CheXpert, CSV, phantoms), unknown where missing,
the same columns in every split, and one-line errors for what a dataset lacks."""

import csv

import pytest

from meddiff.data.demographics import AGE_LABELS, VIEW_LABELS, age_bin, parse_attributes, values_for
from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from tests.data.fixtures import chexpert_small, phantom_png


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return chexpert_small(tmp_path_factory.mktemp("cx"))


def column(ds, name):
    k = ds.label_names.index(name)
    return ds.labels[:, k].tolist(), ds.known[:, k].tolist()


def test_values_are_one_hot_groups_and_missing_values_leave_the_group_unknown():
    v = values_for(("sex", "age", "view"), "F", 64, "PA")
    assert v["Female"] == 1.0 and v["Age 60-79"] == 1.0 and sum(v[n] for n in AGE_LABELS) == 1.0
    assert v["View PA"] == 1.0 and sum(v[n] for n in VIEW_LABELS) == 1.0
    blank = values_for(("sex", "age", "view"), "", None, "")
    assert all(value is None for value in blank.values())
    assert values_for(("sex",), "Unknown", None, "")["Female"] is None
    assert values_for(("view",), "", None, "LL")["View Lateral"] == 1.0
    assert (age_bin(17.5), age_bin(18), age_bin(39.9), age_bin(80), age_bin(101)) == (
        "Age 0-17",
        "Age 18-39",
        "Age 18-39",
        "Age 80+",
        "Age 80+",
    )
    with pytest.raises(MeddiffError, match="unknown attribute 'race'"):
        parse_attributes("sex,race")


def test_chexpert_gains_sex_age_and_view_labels(chexpert):
    ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0&view=all&labels=Cardiomegaly&demographics=sex,age,view", 32)
    assert ds.label_names[0] == "Cardiomegaly" and ds.label_names[1:] == ["Female", *AGE_LABELS, *VIEW_LABELS]
    female, known = column(ds, "Female")
    assert all(known) and 0 < sum(female) < len(female)  # the fixture alternates Female / Male
    ages, age_known = column(ds, "Age 40-59")
    assert all(age_known) and sum(ages) > 0  # ages 41-53 -> 40-59
    lateral, view_known = column(ds, "View Lateral")
    assert sum(lateral) == 2 and all(view_known)  # two lateral views in the fixture
    # the held-out split has the same columns even though its patients are all male, 60, PA
    valid = load_dataset(f"chexpert:{chexpert}?split=valid&labels=Cardiomegaly&demographics=sex,age,view", 32)
    assert valid.label_names == ds.label_names and column(valid, "Female")[0] == [0.0] * len(valid)
    assert column(valid, "Age 60-79")[0] == [1.0] * len(valid)


def test_blank_metadata_is_unknown_not_absent(tmp_path):
    for i in range(4):
        phantom_png(tmp_path / f"{i}.png", i)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Path", "Effusion", "Sex", "Age", "ViewPosition"])
        w.writeheader()
        w.writerow({"Path": "0.png", "Effusion": 1, "Sex": "F", "Age": "70", "ViewPosition": "AP"})
        w.writerow({"Path": "1.png", "Effusion": 0, "Sex": "", "Age": "", "ViewPosition": ""})
        w.writerow({"Path": "2.png", "Effusion": 0, "Sex": "M", "Age": "n/a", "ViewPosition": "PA"})
        w.writerow({"Path": "3.png", "Effusion": 1, "Sex": "M", "Age": "35", "ViewPosition": "LATERAL"})
    ds = load_dataset(f"csv:{tmp_path / 't.csv'}?split=all&demographics=sex,age,view", 32)
    assert ds.label_names[0] == "Effusion"  # the metadata columns are not findings
    assert column(ds, "Female") == ([1.0, 0.0, 0.0, 0.0], [True, False, True, True])
    assert column(ds, "Age 60-79")[1] == [True, False, False, True]  # blank and unreadable ages: unknown
    assert column(ds, "View AP")[0] == [1.0, 0.0, 0.0, 0.0] and column(ds, "View Lateral")[0][3] == 1.0


def test_a_condition_the_dataset_lacks_is_one_line(tmp_path):
    for i in range(2):
        phantom_png(tmp_path / f"{i}.png", i)
    (tmp_path / "t.csv").write_text("Path,Effusion\n0.png,1\n1.png,0\n")
    with pytest.raises(MeddiffError, match="demographics=age but no image has a age value"):
        load_dataset(f"csv:{tmp_path / 't.csv'}?split=all&demographics=age", 32)


def test_in_memory_phantoms_have_demographics_their_anatomy_shows():
    ds = load_dataset("phantom:?n=48&seed=1&demographics=sex,age,view", 32)
    assert ds.label_names[-9:] == ["Female", *AGE_LABELS, *VIEW_LABELS]
    counts = ds.positive_counts()
    assert 0 < counts["Female"] < 48 and counts["Age 0-17"] == 0 and counts["View Lateral"] == 0
    assert counts["View PA"] + counts["View AP"] == 48


def test_phantom_anatomy_depends_on_sex_age_and_view():
    import numpy as np

    from meddiff.data.phantom import render_phantom

    phantoms = [render_phantom(seed, 64) for seed in range(60)]
    women = [p for p in phantoms if p.meta["sex"] == "Female"]
    ap = [p for p in phantoms if p.meta["view"] == "AP"]
    assert women and all(p.masks["breast shadows"].max() > 0.9 for p in women)
    assert all("breast shadows" not in p.masks for p in phantoms if p.meta["sex"] == "Male")
    assert ap and all("scapulae" in p.masks for p in ap)
    ages = np.array([p.meta["age"] for p in phantoms])
    assert 18 <= ages.min() and ages.max() <= 90 and ages.std() > 10
