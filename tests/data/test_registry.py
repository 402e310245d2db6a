"""meddiff.data.registry: the KIND:PATH?key=value spec form, registered kinds and their options."""

import pytest
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.registry import LOADERS, DatasetSpec, check_options, load, register
from meddiff.errors import MeddiffError


@pytest.fixture
def toy_kind(monkeypatch):
    """A registered kind 'toy' whose option n= is the number of images (n=0: an empty dataset)."""
    monkeypatch.setitem(LOADERS, "toy", None)  # restored (removed) after the test

    @register("toy", heldout_split="test", options=("n", "split"))
    def load_toy(spec, resolution):
        n = int(spec.options.get("n", "2"))
        return ImageLabelDataset(
            torch.zeros(n, 1, resolution, resolution), torch.zeros(n, 1), torch.ones(n, 1, dtype=torch.bool), ["A"]
        )

    return load_toy


def test_parse_and_print_round_trip(toy_kind):
    spec = DatasetSpec.parse(" TOY:data/x y?n=3&split=val&empty=")
    assert (spec.kind, spec.path, spec.options) == ("toy", "data/x y", {"n": "3", "split": "val", "empty": ""})
    assert str(spec) == "toy:data/x y?n=3&split=val&empty="
    assert DatasetSpec.parse(str(spec)) == spec
    assert str(DatasetSpec.parse("toy:")) == "toy:" and DatasetSpec.parse("toy:a:b").path == "a:b"


def test_options_and_heldout_split(toy_kind):
    spec = DatasetSpec.parse("toy:p?n=3")
    assert spec.with_options(split="val").options == {"n": "3", "split": "val"}
    assert spec.options == {"n": "3"}  # specs are immutable
    assert spec.heldout().options == {"n": "3", "split": "test"}


@pytest.mark.parametrize(
    "text, message",
    [("nokind", "has no kind; write it as KIND:PATH"), ("zzz:path", "unknown dataset kind 'zzz'; known kinds: .*toy")],
)
def test_bad_specs_are_one_line(toy_kind, text, message):
    with pytest.raises(MeddiffError, match=message) as info:
        DatasetSpec.parse(text)
    assert "\n" not in str(info.value)


def test_load_checks_options_sets_the_source_and_refuses_empty_sets(toy_kind):
    data = load(DatasetSpec.parse("toy:p?n=3"), 8)
    assert len(data) == 3 and data.resolution == 8 and data.source == "toy:p?n=3"
    with pytest.raises(MeddiffError, match="unknown option\\(s\\) colour, size for toy: datasets; known: n, split"):
        check_options(DatasetSpec.parse("toy:p?size=3&colour=red"))
    with pytest.raises(MeddiffError, match="toy:p\\?n=0 holds no readable images"):
        load(DatasetSpec.parse("toy:p?n=0"), 8)


def test_every_builtin_kind_is_registered_with_a_heldout_split():
    import meddiff.data.spec  # noqa: F401  (the front door imports every kind)

    for kind in ("chexpert", "mimic", "medmnist", "folder", "csv", "phantom", "store"):
        assert kind in LOADERS, kind
        assert LOADERS[kind].heldout_split and "split" in LOADERS[kind].options, kind
