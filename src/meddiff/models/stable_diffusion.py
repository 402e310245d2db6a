"""Pretrained Stable Diffusion (a hub id such as a v1.x / v2.x repository, or a local diffusers folder) as the
starting point of fine-tuning (a tiny offline one for tests and trials: meddiff.testing).

Grayscale: Stable Diffusion's autoencoder takes and gives RGB. 1-channel images go in as the same channel three
times (`to_rgb`) and come out as the mean of the three (MedDiffusionPipeline.decode_latents), so data, exports
and manifests stay 1-channel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from meddiff.errors import MeddiffError
from meddiff.hub import load_pretrained, quiet_loading

if TYPE_CHECKING:  # diffusers and transformers are imported where they are used (slow imports)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerBase


@dataclass
class StableDiffusionParts:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: DDPMScheduler  # the training noise scheduler
    source: str


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 3, H, W) for an RGB autoencoder; other channel counts are refused."""
    if images.shape[1] == 3:
        return images
    if images.shape[1] != 1:
        raise MeddiffError(f"expected 1-channel images, got {images.shape[1]} channels")
    return images.expand(-1, 3, -1, -1)


def check_pretrained(name_or_path: str) -> dict:
    """The pipeline's model_index.json (a few bytes), or the one-line error a missing folder or hub id gives."""
    from diffusers import DiffusionPipeline

    local = Path(name_or_path).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise MeddiffError(f"{local} is not a diffusers pipeline folder (no model_index.json)")
    return load_pretrained(DiffusionPipeline.load_config, name_or_path, "pretrained Stable Diffusion")


def load_stable_diffusion(name_or_path: str) -> StableDiffusionParts:
    """unet, vae, text encoder, tokenizer and the training noise scheduler of a diffusers Stable Diffusion."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    quiet_loading()
    what = "pretrained Stable Diffusion"
    check_pretrained(name_or_path)
    unet = load_pretrained(UNet2DConditionModel.from_pretrained, name_or_path, what, subfolder="unet")
    vae = load_pretrained(AutoencoderKL.from_pretrained, name_or_path, what, subfolder="vae")
    text_encoder = load_pretrained(CLIPTextModel.from_pretrained, name_or_path, what, subfolder="text_encoder")
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, what, subfolder="tokenizer")
    scheduler = load_pretrained(DDPMScheduler.from_pretrained, name_or_path, what, subfolder="scheduler")
    return StableDiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, str(name_or_path))
