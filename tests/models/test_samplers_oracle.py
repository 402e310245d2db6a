"""Every sampler, driven by a near-optimal denoiser for a one-point data distribution, must land on that point.

The denoiser knows the data is a constant image c, so the ideal noise prediction is
eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t); a small systematic error is added, as a trained network has.
Unstable sampler settings (e.g. DDPM without clipping x0 under the cosine schedule) blow this error up."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from meddiff.models.factory import ModelConfig, build_noise_scheduler
from meddiff.models.pipeline import MedDiffusionPipeline
from meddiff.sampling.generate import SamplingSettings, sample

C = 0.3  # the data point, in model range [-1, 1]


class OracleUNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, class_embed_type: str = "projection"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the module a dtype and device
        self.abar = None

    def forward(self, x, t, encoder_hidden_states=None, class_labels=None):
        abar = self.abar[t.long()].float()
        eps = (x - abar.sqrt() * C) / (1 - abar).sqrt()
        return SimpleNamespace(sample=eps * 1.01 + 0.01)


@pytest.mark.parametrize("name,steps", [("ddpm", 1000), ("ddim", 50), ("pndm", 75), ("dpm++", 20), ("dpm++", 10)])
def test_sampler_lands_on_the_data(name, steps):
    scheduler = build_noise_scheduler(ModelConfig())
    unet = OracleUNet()
    unet.abar = scheduler.alphas_cumprod
    pipe = MedDiffusionPipeline(unet=unet, scheduler=scheduler, label_names=["A"])
    pipe.set_progress_bar_config(disable=True)
    images = sample(
        pipe,
        torch.zeros(4, 2),
        SamplingSettings(steps=steps, scheduler=name, guidance=1.0, precision="fp32"),
        progress=False,
    )
    target = (C + 1) / 2
    assert abs(float(images.mean()) - target) < 0.05, (name, float(images.mean()))
    assert float(images.std()) < 0.05, (name, float(images.std()))
