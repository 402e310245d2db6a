"""meddiff.data.materialize: a RecordTable becomes an ImageLabelDataset, through the prepared store (cache) or
decoded directly (cache=0), with the same pixels, labels and prompts either way; unreadable files are skipped and
counted, never dropped silently."""

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.data.io import write_png
from meddiff.data.materialize import Preprocess, default_workers, materialize, store_items
from meddiff.data.prompts import PromptOptions
from meddiff.data.records import LabelPolicy, Record, RecordTable
from meddiff.errors import MeddiffError

NAMES = ["Cardiomegaly", "Edema"]


@pytest.fixture
def table(tmp_path):
    """Three readable PNGs (one 16-bit), one missing and one corrupt file; one record with its own prompt."""
    values = [
        {"Cardiomegaly": 1.0, "Edema": None},
        {"Cardiomegaly": 0.0, "Edema": -1.0},
        {"Cardiomegaly": None, "Edema": 1.0},
    ]
    records = []
    for i, v in enumerate(values):
        path = tmp_path / f"img{i}.png"
        write_png(path, np.full((12, 12), (i + 1) / 4, np.float32), bit_depth=16 if i == 2 else 8)
        records.append(Record(path=path, values=v, patient=f"p{i}"))
    records[1].text = "a free-text report"
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    records += [Record(path=tmp_path / "gone.png", values={}), Record(path=tmp_path / "corrupt.png", values={})]
    return RecordTable(records, NAMES, "test-table")


@pytest.mark.parametrize("use_cache", [True, False])
def test_images_labels_prompts_and_problems(table, use_cache):
    prep = Preprocess(8, use_cache=use_cache)
    ds = materialize(table, LabelPolicy(uncertain="ignore"), prep, f"test-spec-{use_cache}", progress=False)
    assert len(ds) == 3 and ds.resolution == 8 and ds.label_names == NAMES
    # the 8-bit images are widened to 16 bits beside the 16-bit one; values in model range [-1, 1]
    means = [float(ds.images[i].mean()) for i in range(3)]
    np.testing.assert_allclose(means, [(i + 1) / 4 * 2 - 1 for i in range(3)], atol=2 / 255)
    assert ds.labels.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    assert ds.known.tolist() == [[True, True], [True, False], [True, True]]  # uncertain ignored, blank = absent
    assert ds.prompts[1] == "a free-text report" and "cardiomegaly" in ds.prompts[0].lower()
    assert ds.skipped == 2 and sorted(Path(p).name for p, _ in ds.problems) == ["corrupt.png", "gone.png"]
    assert dict((Path(p).name, r) for p, r in ds.problems)["gone.png"] == "missing"
    assert bool(ds.store_key) is use_cache


def test_cached_and_direct_reads_agree(table):
    cached = materialize(table, LabelPolicy(), Preprocess(8), "agree", progress=False)
    direct = materialize(table, LabelPolicy(), Preprocess(8, use_cache=False), "agree", progress=False)
    assert torch.equal(cached.images[:], direct.images[:])
    assert torch.equal(cached.labels, direct.labels) and list(cached.prompts) == list(direct.prompts)
    again = materialize(table, LabelPolicy(uncertain="ones"), Preprocess(8), "agree", progress=False)
    assert again.store_key == cached.store_key  # a label policy does not need the pixels again
    assert again.labels[1, 1] == 1.0 and again.known[1, 1]


def test_problems_are_reported_in_one_warning(table, capsys, caplog):
    materialize(table, LabelPolicy(), Preprocess(8, use_cache=False), "warn", progress=False)
    captured = capsys.readouterr()
    said = captured.out + captured.err + caplog.text  # printed today; logged once the library uses logging
    assert "skipped 2 of 5 images" in said and "1 missing" in said and "1 unreadable" in said


def test_all_unreadable_gives_an_empty_dataset(tmp_path):
    table = RecordTable([Record(path=tmp_path / "gone.png", values={})], NAMES, "none")
    ds = materialize(table, LabelPolicy(), Preprocess(8, use_cache=False), "empty", progress=False)
    assert len(ds) == 0 and ds.skipped == 1


def test_preprocess_options():
    prep = Preprocess.from_options(
        {"fit": "pad", "cache": "0", "prompt_view": "yes", "uncertain": "possible"}, 64, subject="brain MRI"
    )
    assert (prep.resolution, prep.fit, prep.use_cache) == (64, "pad", False)
    assert prep.prompt == PromptOptions("brain MRI", True, False, "possible")
    default = Preprocess.from_options({}, 32)
    assert (default.fit, default.use_cache, default.prompt) == ("crop", True, PromptOptions())
    with pytest.raises(MeddiffError, match="fit= must be crop or pad, got 'stretch'"):
        Preprocess.from_options({"fit": "stretch"}, 32)
    with pytest.raises(MeddiffError, match="uncertain= must be omit or possible"):
        Preprocess.from_options({"uncertain": "yes"}, 32)


def test_store_items_keep_slices_only_for_volumes(tmp_path):
    records = [
        Record(path=Path("a.png"), values={}, slice_index=3),
        Record(path=Path("v.nii.gz"), values={}, slice_index=4, slice_axis=0),
        Record(path=Path("w.nii"), values={}),
    ]
    items = store_items(RecordTable(records, NAMES, "s"))
    assert items == [("a.png", None, 2), ("v.nii.gz", 4, 0), ("w.nii", None, 2)]


def test_default_workers(monkeypatch):
    monkeypatch.delenv("MEDDIFF_PREPARE_WORKERS", raising=False)
    assert default_workers(10) == 0  # a pool costs more than it saves on a small set
    assert 1 <= default_workers(10_000) <= 16
    monkeypatch.setenv("MEDDIFF_PREPARE_WORKERS", "3")
    assert default_workers(10) == 3
    monkeypatch.setenv("MEDDIFF_PREPARE_WORKERS", "-2")
    assert default_workers(10_000) == 0
