"""Prompts built from labels, e.g. "chest x-ray with cardiomegaly and pleural effusion".

Configurable per dataset spec: `prompt_view=1` adds the view ("PA chest x-ray"), `prompt_demographics=1` adds
sex and age ("... of a 64-year-old woman"), `uncertain=omit|possible` drops uncertain findings or phrases them
as possible. "No Finding" renders as a normal study. Free text (reports, a CSV column) passes through."""

from __future__ import annotations

from dataclasses import dataclass

NORMAL_NAMES = {"no finding", "normal"}


@dataclass(frozen=True)
class PromptOptions:
    subject: str = "chest x-ray"
    view: bool = False
    demographics: bool = False
    uncertain: str = "omit"  # omit | possible


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return f"{', '.join(items[:-1])} and {items[-1]}"


def prompt_from_labels(
    present: list[str],
    subject: str = "chest x-ray",
    uncertain: list[str] | None = None,
    view: str = "",
    sex: str = "",
    age: float | None = None,
) -> str:
    """Natural-language prompt for the present (and possibly uncertain) findings, order kept."""
    findings = [name.lower() for name in present if name.lower() not in NORMAL_NAMES]
    possible = [name.lower() for name in (uncertain or []) if name.lower() not in NORMAL_NAMES]
    normal = not findings and not possible and any(n.lower() in NORMAL_NAMES for n in present)
    head = f"{view} {subject}".strip() if view else subject
    if normal:
        head = f"normal {head}"
    if sex or age is not None:
        who = {"male": "man", "female": "woman", "m": "man", "f": "woman"}.get(sex.lower(), "patient")
        head += f" of a {int(age)}-year-old {who}" if age is not None else f" of a {who}"
    parts = []
    if findings:
        parts.append(_join(findings))
    if possible:
        parts.append("possible " + _join(possible))
    if not parts:
        return head
    sep = ", with " if (sex or age is not None) else " with "
    return head + sep + ", ".join(parts)


def prompt_for(
    values: dict[str, float | None],
    names: list[str],
    options: PromptOptions,
    view: str = "",
    sex: str = "",
    age: float | None = None,
) -> str:
    """Prompt from raw label values (1 present, -1 uncertain)."""
    present = [n for n in names if (v := values.get(n)) is not None and v > 0.5]
    uncertain = (
        [n for n in names if (v := values.get(n)) is not None and v < 0] if options.uncertain == "possible" else []
    )
    return prompt_from_labels(
        present,
        options.subject,
        uncertain,
        view if options.view else "",
        sex if options.demographics else "",
        age if options.demographics else None,
    )


def shuffle_findings(prompt: str, names: list[str], order: list[float]) -> str:
    """A label-built prompt with its present findings reordered by `order` (one random number per label name):
    "chest x-ray with cardiomegaly and pleural effusion" may become "... with pleural effusion and cardiomegaly".
    Caption augmentation for text models; a prompt that is not in prompt_from_labels' grammar comes back as is."""
    for sep in (", with ", " with "):
        head, found, tail = prompt.partition(sep)
        if found:
            break
    else:
        return prompt
    definite, possible_sep, possible = tail.partition(", possible ")
    rank = {name.lower(): order[k] for k, name in enumerate(names)}
    present = [name for name in rank if name not in NORMAL_NAMES and name in definite]
    if len(present) < 2 or _join(sorted(present, key=definite.index)) != definite:
        return prompt
    return head + sep + _join(sorted(present, key=rank.__getitem__)) + possible_sep + possible
