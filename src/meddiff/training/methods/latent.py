"""Latent diffusion from scratch: the same diffusion method, on the latents of a trained (frozen) autoencoder.

The training images are encoded once, on the accelerator, into the latent cache (KL: posterior mean and std,
sampled afresh every step; VQ: the pre-quantisation latents; meddiff.training.latent_cache) and multiplied by the
autoencoder's measured scaling factor. The loader reads latents, never the images."""

from __future__ import annotations

import logging

import torch

from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import latent_size, load_autoencoder
from meddiff.training.latent_cache import encoded_latents, posterior_draw
from meddiff.training.methods.base import register_method
from meddiff.training.methods.diffusion import PixelDiffusion

logger = logging.getLogger(__name__)


@register_method
class LatentDiffusion(PixelDiffusion):
    name = "latent"

    def __init__(self, config, dataset, accelerator=None):
        if not config.latent.autoencoder:
            raise MeddiffError(
                "latent diffusion needs a trained autoencoder: pass --autoencoder RUN_DIR "
                "(from `meddiff train-autoencoder`)"
            )
        self._vae = load_autoencoder(config.latent.autoencoder)
        if self._vae.config.sample_size != dataset.resolution:
            raise MeddiffError(
                f"the autoencoder was trained at {self._vae.config.sample_size} px but the data is "
                f"loaded at {dataset.resolution} px; use --resolution {self._vae.config.sample_size}"
            )
        if self._vae.config.scaling_factor == 1.0:
            logger.warning("the autoencoder's scaling factor is 1.0 (not measured?); latents may be badly scaled")
        super().__init__(config, dataset, accelerator)
        self.latents = encoded_latents(self._vae, dataset, dataset.resolution, accelerator, tag="gray")
        self.scale = float(self._vae.config.scaling_factor)

    def model_space(self):
        return self._vae.config.latent_channels, latent_size(self._vae)

    device_keys = ("mean", "std")

    def batch_source(self):
        return self.latents  # the images themselves are not read: their latents are stored

    def clean_samples(self, batch, generator):
        return sample_latents(batch, self.scale, generator, self.config.latent.draw)

    def vae(self):
        return self._vae


def sample_latents(batch: dict, scale: float, generator: torch.Generator, draw: str = "sample") -> torch.Tensor:
    """Scaled latents of a batch from the latent cache (KL: a fresh draw from each stored posterior; draw "mean":
    the posterior mean)."""
    return posterior_draw(batch["mean"], batch["std"], generator, draw) * scale
