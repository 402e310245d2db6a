"""Typed options: one dataclass field per option, from which YAML loading, validation and CLI flags all come.

A config class is a dataclass whose fields are declared with `option(default, "help text", ...)`. The field's type
hint is the validation rule (`Literal[...]` for choices, `int`, `float`, `bool`, `str`, `list[int]`, `list[str]`,
`X | None` where null is allowed, or another config class for a nested section); `minimum`/`maximum` bound numbers.

- `build(cls, mapping)` makes a validated instance from a YAML mapping (unknown keys, wrong types, values outside
  the choices or range: one-line MeddiffError naming the dotted key, the value and what is allowed).
- `add_arguments(parser, cls, ...)` adds a flag per field (nested fields as `--section.field-name`, top-level and a
  command's home section also as `--field-name`), with the field's help, choices and default in `--help`;
  `given(args)` returns the flags the user actually passed as {dotted key: value}.
- Constructing a config class in Python validates it too (`Options.__post_init__`).

Adding an option is one edit: a new `option(...)` field in a config class.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Union

from meddiff.errors import MeddiffError

DEST_PREFIX = "option:"  # argparse destinations of generated flags: "option:model.prediction_type"


def option(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    zero_is_none: bool = False,
) -> Any:
    """A config field. `minimum`/`maximum` are inclusive bounds, `above` an exclusive one (`above=0`: positive).
    Mutable defaults (lists) are copied per instance. `zero_is_none`: 0 means "off" (None)."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "above": above, "zero_is_none": zero_is_none}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section (a YAML mapping under its name)."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


