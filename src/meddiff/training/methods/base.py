"""The contract between the one training loop and a training method (pixel diffusion, autoencoders, latent
diffusion; fine-tuning, DreamBooth, LoRA and textual inversion plug in the same way).

The loop owns the optimizer of `model`, mixed precision, EMA, checkpoints, logging and the time budget. A method
says what trains, how one batch's loss is computed, and how the result is saved; optional hooks let it prepare
auxiliary modules (a discriminator and its optimizer), update them after each step, and log its own numbers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.store import raw_to_model_range
from meddiff.errors import MeddiffError
from meddiff.training.config import TrainConfig


class TrainingMethod(ABC):
    name: str = ""
    uses_ema: bool = True  # the loop keeps an EMA of the trainable parameters and exports it
    is_main_process: bool = True  # set by the loop; only the main process writes files (validation grids...)
    device_keys: tuple[str, ...] = ("image",)  # batch entries the loop copies to the accelerator
    # DP-SGD (--dp.*) needs a loss that is a mean of independent per-image terms, every image from the data
    supports_dp: bool = False

    def __init__(self, config: TrainConfig, dataset: ImageLabelDataset, accelerator=None):
        self.config = config
        self.dataset = dataset
        self.accelerator = accelerator  # the run's (device, processes); None outside the loop (tests, tools)
        # numbers of the last step the loop logs besides the loss (tensors: the loop reads them as floats)
        self.metrics: dict[str, float | torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    @property
    def has_unused_parameters(self) -> bool:
        """True where some trainable parameters get no gradient in a step (e.g. BERT's pooler when a text encoder
        trains): DDP must then look for them (find_unused_parameters), which costs a graph walk every step."""
        return False

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The module whose parameters train (and are tracked by EMA)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss for one batch. All randomness comes from `generator` (exact resume)."""

    def sampling_pipeline(self, model: torch.nn.Module):
        """The model as an in-memory sampling pipeline (for checks during training), or None where the method
        makes no sampler (autoencoders)."""
        return None

    def release_sampling_pipeline(self) -> None:
        """Undo what sampling_pipeline() changed on the trained modules (devices, attention processors)."""

    @abstractmethod
    def export(self, model: torch.nn.Module, out_dir: Path) -> Path:
        """Write the trained model (already holding its EMA weights) in diffusers format; returns the folder."""

    def setup(self, accelerator) -> None:
        """Prepare auxiliary modules/optimizers with `accelerator` (they are then checkpointed with the run)."""

    def initialise_from(self, path: str) -> None:
        """Start from another run's trained weights (`--init-from`); methods that cannot say so in one line."""
        raise MeddiffError(
            f"--init-from is for pixel and latent diffusion (this run trains {self.name!r}); "
            "fine-tuning starts from --pretrained"
        )

    def batch_source(self):
        """What the loader reads: a dataset whose __getitems__(indices) returns one batch as a dict of CPU tensors
        (default: the images as stored, labels, known-masks and indices)."""
        return self.dataset

    def to_device(self, batch: dict, device) -> dict:
        """A loader batch on the accelerator: `device_keys` are copied (non-blocking from pinned memory) and stored
        images become floats in [-1, 1] there; labels and indices stay on the CPU."""
        out = dict(batch)
        for key in self.device_keys:
            if key in out:
                out[key] = out[key].to(device, non_blocking=True)
        if "image" in out:
            out["image"] = raw_to_model_range(out["image"])
        return out

    def batch(self, index: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """Batch `index` straight from the source, on `device` (tools and tests; the loop uses the loader)."""
        return self.to_device(self.batch_source().__getitems__(index.tolist()), device)

    def extra_state(self) -> dict:
        """JSON-serialisable method state saved with each checkpoint (restored by load_extra_state)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def after_step(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, step: int
    ) -> None:
        """Called after the optimizer step (auxiliary updates such as a discriminator or codebook maintenance)."""


METHODS: dict[str, type[TrainingMethod]] = {}


def training_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, offset: float = 0.0
) -> torch.Tensor:
    """Gaussian noise of `shape` (B, C, ...) on the CPU generator; with `offset`, plus a constant per sample and
    channel (offset noise: the noised input's channel means no longer give the clean ones away, so a model can learn
    brightness, or latent channel means, from its condition)."""
    noise = torch.randn(tuple(shape), generator=generator)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], *([1] * (len(shape) - 2))), generator=generator)
    return noise


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    METHODS[cls.name] = cls
    return cls
