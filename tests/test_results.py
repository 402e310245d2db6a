"""The base of typed results: JSON form with renamed and optional keys, read back into the same types, and dict-style
reads for code written against the old dicts."""

import json
from dataclasses import dataclass

import pytest

from meddiff.errors import MeddiffError
from meddiff.results import JsonResult, json_field


@dataclass(kw_only=True)
class Inner(JsonResult):
    mean: float
    std: float


@dataclass(kw_only=True)
class Outer(JsonResult):
    name: str
    odd_key: float = json_field(0.0, key="rate_above_0.95")
    inner: Inner | None = None
    by_label: dict[str, Inner | None] = json_field(default_factory=dict)
    rows: list[Inner] = json_field(default_factory=list)
    maybe: int | None = json_field(None, omit_none=True)
    history: list[list[float]] = json_field(default_factory=list, saved=False)


def _outer():
    return Outer(
        name="x",
        odd_key=0.5,
        inner=Inner(mean=1.0, std=0.1),
        by_label={"a": Inner(mean=2.0, std=0.0), "b": None},
        rows=[Inner(mean=3.0, std=0.3)],
        history=[[1, 0.5]],
    )


def test_json_form_renames_omits_and_round_trips(tmp_path):
    outer = _outer()
    d = outer.to_dict()
    assert list(d) == ["name", "rate_above_0.95", "inner", "by_label", "rows", "history"]  # maybe: None, left out
    assert d["inner"] == {"mean": 1.0, "std": 0.1} and d["by_label"]["b"] is None
    back = Outer.from_dict(json.loads(json.dumps(d)))
    assert back == outer and isinstance(back.inner, Inner) and isinstance(back.by_label["a"], Inner)
    assert isinstance(back.rows[0], Inner)
    outer.maybe = 3
    assert outer.to_dict()["maybe"] == 3


def test_the_file_leaves_out_unsaved_fields(tmp_path):
    path = _outer().write_json(tmp_path / "o.json")
    saved = json.loads(path.read_text())
    assert "history" not in saved and saved["rate_above_0.95"] == 0.5
    back = Outer.read_json(path)
    assert back.history == [] and back.inner == Inner(mean=1.0, std=0.1)
    one_line = _outer().write_json(tmp_path / "c.json", indent=None)
    assert "\n" not in one_line.read_text()


def test_reads_like_the_dict_it_replaced():
    outer = _outer()
    assert outer["rate_above_0.95"] == 0.5 and outer["inner"] == {"mean": 1.0, "std": 0.1}
    assert outer.get("maybe") is None and "maybe" not in outer and "name" in outer
    assert dict(outer) == outer.to_dict() and len(outer) == 6
    json.dumps({"inner": outer["inner"]})  # dict reads give plain JSON values
    with pytest.raises(KeyError):
        outer["odd_key"]  # the JSON key, not the field name


def test_bad_json_is_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="Inner: missing key\\(s\\) std"):
        Inner.from_dict({"mean": 1.0})
    with pytest.raises(MeddiffError, match="expected a JSON object"):
        Inner.from_dict([1, 2])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MeddiffError, match="cannot read"):
        Inner.read_json(tmp_path / "bad.json")
