"""Latent diffusion from scratch: the same diffusion method, on the latents of a trained (frozen) autoencoder.

The training images are encoded once (KL: posterior mean and std, sampled afresh every step; VQ: the
pre-quantisation latents) and multiplied by the autoencoder's measured scaling factor."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import encode_moments, latent_size, load_autoencoder
from meddiff.training.methods.base import register_method
from meddiff.training.methods.diffusion import PixelDiffusion


@register_method
class LatentDiffusion(PixelDiffusion):
    name = "latent"

    def __init__(self, config, dataset):
        if not config.latent.autoencoder:
            raise MeddiffError("latent diffusion needs a trained autoencoder: pass --autoencoder RUN_DIR "
                               "(from `meddiff train-autoencoder`)")
        self._vae = load_autoencoder(config.latent.autoencoder)
        if self._vae.config.sample_size != dataset.resolution:
            raise MeddiffError(f"the autoencoder was trained at {self._vae.config.sample_size} px but the data is "
                               f"loaded at {dataset.resolution} px; use --resolution {self._vae.config.sample_size}")
        if self._vae.config.scaling_factor == 1.0:
            print("warning: the autoencoder's scaling factor is 1.0 (not measured?); latents may be badly scaled")
        super().__init__(config, dataset)
        bar = tqdm(total=len(dataset), desc="encode latents", unit="img", dynamic_ncols=True, leave=False)
        self.mean, self.std = encode_moments(self._vae, dataset.images, progress=bar.update)
        bar.close()
        self.scale = float(self._vae.config.scaling_factor)

    def model_space(self):
        return self._vae.config.latent_channels, latent_size(self._vae)

    def clean_samples(self, batch, generator):
        idx = batch["index"]
        mean, std = self.mean[idx], self.std[idx]
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scale

    def batch(self, index, device):
        # the images themselves are not needed: their latents are in memory
        return {"index": index, "labels": self.dataset.labels[index], "known": self.dataset.known[index]}

    def vae(self):
        return self._vae
