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
