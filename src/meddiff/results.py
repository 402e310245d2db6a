"""The base of meddiff's typed results: dataclasses whose JSON form is the dict each one replaced.

`to_dict()` gives the JSON form (nested results too), `from_dict()` reads it back, `write_json()` / `read_json()`
move it through a file. A field may carry another JSON key than its name (`json_field(key="rate_pixel_above_0.95")`),
be left out while None (`omit_none`, for keys the old dicts only had sometimes), or be returned but not saved
(`saved=False`). Results also read like the dicts they replaced (`summary["steps"]`, `summary.get("fidelity")`,
always the JSON form), so code written against those dicts keeps working."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meddiff.errors import MeddiffError

R = TypeVar("R", bound="JsonResult")


def json_field(
    default: Any = dataclasses.MISSING,
    *,
    key: str | None = None,
    omit_none: bool = False,
    saved: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with JSON options: another key, left out while None, or not written to the file."""
    metadata = {"key": key, "omit_none": omit_none, "saved": saved}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _plain(value: Any) -> Any:
    if isinstance(value, JsonResult):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _typed(hint: Any, value: Any) -> Any:
    """`value` from JSON as the annotated type: nested results (also inside dicts, lists and `X | None`)."""
    if value is None:
        return None
    if isinstance(hint, type) and issubclass(hint, JsonResult):
        return hint.from_dict(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [a for a in args if isinstance(a, type) and issubclass(a, JsonResult)]
        return results[0].from_dict(value) if results and isinstance(value, Mapping) else value
    if origin is dict and len(args) == 2:
        return {k: _typed(args[1], v) for k, v in value.items()}
    if origin is list and args:
        return [_typed(args[0], v) for v in value]
    return value


class JsonResult(Mapping[str, Any]):
    """Base of a result dataclass (subclasses are `@dataclass`es)."""

    def to_dict(self, saved_only: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if (value is None and f.metadata.get("omit_none")) or (saved_only and f.metadata.get("saved") is False):
                continue
            out[_key(f)] = _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        if not isinstance(data, Mapping):
            raise MeddiffError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        missing = [
            _key(f)
            for f in fields
            if _key(f) not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise MeddiffError(f"{cls.__name__}: missing key(s) {', '.join(missing)}")
        return cls(**{f.name: _typed(hints[f.name], data[_key(f)]) for f in fields if _key(f) in data})

    def write_json(self, path: Path, indent: int | None = 2) -> Path:
        """The saved fields as JSON (indent None: one line, as training.json has always been)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(saved_only=True), indent=indent))
        return path

    @classmethod
    def read_json(cls: type[R], path: Path) -> R:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MeddiffError(f"cannot read {path}: {e}") from None
        return cls.from_dict(data)

    # read like the dict it replaced: the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
