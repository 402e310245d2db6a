"""Autoencoders for latent diffusion: diffusers' VQModel (VQ-VAE) or AutoencoderKL, 1 channel in and out.

The latent scaling factor (1 / standard deviation of the training data's latents) is measured after training and
saved in the model's config (`scaling_factor`), because a diffusion model trained on badly scaled latents samples
noise: diffusers' default 0.18215 belongs to Stable Diffusion's VAE, not to ours."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, VQModel

from meddiff.errors import MeddiffError
from meddiff.options import Options, option

KINDS = ("vq", "kl")
AUTOENCODER_DIR = "autoencoder"


@dataclass
class AutoencoderConfig(Options):
    kind: Literal["vq", "kl"] = option("kl", "VQ-VAE (vq) or KL autoencoder (kl)")
    downsample: Literal[2, 4, 8, 16] = option(4, "spatial factor between image and latent")
    latent_channels: int = option(4, "latent channels", minimum=1)
    channels: list[int] = option([32, 64, 128, 128], "channels per level (comma-separated); the first levels are used")
    layers_per_block: int = option(1, "residual blocks per level", minimum=1)
    norm_num_groups: int = option(16, "GroupNorm groups", minimum=1)
    mid_attention: bool | None = option(
        None, "attention in the middle block; null: only when the latent is at most 16 px wide (CPU)"
    )
    codebook_size: int = option(512, "VQ: number of codebook entries", minimum=2)
    commitment_weight: float = option(1.0, "VQ: scales diffusers' codebook + 0.25 * commitment term", minimum=0)
    dead_code_steps: int = option(
        100, "VQ: a code unused for this many steps is re-initialised from encoder outputs", minimum=0
    )
    kl_weight: float = option(1e-6, "KL: weight of the KL term", minimum=0)
    reconstruction_loss: Literal["l1", "mse"] = option("l1", "pixel reconstruction loss")
    adversarial_weight: float = option(0.0, "> 0 adds a patch-discriminator loss", minimum=0)
    adversarial_start: int = option(2000, "step from which the adversarial loss counts (warm-up)", minimum=0)
    discriminator_lr: float = option(2e-4, "discriminator learning rate", above=0)
    perceptual_weight: float = option(
        0.0, "> 0 adds LPIPS (needs the optional lpips package and its weights on disk)", minimum=0
    )
    scale_samples: int = option(512, "training images used to measure the latent scaling factor", minimum=1)

    def levels(self) -> int:
        if self.downsample not in (1, 2, 4, 8, 16):
            raise MeddiffError(f"autoencoder downsample must be 2, 4, 8 or 16, got {self.downsample}")
        return int(math.log2(self.downsample)) + 1


def build_autoencoder(cfg: AutoencoderConfig, resolution: int):
    if cfg.kind not in KINDS:
        raise MeddiffError(f"autoencoder kind must be vq or kl, got {cfg.kind!r}")
    levels = cfg.levels()
    if len(cfg.channels) < levels:
        raise MeddiffError(f"downsample {cfg.downsample} needs {levels} channel levels, got {cfg.channels}")
    if resolution % cfg.downsample:
        raise MeddiffError(f"resolution {resolution} is not divisible by the downsample factor {cfg.downsample}")
    channels = tuple(cfg.channels[:levels])
    latent_size = resolution // cfg.downsample
    mid_attention = cfg.mid_attention if cfg.mid_attention is not None else latent_size <= 16
    common = dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=resolution,
        scaling_factor=1.0,
        mid_block_add_attention=mid_attention,
    )
    if cfg.kind == "vq":
        return VQModel(num_vq_embeddings=cfg.codebook_size, **common)
    return AutoencoderKL(**common)


def is_vq(vae) -> bool:
    return isinstance(vae, VQModel)


def vq_round_trip(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VQ model: (reconstruction, codebook + commitment loss, chosen code indices, pre-quantisation latents)."""
    h = vae.encode(x).latents
    quant, codebook_loss, (_, _, indices) = vae.quantize(h)
    return vae.decode(quant, force_not_quantize=True).sample, codebook_loss, indices, h


def codebook_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of code usage counts: the effective number of codes in use."""
    p = counts[counts > 0].double() / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def latent_size(vae) -> int:
    return vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)


def encode_moments(vae, images: torch.Tensor, batch_size: int = 64, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latents of images in [-1, 1]: (mean, std). VQ models give their pre-quantisation latents and std 0
    (the decoder quantises); KL models their posterior mean and standard deviation."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(vae.device, vae.dtype)
            if is_vq(vae):
                mean = vae.encode(x).latents
                std = torch.zeros_like(mean)
            else:
                dist = vae.encode(x).latent_dist
                mean, std = dist.mean, dist.std
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
            if progress is not None:
                progress(x.shape[0])
    return torch.cat(means), torch.cat(stds)


def measure_scaling_factor(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """1 / std of the latents the diffusion model will see (KL: posterior samples), so they have unit variance."""
    mean, std = encode_moments(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=generator)
    s = float(z.std())
    if not math.isfinite(s) or s <= 0:
        raise MeddiffError("the autoencoder's latents have zero or non-finite spread; it did not train")
    return 1.0 / s


def load_autoencoder(path: str | Path):
    """A trained autoencoder: a run directory (holding autoencoder/) or the model folder itself."""
    path = Path(path).expanduser()
    folder = path / AUTOENCODER_DIR if (path / AUTOENCODER_DIR).is_dir() else path
    config = folder / "config.json"
    if not config.is_file():
        raise MeddiffError(f"{path} holds no autoencoder (no config.json); train one with `meddiff train-autoencoder`")
    import json

    cls_name = json.loads(config.read_text()).get("_class_name")
    cls = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}.get(cls_name)
    if cls is None:
        raise MeddiffError(f"{folder} holds a {cls_name}, not a VQModel or AutoencoderKL")
    if not any(folder.glob("*.safetensors")):
        raise MeddiffError(f"{folder} has no weights (*.safetensors); the autoencoder run did not finish")
    vae = cls.from_pretrained(folder)
    if vae.config.in_channels != 1:
        raise MeddiffError(f"{folder} is a {vae.config.in_channels}-channel autoencoder; meddiff latent models need 1")
    vae.requires_grad_(False).eval()
    return vae
