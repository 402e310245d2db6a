"""Prompts built from labels, e.g. "chest x-ray with cardiomegaly and pleural effusion"."""

from __future__ import annotations

NORMAL_NAMES = {"no finding", "normal"}


def prompt_from_labels(present: list[str], subject: str = "chest x-ray") -> str:
    """Natural-language prompt for a set of present findings (order kept)."""
    findings = [name.lower() for name in present if name.lower() not in NORMAL_NAMES]
    if not findings:
        return f"{subject} with no finding" if present else subject
    if len(findings) == 1:
        return f"{subject} with {findings[0]}"
    return f"{subject} with {', '.join(findings[:-1])} and {findings[-1]}"
