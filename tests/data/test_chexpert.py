import pytest

from meddiff.data.chexpert import index_chexpert
from meddiff.data.spec import load_dataset, parse_spec
from meddiff.errors import MeddiffError
from tests.data.fixtures import chexpert_small


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return chexpert_small(tmp_path_factory.mktemp("cx"))


def names_of(ds):
    return {n: i for i, n in enumerate(ds.label_names)}


def test_paths_resolve_from_release_folder_or_parent(chexpert):
    a = index_chexpert(parse_spec(f"chexpert:{chexpert}?view=all&split=valid"))
    b = index_chexpert(parse_spec(f"chexpert:{chexpert.parent}?view=all&split=valid"))
    assert [r.path for r in a.records] == [r.path for r in b.records]
    assert all(r.path.is_file() for r in a.records) and len(a.records) == 4


def test_uncertainty_policies(chexpert):
    base = f"chexpert:{chexpert}?val_fraction=0&labels=Pleural Effusion,Cardiomegaly,Edema"
    ones = load_dataset(base + "&u=ones", 32)
    zeros = load_dataset(base + "&u=zeros", 32)
    ignore = load_dataset(base + "&u=ignore", 32)
    # the unreadable rows are the last two of the CSV, so the first len(ones) records line up
    raw = [r.values["Pleural Effusion"] for r in index_chexpert(parse_spec(base)).records][: len(ones)]
    k = names_of(ones)["Pleural Effusion"]
    uncertain = [i for i, v in enumerate(raw) if v == -1]
    positive = [i for i, v in enumerate(raw) if v == 1]
    assert uncertain and positive
    assert (ones.labels[uncertain, k] == 1).all() and (zeros.labels[uncertain, k] == 0).all()
    assert (ones.labels[positive, k] == 1).all() and (zeros.labels[positive, k] == 1).all()
    assert not ignore.known[uncertain, k].any() and ignore.known[positive, k].all()
    assert ignore.known[:, names_of(ignore)["Cardiomegaly"]].all()
    # blank means zero by default, or unknown with blank=ignore
    e = names_of(ones)["Edema"]
    assert ones.known[:, e].all()
    assert not load_dataset(base + "&blank=ignore", 32).known[:, e].all()


def test_views_labels_and_skips(chexpert, caplog):
    frontal = index_chexpert(parse_spec(f"chexpert:{chexpert}?val_fraction=0"))
    everything = index_chexpert(parse_spec(f"chexpert:{chexpert}?val_fraction=0&view=all"))
    lateral = index_chexpert(parse_spec(f"chexpert:{chexpert}?val_fraction=0&view=lateral"))
    ap = index_chexpert(parse_spec(f"chexpert:{chexpert}?val_fraction=0&view=ap"))
    assert len(everything.records) == len(frontal.records) + len(lateral.records) and len(lateral.records) == 2
    assert all(r.view == "AP" for r in ap.records) and ap.records
    ds = load_dataset(f"chexpert:{chexpert}?val_fraction=0", 32)
    assert ds.skipped == 2 and len(ds) == len(frontal.records) - 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("1 missing" in m and "1 unreadable" in m for m in warned), warned
    assert len(ds.label_names) == 14
    sub = load_dataset(f"chexpert:{chexpert}?val_fraction=0&labels=cardiomegaly", 32)
    assert sub.label_names == ["Cardiomegaly"]


def test_patient_level_split(chexpert):
    train = index_chexpert(parse_spec(f"chexpert:{chexpert}?view=all&val_fraction=0.4&seed=1"))
    val = index_chexpert(parse_spec(f"chexpert:{chexpert}?view=all&val_fraction=0.4&seed=1&split=val"))
    pt, pv = {r.patient for r in train.records}, {r.patient for r in val.records}
    assert pt and pv and not pt & pv
    # patient00001 has two studies: both on the same side
    assert sum(r.patient == "patient00001" for r in train.records + val.records) == 2


def test_prompts_and_errors(chexpert, tmp_path):
    ds = load_dataset(
        f"chexpert:{chexpert}?val_fraction=0&prompt_view=1&prompt_demographics=1&uncertain=possible"
        "&labels=Cardiomegaly,Pleural Effusion,No Finding",
        32,
    )
    assert any("possible pleural effusion" in p for p in ds.prompts)
    assert any(p.startswith("AP chest x-ray of a") for p in ds.prompts)
    with pytest.raises(MeddiffError, match="unknown option.*known: split"):
        load_dataset(f"chexpert:{chexpert}?colour=1", 32)
    with pytest.raises(MeddiffError, match="view= must be"):
        load_dataset(f"chexpert:{chexpert}?view=oblique", 32)
    with pytest.raises(MeddiffError, match="unknown label 'Heart'"):
        load_dataset(f"chexpert:{chexpert}?labels=Heart", 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("Path,Sex\nx.jpg,Male\n")
    with pytest.raises(MeddiffError, match="lacks column.*No Finding"):
        load_dataset(f"chexpert:{bad}", 32)
    (bad / "train.csv").write_text("Path,Cardiomegaly\nx.jpg,2\n")
    with pytest.raises(MeddiffError, match="line 2"):
        load_dataset(f"chexpert:{bad}?labels=Cardiomegaly", 32)


def test_filter_that_empties_is_an_error(chexpert):
    with pytest.raises(MeddiffError, match="no images left after filtering by view=lateral"):
        load_dataset(f"chexpert:{chexpert}?split=valid&view=lateral", 32)
