"""The contract between the one training loop and a training method (from-scratch pixel diffusion now;
latent, fine-tune, DreamBooth, LoRA, textual inversion plug in the same way)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.training.config import TrainConfig


class TrainingMethod(ABC):
    name: str = ""

    def __init__(self, config: TrainConfig, dataset: ImageLabelDataset):
        self.config = config
        self.dataset = dataset

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The module whose parameters train (and are tracked by EMA)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss for one batch. All randomness comes from `generator` (exact resume)."""

    @abstractmethod
    def export(self, model: torch.nn.Module, out_dir: Path) -> Path:
        """Write the trained model (already holding its EMA weights) in diffusers format; returns the folder."""


METHODS: dict[str, type[TrainingMethod]] = {}


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls
