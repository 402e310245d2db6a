"""meddiff.options: typed config fields -> validation, YAML building and CLI flags from one declaration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from meddiff.errors import MeddiffError
from meddiff.options import Options, add_arguments, build, given, option, section, walk


@dataclass
class Inner(Options):
    kind: Literal["a", "b"] = option("a", "which kind")
    sizes: list[int] = option([1, 2], "sizes")
    flag: bool = option(False, "a switch")
    levels: list[bool] = option([False, True], "a switch per level")


@dataclass
class Outer(Options):
    steps: int = option(3, "steps", minimum=1)
    rate: float = option(0.5, "rate", above=0, maximum=1)
    gamma: float | None = option(5.0, "gamma", above=0, zero_is_none=True)
    name: str = option("x", "a name")
    prompts: list[str] = option(["p"], "prompts")
    inner: Inner = section(Inner, "the inner section")


def test_build_validates_and_converts():
    cfg = build(Outer, {"steps": 4, "rate": 1, "gamma": 0, "inner": {"kind": "b", "sizes": (3, 4)}})
    assert cfg.steps == 4 and cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.gamma is None  # 0 means off
    assert cfg.inner.kind == "b" and cfg.inner.sizes == [3, 4]
    assert build(Outer, {"rate": "1e-1"}).rate == pytest.approx(0.1)  # PyYAML reads 1e-1 as text
    assert Outer().prompts is not Outer().prompts  # list defaults are per instance


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": 0}, "'steps' = 0 is below the minimum 1"),
        ({"steps": 2.5}, "'steps' = 2.5 is not an integer"),
        ({"steps": True}, "'steps' = True is not an integer"),
        ({"rate": 0}, "'rate' = 0.0 must be greater than 0"),
        ({"rate": 2}, "'rate' = 2.0 is above the maximum 1"),
        ({"name": None}, "'name' = null is not allowed"),
        ({"inner": {"kind": "c"}}, "'inner.kind' = 'c' is not one of a, b"),
        ({"inner": {"sizes": [1, "x"]}}, r"'inner.sizes\[1\]' = 'x' is not an integer"),
        ({"inner": {"flag": "yes"}}, "'inner.flag' = 'yes' is not true or false"),
        ({"inner": 3}, "config inner must be a mapping"),
        ({"stpes": 3}, "unknown config key.* stpes .*did you mean steps"),
        ({"inner": {"knd": "a"}}, "unknown config key.* inner.knd"),
    ],
)
def test_bad_values_are_one_line_errors_naming_key_value_and_allowed(data, message):
    with pytest.raises(MeddiffError, match=message) as info:
        build(Outer, data)
    assert "\n" not in str(info.value)


def test_python_api_validates_too():
    with pytest.raises(MeddiffError, match="'kind' = 'z' is not one of a, b"):
        Inner(kind="z")
    with pytest.raises(MeddiffError, match="'steps' = -1 is below the minimum 1"):
        Outer(steps=-1)


def _parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Outer, **kw)
    return parser


def test_flags_cover_every_key_and_only_given_ones_are_returned():
    parser = _parser()
    text = parser.format_help()
    for key, _, _ in walk(Outer):
        assert "--" + key.replace("_", "-") in text
    assert given(parser.parse_args([])) == {}
    args = parser.parse_args(
        [
            "--steps",
            "7",
            "--gamma",
            "none",
            "--inner.kind",
            "b",
            "--inner.sizes",
            "4,5",
            "--inner.flag",
            "--prompts",
            "one",
            "--prompts",
            "two",
        ]
    )
    assert given(args) == {
        "steps": 7,
        "gamma": None,
        "inner.kind": "b",
        "inner.sizes": [4, 5],
        "inner.flag": True,
        "prompts": ["one", "two"],
    }
    assert given(parser.parse_args(["--no-inner.flag"])) == {"inner.flag": False}


def test_home_section_aliases_and_switches():
    parser = _parser(
        home="inner",
        aliases={"steps": ["--n-steps"]},
        switches={"--plain": ("gamma", None, "no gamma")},
        defaults={"steps": "by method"},
    )
    args = parser.parse_args(["--kind", "b", "--n-steps", "2", "--plain"])
    assert given(args) == {"inner.kind": "b", "steps": 2, "gamma": None}
    assert "by method" in parser.format_help()


def test_flag_values_are_checked_like_yaml():
    parser = _parser()
    for argv in (["--steps", "0"], ["--steps", "x"], ["--inner.kind", "c"], ["--rate", "3"]):
        with pytest.raises(argparse.ArgumentError):
            parser.parse_args(argv)


def test_list_of_bool_flags_read_words_not_truthiness():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Outer)
    args = given(parser.parse_args(["--inner.levels", "false,FALSE,true,0,yes"]))
    assert args == {"inner.levels": [False, False, True, False, True]}  # bool("false") would be True
    with pytest.raises(SystemExit):
        parser.parse_args(["--inner.levels", "false,maybe"])
