"""What to generate: one condition per image, from --labels, --unconditional, --balance (every label alone, equal
counts), or a conditions CSV (a real dataset's label table, mirrored row by row, or a prompt column)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

from meddiff.conditioning.demographics import AttributeGroups
from meddiff.conditioning.labels import LabelCodec
from meddiff.data.chexpert_format import parse_value
from meddiff.data.demographics import ALL_LABELS as DEMOGRAPHIC_LABELS
from meddiff.data.records import LabelPolicy, Record
from meddiff.errors import MeddiffError


@dataclass
class GenerationPlan:
    labels: torch.Tensor  # (N, K)
    known: torch.Tensor  # (N, K) bool
    prompts: list[str | None]  # free-text prompts (text models), else None
    source: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    def key(self, i: int, names: list[str]) -> str:
        """A readable name of image i's condition, for the per-condition summary."""
        if self.prompts[i]:
            return self.prompts[i]  # type: ignore[return-value]
        if not bool(self.known[i].any()):
            return "unconditional"
        present = [n for k, n in enumerate(names) if self.known[i, k] and self.labels[i, k] > 0.5]
        return "+".join(present) if present else "none of the labels"

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha1(self.labels.numpy().tobytes() + self.known.numpy().tobytes())
        h.update("\x00".join(p or "" for p in self.prompts).encode())
        return h.hexdigest()[:16]


def _repeat(rows: int, n: int | None, per_condition: int | None) -> list[int]:
    """Row index of every image: each row per_condition times, cycling through the rows up to n images."""
    order = [r for r in range(rows) for _ in range(per_condition or 1)]
    if n is not None:
        order = [order[i % len(order)] for i in range(n)]
    return order


def read_conditions_csv(path: Path, codec: LabelCodec, uncertain: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    path = Path(path)
    if not path.is_file():
        raise MeddiffError(f"conditions file {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = list(reader)
    lookup = {c.lower(): c for c in columns}
    matched = {name: lookup[name.lower()] for name in codec.label_names if name.lower() in lookup}
    prompt_col = lookup.get("prompt") or lookup.get("report") or lookup.get("text")
    if not matched and not prompt_col:
        raise MeddiffError(
            f"{path} has no column matching the model's labels ({', '.join(codec.label_names)}) "
            "and no prompt column; give it label columns or a 'prompt' column"
        )
    if not rows:
        raise MeddiffError(f"{path} has no rows")
    records = []
    for line, row in enumerate(rows, start=2):
        try:
            values = {name: parse_value(row.get(col) or "") for name, col in matched.items()}
        except ValueError as exc:
            raise MeddiffError(f"{path} line {line}: {exc}") from None
        records.append(Record(path=path, values=values, text=(row.get(prompt_col) or None) if prompt_col else None))
    # labels the table does not have stay unknown; blank = absent; uncertain per --uncertain
    policy = LabelPolicy(uncertain=uncertain, blank="zeros")
    labels, known = policy.apply(records, codec.label_names)
    for k, name in enumerate(codec.label_names):
        if name not in matched:
            known[:, k] = False
    return torch.from_numpy(labels), torch.from_numpy(known), [r.text for r in records]


def attribute_groups_known(labels: torch.Tensor, known: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Demographic groups (sex / age / view) are never "absent": a group is known only where one of its labels is
    asked for (e.g. --labels "Cardiomegaly,Age 60-79"); otherwise the whole group is left unspecified."""
    known = known.clone()
    for group in AttributeGroups.of(names).groups.values():
        columns = list(group)
        asked = ((labels[:, columns] > 0.5) & known[:, columns]).any(dim=1)
        for j in columns:
            known[:, j] = asked
    return known


def with_attributes(plan: GenerationPlan, names: list[str], values: dict[str, float]) -> GenerationPlan:
    """Every image of the plan with these demographic label values (from `condition_values`)."""
    labels, known = plan.labels.clone(), plan.known.clone()
    for name, value in values.items():
        j = names.index(name)
        labels[:, j], known[:, j] = value, True
    said = [
        ("female" if v > 0.5 else "male") if n == "Female" else n for n, v in values.items() if v > 0.5 or n == "Female"
    ]
    return GenerationPlan(labels, known, plan.prompts, f"{plan.source} ({', '.join(said)})")


def make_plan(
    codec: LabelCodec,
    *,
    labels_text: str | None = None,
    unconditional: bool = False,
    conditions: str | None = None,
    n: int | None = None,
    per_condition: int | None = None,
    unspecified: str = "absent",
    uncertain: str = "ignore",
    prompt: str | None = None,
    balance: bool = False,
) -> GenerationPlan:
    k = len(codec.label_names)
    if conditions:
        labels, known, prompts = read_conditions_csv(Path(conditions), codec, uncertain)
        source = f"conditions {conditions}"
    elif prompt is not None:
        if not prompt.strip():
            raise MeddiffError("--prompt is empty")
        labels, known, prompts = torch.zeros(1, k), torch.zeros(1, k, dtype=torch.bool), [prompt]
        source = f"prompt {prompt!r}"
    elif labels_text is not None:
        one, one_known = codec.parse(labels_text, unspecified)
        labels, known, prompts = one[None], one_known[None], [None]
        source = f"labels {labels_text}"
    elif balance:  # every finding alone, the others absent: equal counts per label when cycled
        findings = [j for j, name in enumerate(codec.label_names) if name not in DEMOGRAPHIC_LABELS]
        if not findings:
            raise MeddiffError("--balance needs a label-conditioned model")
        labels = torch.zeros(len(findings), k)
        labels[torch.arange(len(findings)), torch.tensor(findings)] = 1.0
        known, prompts = torch.ones(len(findings), k, dtype=torch.bool), [None] * len(findings)
        source = f"balanced over {len(findings)} labels"
    elif unconditional:
        labels, known, prompts = torch.zeros(1, k), torch.zeros(1, k, dtype=torch.bool), [None]
        source = "unconditional"
    else:
        raise MeddiffError(
            "say what to generate: --labels, --prompt, --unconditional, --balance or --conditions FILE.csv"
        )
    if n is None and per_condition is None and not conditions:
        n = 16
    if not conditions:
        known = attribute_groups_known(labels, known, codec.label_names)
    order = torch.tensor(_repeat(labels.shape[0], n, per_condition), dtype=torch.long)
    return GenerationPlan(labels[order], known[order], [prompts[i] for i in order.tolist()], source)
