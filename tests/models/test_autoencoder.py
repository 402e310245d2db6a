"""Autoencoders for latent diffusion: 1-channel round trip, scaling factor, VQ codebook health, resume."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import (
    AutoencoderConfig,
    build_autoencoder,
    encode_moments,
    latent_size,
    load_autoencoder,
    measure_scaling_factor,
)
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train
from meddiff.training.methods.autoencoder import CodebookUsage, reset_dead_codes

TINY = dict(channels=[16, 32, 32, 32], norm_num_groups=8, codebook_size=32)


@pytest.fixture(scope="module")
def data():
    return load_dataset("phantom:?n=32&seed=2", 32)


@pytest.mark.parametrize("kind", ["vq", "kl"])
@pytest.mark.parametrize("downsample", [4, 8])
def test_round_trip_shapes_and_dtypes_for_one_channel(kind, downsample):
    vae = build_autoencoder(AutoencoderConfig(kind=kind, downsample=downsample, latent_channels=3, **TINY), 32)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    mean, std = encode_moments(vae, x)
    assert mean.shape == (2, 3, 32 // downsample, 32 // downsample) == std.shape
    assert mean.dtype == torch.float32 and latent_size(vae) == 32 // downsample
    assert (std == 0).all() if kind == "vq" else (std > 0).all()
    out = vae.decode(mean).sample
    assert out.shape == (2, 1, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_autoencoder_settings_are_one_line_errors(tmp_path):
    with pytest.raises(MeddiffError, match="not divisible"):
        build_autoencoder(AutoencoderConfig(downsample=8, **TINY), 36)
    with pytest.raises(MeddiffError, match="'kind' = 'gan' is not one of vq, kl"):
        build_autoencoder(AutoencoderConfig(kind="gan", **TINY), 32)
    with pytest.raises(MeddiffError, match="no autoencoder"):
        load_autoencoder(tmp_path)


def test_scaling_factor_makes_latents_unit_variance():
    torch.manual_seed(0)
    images = torch.rand(16, 1, 32, 32) * 2 - 1
    vae = build_autoencoder(AutoencoderConfig(kind="kl", **TINY), 32)
    factor = measure_scaling_factor(vae, images, torch.Generator().manual_seed(0))
    mean, std = encode_moments(vae, images)
    z = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))) * factor
    assert abs(float(z.std()) - 1.0) < 1e-3
    # VQ latents are the pre-quantisation encoder outputs: scale them by 5 and the factor follows
    vq = build_autoencoder(AutoencoderConfig(kind="vq", **TINY), 32)
    before = measure_scaling_factor(vq, images)
    with torch.no_grad():
        vq.quant_conv.weight *= 5
        vq.quant_conv.bias *= 5
    assert measure_scaling_factor(vq, images) == pytest.approx(before / 5, rel=1e-4)


def test_dead_codes_are_reset_from_encoder_outputs():
    emb = torch.nn.Embedding(4, 2)
    emb.weight.data = torch.tensor([[0.0, 0.0], [0.1, 0.0], [100.0, 100.0], [-100.0, 50.0]])
    usage = CodebookUsage(4)
    vectors = torch.randn(64, 2) * 0.1
    for _ in range(3):
        indices = torch.argmin(torch.cdist(vectors, emb.weight), dim=1)
        share, perplexity = usage.update(indices)
    assert share == 0.5 and 1.0 <= perplexity <= 2.0  # codes 2 and 3 are far away and never chosen
    assert usage.dead(3).tolist() == [2, 3]
    n = reset_dead_codes(emb, usage, vectors, 3, torch.Generator().manual_seed(0))
    assert n == 2 and usage.resets == 2 and usage.dead(1).numel() == 0
    assert all(any(torch.equal(emb.weight[k], v) for v in vectors) for k in (2, 3))  # now real encoder outputs
    assert torch.equal(emb.weight[0], torch.tensor([0.0, 0.0]))  # live codes untouched


def _ae_config(out, **kw):
    base = dict(
        data="x",
        out=str(out),
        method="autoencoder",
        batch_size=8,
        checkpoint_every=0,
        lr_warmup_steps=1,
        learning_rate=5e-4,
        autoencoder=AutoencoderConfig(
            kind="vq", downsample=4, dead_code_steps=2, adversarial_weight=0.1, adversarial_start=2, **TINY
        ),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_vq_training_logs_codebook_health_and_resumes_exactly(tmp_path, data):
    straight = train(_ae_config(tmp_path / "a", max_steps=6, log_every=1), data, progress=False)
    train(_ae_config(tmp_path / "b", max_steps=3, log_every=1), data, progress=False)
    train(_ae_config(tmp_path / "b", max_steps=6, log_every=1, resume="latest"), data, progress=False)
    for name in (
        "checkpoints/step-0000006/model.safetensors",
        "checkpoints/step-0000006/model_1.safetensors",
        "autoencoder/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # autoencoder and discriminator
    state = json.loads((tmp_path / "a" / "checkpoints/step-0000006/state.json").read_text())
    metrics = dict(state["metrics_history"])[6]
    assert {"codebook_usage", "perplexity", "dead_codes_reset", "adversarial", "discriminator"} <= set(metrics)
    assert state["method"]["codebook"]["resets"] > 0  # a 32-code book on 32 images has dead codes to reset
    assert straight.steps == 6
    vae = load_autoencoder(tmp_path / "a")
    assert vae.config.scaling_factor != 1.0 and vae.config.in_channels == 1


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_kl_autoencoder_learns_to_reconstruct(tmp_path, data):
    cfg = _ae_config(
        tmp_path, max_steps=40, learning_rate=2e-3, autoencoder=AutoencoderConfig(kind="kl", downsample=4, **TINY)
    )
    result = train(cfg, data, progress=False)
    first, last = result.loss_history[0][1], result.loss_history[-1][1]
    assert last < 0.6 * first


def test_vq_reconstruction_report_counts_codes(tmp_path, data):
    from meddiff.evaluation.autoencoder_report import autoencoder_report

    vae = build_autoencoder(AutoencoderConfig(kind="vq", downsample=4, **TINY), 32)
    report = autoencoder_report(vae, data, tmp_path, {"steps": 0})
    assert report["kind"] == "vq" and report["codebook_size"] == 32
    assert 1 <= report["codebook_used"] <= 32 and 1.0 <= report["perplexity"] <= report["codebook_used"] + 1e-6
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["codebook_used"] == report["codebook_used"] and saved["training"] == {"steps": 0}
    # the grid: originals above reconstructions above |difference| x 4, one column per shown image
    from PIL import Image

    from meddiff.evaluation.autoencoder_report import reconstruct, showcase_indices

    show = showcase_indices(data)
    r, up = 32, 3  # 96 // 32
    with Image.open(tmp_path / "reconstructions.png") as im:
        grid = np.asarray(im, dtype=np.float32) / 255
    assert grid.shape == ((3 * (r + 2) + 2) * up, (len(show) * (r + 2) + 2) * up)
    recon, _ = reconstruct(vae, data.images[show])

    def cell(row, col):  # one image of the grid at its original size (every `up`-th pixel)
        top, left = (2 + row * (r + 2)) * up, (2 + col * (r + 2)) * up
        return grid[top : top + r * up : up, left : left + r * up : up]

    originals = (data.images[show, 0].numpy() + 1) / 2
    for col in (0, len(show) - 1):
        np.testing.assert_allclose(cell(0, col), originals[col], atol=1 / 255 + 1e-6)
        np.testing.assert_allclose(cell(1, col), recon[col], atol=1 / 255 + 1e-6)
        np.testing.assert_allclose(cell(2, col), np.clip(np.abs(originals[col] - recon[col]) * 4, 0, 1), atol=2 / 255)


def test_report_on_a_held_out_set_larger_than_it_measures_spreads_over_every_class(tmp_path):
    """A held-out split stored class by class and larger than max_images: the report measures images from every
    class (not the first class only) and its grid shows only images it measured (was an IndexError)."""
    from meddiff.data.dataset import ImageLabelDataset
    from meddiff.evaluation.autoencoder_report import autoencoder_report, showcase_indices, spread_indices

    n, r = 40, 32
    images = torch.rand(n, 1, r, r) * 2 - 1
    labels = torch.zeros(n, 2)
    labels[:30, 0], labels[30:, 1] = 1, 1  # class A first, the rarer class B stored last
    heldout = ImageLabelDataset(images, labels, torch.ones(n, 2, dtype=torch.bool), ["A", "B"], multiclass=True)
    measured = spread_indices(n, 8)
    assert len(measured) == 8 and measured[0] == 0 and measured[-1] == n - 1 and (np.diff(measured) > 0).all()
    assert (spread_indices(5, 8) == np.arange(5)).all()
    show = showcase_indices(heldout, among=measured.tolist())
    assert set(show) <= set(measured.tolist()) and any(i >= 30 for i in show)
    vae = build_autoencoder(AutoencoderConfig(kind="kl", downsample=4, **TINY), r)
    report = autoencoder_report(vae, heldout, tmp_path, {"steps": 0}, max_images=8)
    assert report["heldout_images"] == 8 and np.isfinite(report["psnr"])
    assert (tmp_path / "reconstructions.png").is_file()
