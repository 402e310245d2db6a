"""Checks the training loop runs every few steps on the current (EMA) weights, as a sampling pipeline: e.g. the
memorisation monitor (meddiff.evaluation.privacy_monitor), which the workflow hands to `train()`. A check returns
numbers for the logs and training.json, and may ask the loop to stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class TrainingCheck(Protocol):
    name: str  # tensorboard prefix and key in training.json
    every: int  # steps between checks

    def __call__(self, step: int, pipe: Any, method: Any, history: list[dict]) -> dict:
        """{metric: number, ..., optionally "warning": str and "stop": bool}; `history` holds the earlier results
        (kept across resumes)."""
        ...


@dataclass
class OnMainOnly:
    """What the other processes of a multi-process run hold in place of a check that only the main process runs:
    the same name and schedule (every process must agree on when checks happen)."""

    name: str
    every: int

    def __call__(self, step: int, pipe: Any, method: Any, history: list[dict]) -> dict:
        raise RuntimeError(f"the {self.name} check runs on the main process only")
