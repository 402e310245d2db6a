"""Demographic and acquisition conditions on the model side: which of a model's labels are the sex / age / view
groups (meddiff.data.demographics derives them from the data), per-group dropout for classifier-free guidance, and
`generate --sex/--age/--view` turned into label values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meddiff.data.demographics import (
    AGE_BINS,
    AGE_LABELS,
    GROUP_LABELS,
    SEX_LABEL,
    VIEW_LABELS,
    age_bin,
    normalise_sex,
    normalise_view,
)
from meddiff.errors import MeddiffError


@dataclass(frozen=True)
class AttributeGroups:
    """Which label columns of a model are demographic groups (found by name), for per-group dropout and
    `generate --sex/--age/--view`."""

    groups: dict[str, tuple[int, ...]]  # attribute -> label indices

    @classmethod
    def of(cls, names: list[str]) -> AttributeGroups:
        index = {n: k for k, n in enumerate(names)}
        groups = {}
        for attribute, labels in GROUP_LABELS.items():
            present = tuple(index[n] for n in labels if n in index)
            if present:
                groups[attribute] = present
        return cls(groups)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def drop(self, known: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """Classifier-free guidance per attribute: each group of each image becomes unknown with probability p, so
        the model also learns the findings with that attribute left open."""
        if p <= 0 or not self.groups:
            return known
        known = known.clone()
        for columns in self.groups.values():
            drop = torch.rand(known.shape[0], generator=generator) < p
            for k in columns:
                known[drop, k] = False
        return known


def _span(bins: list[str]) -> str:
    """The ages the given bin labels cover, from AGE_BINS: '18+', '18-59'."""
    low, high = AGE_BINS[AGE_LABELS.index(bins[0])][0], AGE_BINS[AGE_LABELS.index(bins[-1])][1]
    return f"{low}+" if high is None else f"{low}-{high}"


def condition_values(
    names: list[str],
    sex: str | None = None,
    age: float | None = None,
    view: str | None = None,
    counts: dict[str, int] | None = None,
) -> dict[str, float]:
    """`generate --sex/--age/--view` -> {label: 1 or 0} for the groups asked for. A group the model was not trained
    with, or a value its training images never had (`counts`: training positives per label, from the pipeline's
    meddiff_labels.json; an age outside the trained ages, a view it never saw) is a one-line error."""
    groups = AttributeGroups.of(names)

    def seen(label: str) -> bool:
        return label in names and (counts is None or counts.get(label, 0) > 0)

    def require(attribute: str) -> None:
        if attribute not in groups.groups:
            raise MeddiffError(
                f"this model has no {attribute} condition (train it with demographics={attribute} in the data spec)"
            )

    out: dict[str, float] = {}
    if sex is not None:
        require("sex")
        s = normalise_sex(sex)
        if s is None:
            raise MeddiffError(f"--sex must be F or M, got {sex!r}")
        out[SEX_LABEL] = float(s == "F")
    if age is not None:
        require("age")
        trained = [n for n in AGE_LABELS if seen(n)]
        chosen = age_bin(age) if age >= 0 else None
        if chosen not in trained:
            span = _span(trained) if trained else "none"
            raise MeddiffError(f"age {age:g} is outside the ages this model was trained on ({span})")
        out.update({n: float(n == chosen) for n in AGE_LABELS if n in names})
    if view is not None:
        require("view")
        v = normalise_view(view)
        if v is None or not seen(f"View {v}"):
            available = ", ".join(n.removeprefix("View ") for n in VIEW_LABELS if seen(n))
            raise MeddiffError(f"--view {view!r} is not a view this model was trained on ({available})")
        out.update({n: float(n == f"View {v}") for n in VIEW_LABELS if n in names})
    return out
