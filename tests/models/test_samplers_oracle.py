"""Every sampler, driven by a near-optimal denoiser for a one-point data distribution, must land on that point.

The denoiser knows the data is a constant image c, so the ideal noise prediction is
eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t); a small systematic error is added, as a trained network has.
Unstable sampler settings (e.g. DDPM without clipping x0 under the cosine schedule) blow this error up.
For the flow objective the ideal velocity at noise level s = t / T is (x_t - c) / s."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from meddiff.errors import MeddiffError
from meddiff.models.factory import FLOW_SAMPLERS, ModelConfig, build_noise_scheduler, make_sampler
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


class FlowOracleUNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1, class_embed_type: str = "projection"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, x, t, encoder_hidden_states=None, class_labels=None):
        self.calls += 1
        s = (t.float() / 1000).clamp(min=1e-3).reshape(-1, 1, 1, 1) if torch.is_tensor(t) else max(t / 1000, 1e-3)
        velocity = (x - C) / s
        return SimpleNamespace(sample=velocity * 1.01 + 0.01)


DIFFUSION_SETTINGS = [
    ("ddpm", 1000),
    ("ddim", 50),
    ("pndm", 75),
    ("dpm++", 20),
    ("dpm++", 10),
    ("dpm++3", 10),
    ("unipc", 10),
    ("euler", 20),
]


@pytest.mark.parametrize("name,steps", DIFFUSION_SETTINGS)
def test_sampler_lands_on_the_data(name, steps):
    scheduler = build_noise_scheduler(ModelConfig())
    unet = OracleUNet()
    unet.abar = scheduler.alphas_cumprod
    _assert_lands(MedDiffusionPipeline(unet=unet, scheduler=scheduler, label_names=["A"]), name, steps)


@pytest.mark.parametrize("name,steps", [("euler", 4), ("heun", 2), ("dpm++", 4), ("dpm++3", 4), ("unipc", 4)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sampler_lands_on_the_data(name, steps, shift):
    """A flow-objective model samples with the flow form of each sampler; with an exact velocity field the path
    is a straight line, so even a few steps land on the data."""
    scheduler = build_noise_scheduler(ModelConfig(objective="flow", flow_shift=shift))
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    unet = FlowOracleUNet()
    _assert_lands(MedDiffusionPipeline(unet=unet, scheduler=scheduler, label_names=["A"]), name, steps)
    expected = (2 * steps - 1) if name == "heun" else steps  # Heun: two evaluations a step except the last
    assert unet.calls == expected


def test_flow_model_refuses_noise_schedule_samplers():
    config = build_noise_scheduler(ModelConfig(objective="flow")).config
    with pytest.raises(MeddiffError, match="flow-matching model"):
        make_sampler("ddim", config)
    with pytest.raises(MeddiffError, match="for flow-matching models"):
        make_sampler("heun", build_noise_scheduler(ModelConfig()).config)
    # a sampler built from a flow sampler's config is still a flow sampler (sample() rebuilds from the last one)
    for name in FLOW_SAMPLERS:
        again = make_sampler("euler", make_sampler(name, config).config)
        assert type(again).__name__ == "FlowMatchEulerDiscreteScheduler", name


def _assert_lands(pipe, name, steps):
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
