"""Demographic and acquisition labels: sex, age and view derived from record metadata, as label groups next to
the findings.

A dataset spec with `demographics=sex,age,view` (any subset) gains these labels, derived from each record's
metadata (CheXpert/MIMIC/CSV `Sex`, `Age`, `Frontal/Lateral` + `AP/PA` or `view` columns; phantoms have them too):

    sex   ->  "Female"                                   (1 female, 0 male)
    age   ->  "Age 0-17", "Age 18-39", "Age 40-59", "Age 60-79", "Age 80+"   (one-hot bins)
    view  ->  "View PA", "View AP", "View Lateral"        (one-hot)

A record without the value (blank sex, no age) has the whole group unknown, never "absent". Because they are
ordinary labels, classifier-free guidance, label fidelity, `--labels` and the manifests handle them as they handle
findings; training also drops each group on its own (`attribute_dropout`) so that a model can be asked for findings
with the demographics left open, or for one attribute alone. `meddiff generate --sex F --age 70 --view PA` sets
them by value."""

from __future__ import annotations

import math

from meddiff.errors import MeddiffError

SEX_LABEL = "Female"
AGE_BINS: tuple[tuple[int, int | None], ...] = ((0, 17), (18, 39), (40, 59), (60, 79), (80, None))
VIEWS = ("PA", "AP", "Lateral")
ATTRIBUTES = ("sex", "age", "view")


def age_label(low: int, high: int | None) -> str:
    return f"Age {low}+" if high is None else f"Age {low}-{high}"


AGE_LABELS = tuple(age_label(lo, hi) for lo, hi in AGE_BINS)
VIEW_LABELS = tuple(f"View {v}" for v in VIEWS)
GROUP_LABELS = {"sex": (SEX_LABEL,), "age": AGE_LABELS, "view": VIEW_LABELS}


def parse_attributes(text: str | None) -> tuple[str, ...]:
    """'sex,age' -> ('sex', 'age'); unknown names are a one-line error."""
    if not text:
        return ()
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise MeddiffError(f"demographics=: unknown attribute {unknown[0]!r}; choose from {', '.join(ATTRIBUTES)}")
    return tuple(dict.fromkeys(names))


def label_names(attributes: tuple[str, ...]) -> list[str]:
    return [name for a in attributes for name in GROUP_LABELS[a]]


def normalise_sex(value: str) -> str | None:
    v = value.strip().lower()
    if v in ("f", "female", "woman"):
        return "F"
    if v in ("m", "male", "man"):
        return "M"
    return None


def normalise_view(value: str) -> str | None:
    v = value.strip().upper()
    if v in ("PA", "POSTERO-ANTERIOR"):
        return "PA"
    if v in ("AP", "ANTERO-POSTERIOR", "AP SUPINE", "AP ERECT"):
        return "AP"
    if v in ("LATERAL", "LL", "LAT", "RL"):
        return "Lateral"
    return None


def age_bin(age: float) -> str:
    for lo, hi in AGE_BINS:
        if age >= lo and (hi is None or age < hi + 1):
            return age_label(lo, hi)
    raise MeddiffError(f"age {age:g} is negative")


def values_for(attributes: tuple[str, ...], sex: str, age: float | None, view: str) -> dict[str, float | None]:
    """A record's metadata -> raw label values (1 / 0, or None for the whole group when the value is missing)."""
    out: dict[str, float | None] = {}
    if "sex" in attributes:
        s = normalise_sex(sex or "")
        out[SEX_LABEL] = None if s is None else float(s == "F")
    if "age" in attributes:
        known_age = age is not None and not math.isnan(age) and age >= 0
        chosen = age_bin(age) if known_age and age is not None else None
        for name in AGE_LABELS:
            out[name] = None if chosen is None else float(name == chosen)
    if "view" in attributes:
        v = normalise_view(view or "")
        for name in VIEW_LABELS:
            out[name] = None if v is None else float(name == f"View {v}")
    return out


def present_labels(attributes: tuple[str, ...], derived: list[dict[str, float | None]], source: str) -> list[str]:
    """The labels the attributes add: every bin and view, whichever split this is, so that train and held-out splits
    have the same columns (the bins a model actually saw are in its pipeline's meddiff_labels.json). An attribute no
    image has is a one-line error: a condition the dataset lacks."""
    for attribute in attributes:
        if not any(v.get(GROUP_LABELS[attribute][0]) is not None for v in derived):
            raise MeddiffError(
                f"{source}: demographics={attribute} but no image has a {attribute} value; check the Sex / Age / "
                "view columns"
            )
    return label_names(attributes)


def with_demographics(table, attributes: tuple[str, ...]):
    """A RecordTable with the attribute labels appended to its label names and every record's values."""
    if not attributes:
        return table
    clash = [n for n in label_names(attributes) if n in table.label_names]
    if clash:
        raise MeddiffError(f"{table.source}: demographics= would add {clash[0]!r}, which the data already has")
    derived = [values_for(attributes, r.sex, r.age, r.view) for r in table.records]
    names = present_labels(attributes, derived, table.source)
    records = []
    for record, values in zip(table.records, derived):
        extra = {n: values[n] for n in names}
        records.append(type(record)(**{**record.__dict__, "values": {**record.values, **extra}}))
    known = {a: sum(v[GROUP_LABELS[a][0]] is not None for v in derived) for a in attributes}
    note = "demographics: " + ", ".join(f"{a} known for {known[a]} of {len(records)}" for a in attributes)
    return type(table)(records, [*table.label_names, *names], table.source, table.notes + [note])


ALL_LABELS = frozenset(label_names(ATTRIBUTES))  # blank means unknown for these, whatever the blank= policy


def demographic_labels(index):
    """Decorates a kind's `index(spec) -> RecordTable`: the spec's `demographics=` option adds the label groups."""
    import functools

    @functools.wraps(index)
    def wrapped(spec):
        return with_demographics(index(spec), parse_attributes(spec.options.get("demographics")))

    return wrapped
