"""The contract between the shared Stable Diffusion fine-tuning (base.StableDiffusionFinetune, the method the loop
runs) and one fine-tuning strategy: what trains, the training and validation prompts, an extra loss term, what is
exported, and the flags the loop reads (EMA, unused parameters). The defaults are "nothing trains, prompts as
given, the whole pipeline is exported"; each strategy overrides what differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.models.storage import ADAPTER_FILE
from meddiff.training.config import TrainConfig


class FinetuneRun(Protocol):
    """What a strategy may use of the run it belongs to (StableDiffusionFinetune)."""

    config: TrainConfig
    dataset: ImageLabelDataset
    noise_scheduler: Any  # a diffusers scheduler
    tokenizer: Any  # a transformers tokenizer
    text_encoder: Any  # a transformers text model

    @property
    def device(self) -> torch.device: ...

    @property
    def autoencoder(self) -> torch.nn.Module: ...

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def export_pipeline(self, model: torch.nn.Module, out_dir: Path) -> Path: ...


def unet_of(model: torch.nn.Module) -> Any:
    """The U-Net of a trained model (the U-Net itself, or the "unet" entry of a ModuleDict)."""
    return model["unet"] if isinstance(model, torch.nn.ModuleDict) else model


def text_encoder_of(model: torch.nn.Module) -> Any:
    """The text encoder of a trained model where it learns (the "text_encoder" entry of its ModuleDict)."""
    if not isinstance(model, torch.nn.ModuleDict) or "text_encoder" not in model:
        raise TypeError("the text encoder does not train in this model")
    return model["text_encoder"]


class FinetuneStrategy:
    """One way of fine-tuning Stable Diffusion; `name` is its `--method` value."""

    name: ClassVar[str] = ""
    default_learning_rate: ClassVar[float] = 1e-5
    uses_ema: ClassVar[bool] = True  # the loop keeps an EMA of what trains

    def __init__(self, config: TrainConfig):
        self.config = config
        self.ft = config.finetune

    def check(self) -> None:
        """One-line errors for a request this strategy cannot run (before the pretrained model loads)."""

    # what trains -----------------------------------------------------------------------------------------------
    @property
    def trains_unet(self) -> bool:
        """Every U-Net weight learns."""
        return False

    @property
    def trains_text_encoder(self) -> bool:
        """Every text-encoder weight learns."""
        return False

    @property
    def text_encoder_learns(self) -> bool:
        """Some text-encoder parameters learn (all, adapters or token rows): the encoder joins the trained model,
        prompts are encoded with gradients, and DDP looks for parameters the loss does not reach."""
        return self.trains_text_encoder

    def add_trainable(self, unet: Any, tokenizer: Any, text_encoder: Any) -> None:
        """Trainable parameters beyond whole modules (adapters, new tokens); called after the modules are frozen
        or unfrozen by trains_unet / trains_text_encoder."""

    def prepare(self, run: FinetuneRun, unet: Any) -> None:
        """Data of its own, made once the training images are encoded (e.g. prior-preservation class images)."""

    # prompts and loss ------------------------------------------------------------------------------------------
    def training_prompt(self, prompt: str) -> str:
        """The prompt one training image is trained with, from the dataset's prompt for it."""
        return prompt

    def validation_prompts(self) -> list[str]:
        return list(self.ft.validation_prompts)

    def extend_batch(
        self, run: FinetuneRun, latents: torch.Tensor, prompts: list[str], generator: torch.Generator
    ) -> tuple[torch.Tensor, list[str]]:
        """Extra samples denoised with the batch (prior preservation); the batch's own come first."""
        return latents, prompts

    def batch_loss(self, per_sample: torch.Tensor, n_batch: int) -> torch.Tensor:
        """The loss from per-sample losses; the first `n_batch` are the batch's own samples."""
        return per_sample[:n_batch].mean()

    def after_step(self, model: torch.nn.Module) -> None:
        """After each optimizer step (e.g. restoring embedding rows that must not change)."""

    # export and checkpoints ------------------------------------------------------------------------------------
    def export(self, run: FinetuneRun, model: torch.nn.Module, out_dir: Path) -> Path:
        """Write the result under out_dir; returns its folder (default: the whole pipeline)."""
        return run.export_pipeline(model, out_dir)

    def diffusers_usage(self, export: Path) -> list[str]:
        """Python lines loading the export (at `export`) with plain diffusers, for the model card; BASE stands for
        the pretrained model."""
        return [f"pipe = StableDiffusionPipeline.from_pretrained('{export}', safety_checker=None)"]

    def card_details(self) -> str:
        """What the model card adds after the text encoder line (e.g. "; instance prompt ...")."""
        return ""

    def extra_state(self) -> dict:
        return {"mode": self.name}

    def load_extra_state(self, state: dict) -> None:
        if state and state.get("mode") not in (None, self.name):
            raise MeddiffError(f"this run was trained with --method {state['mode']}; resume it with the same method")


def write_adapter_note(run: FinetuneRun, folder: Path, kind: str, weights: str, **extra: Any) -> None:
    """meddiff_adapter.json beside exported adapter weights: which base model they apply to, and how."""
    note = {
        "kind": kind,
        "base": run.config.finetune.pretrained,
        "weights": weights,
        "resolution": run.config.resolution,
        "label_names": run.dataset.label_names,
        **extra,
    }
    (folder / ADAPTER_FILE).write_text(json.dumps(note, indent=2))
