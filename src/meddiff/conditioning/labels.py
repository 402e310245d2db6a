"""Label conditioning: named multi-hot labels -> the vector the U-Net's class embedding takes.

Each label k contributes two numbers, (value_k * known_k, known_k). A label that is not known (blank,
uncertain-ignored, or dropped for classifier-free guidance) is all zeros, the same as "no condition", so
the null condition used for guidance is simply the zero vector, and partially specified conditions
("Cardiomegaly, the rest unspecified") are meaningful.
"""

from __future__ import annotations

import torch

from meddiff.errors import MeddiffError
from meddiff.models.pipeline import encode_condition


class LabelCodec:
    def __init__(self, label_names: list[str]):
        self.label_names = list(label_names)
        self._index = {name.lower(): k for k, name in enumerate(self.label_names)}

    @property
    def dim(self) -> int:
        return 2 * len(self.label_names)

    def encode(self, labels: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) labels (+ (B, K) known mask) -> (B, 2K) condition vectors."""
        if known is None:
            known = torch.ones_like(labels, dtype=torch.bool)
        return encode_condition(labels, known)  # the one definition, shared with the saved pipeline

    def null(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.dim)

    def parse(self, text: str, unspecified: str = "absent") -> tuple[torch.Tensor, torch.Tensor]:
        """ "Cardiomegaly,Pleural Effusion" -> (labels, known) of shape (K,). Names are case-insensitive.

        unspecified='absent' marks every other label as known-absent (an image with exactly these findings);
        'unknown' leaves them unspecified."""
        names = [part.strip() for part in text.split(",") if part.strip()]
        if not names:
            raise MeddiffError(f"--labels is empty; choose from: {', '.join(self.label_names)}")
        labels = torch.zeros(len(self.label_names))
        for name in names:
            k = self._index.get(name.lower())
            if k is None:
                raise MeddiffError(f"unknown label {name!r}; this model knows: {', '.join(self.label_names)}")
            labels[k] = 1.0
        if unspecified not in ("absent", "unknown"):
            raise MeddiffError("unspecified labels must be 'absent' or 'unknown'")
        known = torch.ones(len(self.label_names), dtype=torch.bool) if unspecified == "absent" else labels > 0
        return labels, known

    def drop(self, cond: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """Classifier-free guidance training: replace whole conditions by the null condition with prob. p."""
        if p <= 0:
            return cond
        keep = torch.rand(cond.shape[0], generator=generator) >= p
        return cond * keep.unsqueeze(1).to(cond.dtype)


def condition_columns(names: list[str], labels: torch.Tensor, known: torch.Tensor) -> tuple[list[int], list[str]]:
    """(indices of the label columns a model can be conditioned on, names of the measurements left out; columns never
    known are left out too). A condition is 0 / 1 (the class embedding sees value > 0.5): a column with other known
    values is a measurement (e.g. "Tumour volume mL" from a mask), which as a condition would silently mean
    "value > 0.5"; it stays in the data for evaluation but is no condition (binning it, as the 3D demo's `Large`,
    makes one)."""
    keep: list[int] = []
    measured: list[str] = []
    for k, name in enumerate(names):
        values = labels[known[:, k].bool(), k]
        if not len(values):
            continue  # never known: nothing to learn it from
        if bool(((values == 0) | (values == 1)).all()):
            keep.append(k)
        else:
            measured.append(name)
    return keep, measured