class Options:
    """Base of config dataclasses: validates on construction, so the Python API checks what YAML and CLI check."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            hint = hints(type(self))[f.name]
            if is_section(hint):
                continue
            object.__setattr__(self, f.name, check(f.name, getattr(self, f.name), hint, f.metadata))  # frozen too

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Flag:
    key: str  # dotted config key
    names: tuple[str, ...]  # option strings, e.g. ("--model.prediction-type", "--prediction")


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _optional(hint: Any) -> tuple[Any, bool]:
    """(inner type, allows None) for `X | None`."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def describe(hint: Any) -> str:
    inner, nullable = _optional(hint)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(str(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        text = f"a list of {typing.get_args(inner)[0].__name__}"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(inner, str(inner))
    return text + (" or null" if nullable else "")


def check(key: str, value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    """The value converted to the field's type (int -> float, tuple -> list), or a one-line MeddiffError."""
    inner, nullable = _optional(hint)
    if meta.get("zero_is_none") and value == 0 and not isinstance(value, bool):
        value = None
    if value is None:
        if nullable:
            return None
        raise MeddiffError(f"config key {key!r} = null is not allowed; expected {describe(hint)}")

    def bad() -> MeddiffError:
        return MeddiffError(f"config key {key!r} = {value!r} is not {describe(hint)}")

    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            return _raise(bad())
    elif origin is list:
        item = typing.get_args(inner)[0]
        if not isinstance(value, (list, tuple)):
            return _raise(bad())
        value = [check(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
    elif inner is bool:
        if not isinstance(value, bool):
            return _raise(bad())
    elif inner is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return _raise(bad())
    elif inner is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                return _raise(bad())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _raise(bad())
        value = float(value)
    elif inner is str:
        if not isinstance(value, str):
            return _raise(bad())
    low, high, above = meta.get("minimum"), meta.get("maximum"), meta.get("above")
    if above is not None and not value > above:
        raise MeddiffError(f"config key {key!r} = {value!r} must be greater than {above:g}")
    if low is not None and value < low:
        raise MeddiffError(f"config key {key!r} = {value!r} is below the minimum {low:g}")
    if high is not None and value > high:
        raise MeddiffError(f"config key {key!r} = {value!r} is above the maximum {high:g}")
    return value


def _raise(error: MeddiffError) -> Any:
    raise error


def build(cls: type, data: Any, where: str = "") -> Any:
    """A validated `cls` from a (YAML) mapping; nested sections from nested mappings; missing keys keep defaults."""
    if not isinstance(data, dict):
        raise MeddiffError(f"config {where or 'file'} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise MeddiffError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}{hint}; "
            f"known{' in ' + where if where else ''}: {', '.join(fields)}"
        )
    types_ = hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = types_[name]
        if is_section(hint):
            kwargs[name] = value if isinstance(value, hint) else build(hint, value if value is not None else {}, key)
        else:
            kwargs[name] = check(key, value, hint, fields[name].metadata)
    return cls(**kwargs)


def walk(cls: type, prefix: str = ""):
    """(dotted key, field, type hint) of every option, sections expanded, in declaration order."""
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        hint = types_[f.name]
        if is_section(hint):
            yield from walk(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hint


BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _item(kind: Any, text: str) -> Any:
    """One list element from its text; booleans by word (bool("false") would be True), anything else: ValueError."""
    if kind is bool:
        if text.lower() not in BOOL_WORDS:
            raise ValueError(text)
        return BOOL_WORDS[text.lower()]
    return kind(text)


def _converter(key: str, hint: Any, meta: typing.Mapping[str, Any]):
    inner, nullable = _optional(hint)

    def convert(text: str) -> Any:
        if nullable and text.strip().lower() in ("none", "null", "off"):
            return None
        try:
            if typing.get_origin(inner) is list:
                item = typing.get_args(inner)[0]
                value: Any = [_item(item, part.strip()) for part in text.split(",") if part.strip()]
            elif typing.get_origin(inner) is Literal:
                value = next((a for a in typing.get_args(inner) if str(a) == text), text)
            else:
                value = inner(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {describe(hint)}") from None
        try:
            return check(key, value, hint, meta)
        except MeddiffError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = describe(hint)  # argparse names the type in its error message
    return convert


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        value = f.default
    else:
        assert f.default_factory is not MISSING, f"{f.name} has no default"
        value = f.default_factory()
    return "null" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    home: str = "",
    skip: typing.Collection[str] = (),
    aliases: typing.Mapping[str, typing.Sequence[str]] | None = None,
    switches: typing.Mapping[str, tuple[str, Any, str]] | None = None,
    defaults: typing.Mapping[str, str] | None = None,
    title: str = "options (recipe top level)",
) -> list[Flag]:
    """A flag per option of `cls`, grouped by section. Top-level options get `--name`; options of the `home`
    section get `--name` too (they win a clash with a top-level name); every nested option has `--section.name`.
    `aliases` adds extra option strings per dotted key (kept spellings); `switches` adds flags that set a key to a
    constant, {"--no-eval": ("eval.fidelity", False, help)}; `skip` leaves keys out (the command sets them);
    `defaults` replaces the shown default (command-specific defaults). Flags default to "not given"."""
    aliases = aliases or {}
    defaults = defaults or {}
    options = [(k, f, h) for k, f, h in walk(cls) if k not in skip]
    options.sort(key=lambda o: not (home and o[0].startswith(home + ".")))  # the command's own section first
    short_taken = {k.split(".", 1)[1] for k, _, _ in options if home and k.startswith(home + ".")}
    groups: dict[str, Any] = {}  # section -> argument group
    flags = []
    for key, f, hint in options:
        parent, _, name = key.rpartition(".")
        names = [f"--{key.replace('_', '-')}"]
        if not parent and name in short_taken:
            raise ValueError(f"top-level option {key} clashes with {home}.{key}; skip one of them")
        if parent and parent == home:
            names.insert(0, f"--{name.replace('_', '-')}")
        names += [a for a in aliases.get(key, ()) if a not in names]
        if parent not in groups:
            text = f"{parent} options (recipe section `{parent}:`)" if parent else title
            groups[parent] = parser.add_argument_group(text)
        default = defaults.get(key, _default_text(f))
        text = f"{f.metadata.get('help', '')} [{describe(hint)}; default {default}]".replace("%", "%%")
        inner, _ = _optional(hint)
        dest = DEST_PREFIX + key
        if inner is bool:
            groups[parent].add_argument(
                *names, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
        elif typing.get_origin(inner) is list and typing.get_args(inner)[0] is str:
            groups[parent].add_argument(
                *names,
                dest=dest,
                action="append",
                default=argparse.SUPPRESS,
                metavar="TEXT",
                help=text + " (repeat the flag for several)",
            )
        else:
            choices = [str(a) for a in typing.get_args(inner)] if typing.get_origin(inner) is Literal else None
            metavar = "{" + ",".join(choices) + "}" if choices else key.rpartition(".")[2].upper()
            groups[parent].add_argument(
                *names,
                dest=dest,
                type=_converter(key, hint, f.metadata),
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=text,
            )
        flags.append(Flag(key, tuple(names)))
    for name, (key, const, text) in (switches or {}).items():
        parent = key.rpartition(".")[0]
        groups[parent].add_argument(
            name,
            dest=DEST_PREFIX + key,
            action="store_const",
            const=const,
            default=argparse.SUPPRESS,
            help=f"{text} (same as {key}: {const})",
        )
        flags.append(Flag(key, (name,)))
    return flags


def given(args: argparse.Namespace) -> dict[str, Any]:
    """{dotted key: value} of the generated flags the user passed."""
    return {dest[len(DEST_PREFIX) :]: value for dest, value in vars(args).items() if dest.startswith(DEST_PREFIX)}
