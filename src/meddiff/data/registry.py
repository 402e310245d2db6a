"""The registry of dataset kinds: the spec form `kind:path?key=value&key=value`, and each kind's loader.

Kind modules (chexpert, csvfile, folder, ...) register themselves here; `meddiff.data.spec` imports them all and is
the front door (`load_dataset`, `parse_spec`). Nothing here imports a kind, so there is no import circle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError

if TYPE_CHECKING:  # for annotations only: the kinds import this module
    from meddiff.data.materialize import MaterializePlan
    from meddiff.data.records import RecordTable


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    path: str
    options: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        if ":" not in text:
            raise MeddiffError(
                f"dataset spec {text!r} has no kind; write it as KIND:PATH, e.g. "
                f"phantom:data/phantoms (kinds: {', '.join(sorted(LOADERS))})"
            )
        kind, rest = text.split(":", 1)
        kind = kind.strip().lower()
        if kind not in LOADERS:
            raise MeddiffError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(sorted(LOADERS))}")
        path, _, query = rest.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True))
        return cls(kind, path, options)

    def with_options(self, **options: str) -> DatasetSpec:
        return replace(self, options={**self.options, **options})

    def heldout(self) -> DatasetSpec:
        """The same data's held-out split (for evaluation on images the generator never saw)."""
        return self.with_options(split=LOADERS[self.kind].heldout_split)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.kind}:{self.path}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class Loader:
    load: Callable[[DatasetSpec, int], ImageLabelDataset]
    heldout_split: str
    options: tuple[str, ...]
    index: Callable[[DatasetSpec], RecordTable] | None = None  # for file-based kinds
    plan: Callable[[DatasetSpec, int], MaterializePlan] | None = None  # (spec, resolution) -> plan (store-backed)


LOADERS: dict[str, Loader] = {}


def register(kind: str, heldout_split: str, options: tuple[str, ...], index=None, plan=None):
    def wrap(fn: Callable[[DatasetSpec, int], ImageLabelDataset]):
        LOADERS[kind] = Loader(fn, heldout_split, options, index, plan)
        return fn

    return wrap


def check_options(spec: DatasetSpec) -> None:
    unknown = set(spec.options) - set(LOADERS[spec.kind].options)
    if unknown:
        raise MeddiffError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {spec.kind}: datasets; "
            f"known: {', '.join(LOADERS[spec.kind].options)}"
        )


def load(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    """Load a parsed spec with its registered kind (the kinds must be imported: use spec.load_dataset)."""
    check_options(spec)
    dataset = LOADERS[spec.kind].load(spec, resolution)
    if len(dataset) == 0:
        raise MeddiffError(f"{spec} holds no readable images; check the path and split")
    dataset.source = str(spec)
    return dataset
