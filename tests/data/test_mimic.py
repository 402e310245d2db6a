import pytest

from meddiff.data.mimic import index_mimic, report_text
from meddiff.data.spec import load_dataset, parse_spec
from meddiff.errors import MeddiffError
from tests.data.fixtures import mimic_jpg


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    return mimic_jpg(tmp_path_factory.mktemp("mimic"))


def test_official_splits_and_views(mimic):
    train = index_mimic(parse_spec(f"mimic:{mimic}"))
    assert len(train.records) == 8 and all(r.view in ("PA", "AP") for r in train.records)
    assert all(r.path.is_file() and r.path.parent.name == f"s{r.study}" for r in train.records)
    assert len(index_mimic(parse_spec(f"mimic:{mimic}?split=validate")).records) == 2
    test = index_mimic(parse_spec(f"mimic:{mimic}?split=test&view=all"))
    assert len(test.records) == 4
    assert {r.patient for r in train.records}.isdisjoint({r.patient for r in test.records})
    with pytest.raises(MeddiffError, match="no images left after filtering by view=LL"):
        index_mimic(parse_spec(f"mimic:{mimic}?view=LL"))


def test_labels_join_by_study_and_uncertain(mimic):
    ds = load_dataset(f"mimic:{mimic}?labels=Cardiomegaly,Edema&u=ignore", 32)
    table = index_mimic(parse_spec(f"mimic:{mimic}?labels=Cardiomegaly,Edema&u=ignore"))
    for i, rec in enumerate(table.records):
        assert ds.labels[i, 0] == rec.values["Cardiomegaly"]
        assert bool(ds.known[i, 1]) == (rec.values["Edema"] != -1)
    assert len(load_dataset(f"mimic:{mimic}?labeler=negbio", 32)) == 8


def test_report_prompts(mimic):
    ds = load_dataset(f"mimic:{mimic}?prompts=report", 32)
    assert set(ds.prompts) <= {"Cardiomegaly.", "No acute cardiopulmonary process."}
    assert len(set(ds.prompts)) == 2


def test_report_sections(tmp_path):
    p = tmp_path / "r.txt"
    p.write_text("FINDINGS: Small left effusion.\n\nIMPRESSION:\n  Left pleural effusion.\n  No pneumothorax.\n")
    assert report_text(p) == "Left pleural effusion. No pneumothorax."
    p.write_text("FINDINGS: Heart size is enlarged.\n")
    assert report_text(p) == "Heart size is enlarged."
    assert report_text(tmp_path / "none.txt") is None


def test_missing_tables_and_columns(tmp_path, mimic):
    with pytest.raises(MeddiffError, match="lacks mimic-cxr-2.0.0-metadata.csv"):
        index_mimic(parse_spec(f"mimic:{tmp_path}"))
    with pytest.raises(MeddiffError, match="split= must be train, validate or test"):
        index_mimic(parse_spec(f"mimic:{mimic}?split=valid"))


def _patients(path, rows):
    import csv
    import gzip

    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"])
        w.writerows(rows)
    return path


def test_demographics_join_mimic_iv_patients_with_age_at_the_study(tmp_path, mimic):
    from meddiff.data.mimic import age_at_study

    assert age_at_study(60, 2178, "21800101") == 62 and age_at_study(60, 2178, "") is None
    table = _patients(
        tmp_path / "patients.csv.gz",
        # 11000011 is absent: its images' sex and age stay unknown, never "male" or "young"
        [[10000032, "F", 60, 2178, "2014 - 2016", ""], [10000764, "M", 30, 2180, "2017 - 2019", ""],
         [12000123, "M", 85, 2175, "2008 - 2010", ""]],
    )  # fmt: skip
    spec = f"mimic:{mimic}?labels=Cardiomegaly&demographics=sex,age,view&patients={table}"
    index = index_mimic(parse_spec(spec))
    assert any("sex and age from patients.csv.gz" in n for n in index.notes)
    by_subject = {r.patient: r for r in index.records}
    assert by_subject["10000032"].sex == "F" and by_subject["10000032"].age == 62
    assert by_subject["12000123"].age == 90 and by_subject["11000011"].age is None
    ds = load_dataset(spec, 32)
    names = list(ds.label_names)
    assert {"Female", "Age 60-79", "Age 18-39", "Age 80+", "View PA"} <= set(names)
    for i, patient in enumerate(ds.patients):
        female, old = names.index("Female"), names.index("Age 60-79")
        if patient == "10000032":
            assert ds.known[i, female] and ds.labels[i, female] == 1 and ds.labels[i, old] == 1
        elif patient == "10000764":
            assert ds.known[i, female] and ds.labels[i, female] == 0 and ds.labels[i, names.index("Age 18-39")] == 1
        elif patient == "11000011":
            assert not ds.known[i, female] and not ds.known[i, old]


def test_demographics_without_a_patients_table_or_with_a_bad_one_is_one_line(tmp_path, mimic):
    with pytest.raises(MeddiffError, match="MIMIC-CXR-JPG has no sex or age: add patients=FILE"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=sex"))
    assert index_mimic(parse_spec(f"mimic:{mimic}?demographics=view")).records  # view needs no table
    with pytest.raises(MeddiffError, match="does not exist"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=age&patients={tmp_path / 'nope.csv'}"))
    bad = tmp_path / "bad.csv.gz"
    _patients(bad, [[10000032, "F", "sixty", 2178, "", ""]])
    with pytest.raises(MeddiffError, match="line 2: anchor_age 'sixty'"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=age&patients={bad}"))
    short = tmp_path / "short.csv"
    short.write_text("subject_id,gender,anchor_age,anchor_year\n10000032,F\n")
    with pytest.raises(MeddiffError, match="line 2: .*short"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=Age&patients={short}"))
    with pytest.raises(MeddiffError, match="no sex or age"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=Sex"))
    (tmp_path / "cols.csv").write_text("subject_id,sex\n1,F\n")
    with pytest.raises(MeddiffError, match="lacks column"):
        index_mimic(parse_spec(f"mimic:{mimic}?demographics=age&patients={tmp_path / 'cols.csv'}"))
