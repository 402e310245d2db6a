"""Latent diffusion: tiny models with labels, text, both or no conditioning train, save, reload with plain
diffusers and sample; guidance behaves; text models run through diffusers' StableDiffusionPipeline."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import AutoencoderConfig
from meddiff.models.factory import ModelConfig
from meddiff.models.storage import load_pipeline
from meddiff.sampling.generate import SamplingSettings, prompts_from_conditions, sample
from meddiff.training.config import LatentConfig, TrainConfig
from meddiff.training.loop import train
from meddiff.training.methods.latent import LatentDiffusion

DATA = "phantom:?n=32&seed=4"
UNET = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=8)


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA, 32)


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory, data):
    out = {}
    for kind in ("kl", "vq"):
        root = tmp_path_factory.mktemp(f"ae_{kind}")
        cfg = TrainConfig(
            data=DATA,
            out=str(root),
            method="autoencoder",
            batch_size=8,
            max_steps=2,
            checkpoint_every=0,
            autoencoder=AutoencoderConfig(
                kind=kind, downsample=4, channels=[16, 32, 32], norm_num_groups=8, codebook_size=32
            ),
        )
        train(cfg, data, progress=False)
        out[kind] = root
    return out


def _latent(out, autoencoder, conditioning, **kw):
    base = dict(
        data=DATA,
        out=str(out),
        method="latent",
        conditioning=conditioning,
        batch_size=8,
        max_steps=2,
        checkpoint_every=0,
        lr_warmup_steps=1,
        latent=LatentConfig(autoencoder=str(autoencoder)),
        model=UNET,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory, autoencoders, data):
    runs = {}
    for kind, conditioning in [("kl", "labels"), ("kl", "text"), ("vq", "both"), ("vq", "none")]:
        root = tmp_path_factory.mktemp(f"ld_{kind}_{conditioning}")
        train(_latent(root, autoencoders[kind], conditioning), data, progress=False)
        runs[(kind, conditioning)] = root
    return runs


def test_latents_are_scaled_by_the_measured_factor(autoencoders, data):
    method = LatentDiffusion(_latent("unused", autoencoders["kl"], "none"), data)
    batch = method.batch(torch.arange(len(data)), "cpu")
    assert "image" not in batch and batch["mean"].dtype == torch.float16  # latents only, stored in fp16
    z = method.clean_samples(batch, torch.Generator().manual_seed(0))
    assert method.scale != 1.0 and z.shape == (len(data), 4, 8, 8)
    assert 0.7 < float(z.std()) < 1.3  # unit variance on the training data


def test_latents_are_encoded_once_and_match_the_autoencoder(autoencoders, data, monkeypatch, tmp_path):
    from meddiff.models.autoencoder import encode_moments, load_autoencoder
    from meddiff.training import latent_cache

    # a cache of its own: other tests on this worker may already have stored latents of an identical (seeded,
    # deterministic) VQ autoencoder under the same key, which made "another autoencoder is another key" pass or fail
    # with the order the tests ran in
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))

    first = LatentDiffusion(_latent("unused", autoencoders["kl"], "none"), data)
    mean, std = encode_moments(load_autoencoder(autoencoders["kl"]), data.images[:8])
    stored = first.batch(torch.arange(8), "cpu")
    assert torch.allclose(stored["mean"].float(), mean, atol=2e-3, rtol=2e-3)
    assert torch.allclose(stored["std"].float(), std, atol=2e-3, rtol=2e-3)

    def no_encoding(*a, **k):
        raise AssertionError("encoded again instead of reading the latent cache")

    monkeypatch.setattr(latent_cache, "encode_moments", no_encoding)
    again = LatentDiffusion(_latent("unused", autoencoders["kl"], "none"), data)  # a second run, a resume
    assert torch.equal(again.batch(torch.arange(8), "cpu")["mean"], stored["mean"])
    vq = autoencoders["vq"]
    with pytest.raises(AssertionError, match="encoded again"):  # another autoencoder is another key
        LatentDiffusion(_latent("unused", vq, "none"), data)


@pytest.mark.parametrize(
    "key",
    [("kl", "labels")]  # the fast lane keeps one latent model; the others run in the full lane
    + [pytest.param(k, marks=pytest.mark.slow) for k in [("kl", "text"), ("vq", "both"), ("vq", "none")]],
)
def test_tiny_latent_models_reload_with_plain_diffusers_and_sample(latent_runs, key):
    folder = latent_runs[key] / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(pipe.vae).__name__ == {"kl": "AutoencoderKL", "vq": "VQModel"}[key[0]]
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == 8
    kwargs = {}
    if key[1] in ("labels", "both"):
        kwargs["conditions"] = pipe.encode_labels([["Cardiomegaly"], []])
    if key[1] in ("text", "both"):
        kwargs["prompt"] = ["chest x-ray with cardiomegaly", ""]
    images = pipe(num_images=2, num_inference_steps=2, guidance_scale=2.0, **kwargs).images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()  # decoded to 1-channel pixels
    assert pipe.supports_prompts == (key[1] in ("text", "both"))
    assert pipe.supports_labels == (key[1] in ("labels", "both"))


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_text_model_runs_in_diffusers_stable_diffusion_pipeline(latent_runs):
    folder = latent_runs[("kl", "text")] / "pipeline"
    sd = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.set_progress_bar_config(disable=True)
    prompt = ["chest x-ray with pleural effusion"]
    a = sd(
        prompt, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    ours = load_pipeline(folder)
    ours.scheduler = sd.scheduler
    seeded = torch.Generator().manual_seed(0)
    b = ours(prompt=prompt, num_inference_steps=3, guidance_scale=3.0, generator=seeded).images
    assert a.shape == (1, 32, 32, 1) and np.allclose(a, b, atol=1e-5)


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
@pytest.mark.parametrize("key", [("kl", "labels"), ("kl", "text")])
def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_prediction(latent_runs, key):
    pipe = load_pipeline(latent_runs[key])
    text = key[1] == "text"
    cond = {"prompt": ["chest x-ray with edema"]} if text else {"conditions": pipe.encode_labels([["Edema"]])}
    null = {"prompt": [""]} if text else {"conditions": torch.zeros(1, 2 * len(pipe.label_names))}

    def run(scale, kwargs):
        return pipe(
            num_inference_steps=3,
            guidance_scale=scale,
            generator=torch.Generator().manual_seed(1),
            output_type="pt",
            **kwargs,
        ).images

    conditional = run(1.0, cond)  # one forward pass per step, conditional only
    batched = run(1.0 + 1e-6, cond)  # the batched guidance path with (null, cond) inputs
    assert torch.allclose(conditional, batched, atol=1e-4)
    assert torch.allclose(run(0.0, cond), run(1.0, null), atol=1e-4)
    assert not torch.allclose(run(4.0, cond), conditional, atol=1e-3)


def test_text_models_take_prompts_built_from_labels(latent_runs):
    pipe = load_pipeline(latent_runs[("kl", "text")])
    cond = pipe.encode_labels([["Cardiomegaly", "Pleural Effusion"], []])
    cond[1] = 0  # unconditional row
    assert prompts_from_conditions(cond, pipe.label_names) == ["chest x-ray with cardiomegaly and pleural effusion", ""]
    settings = SamplingSettings(steps=2, precision="fp32")
    from_labels = sample(pipe, cond[:1], settings, progress=False)
    from_prompt = sample(
        pipe, cond[:1], settings, progress=False, prompts=["chest x-ray with cardiomegaly and pleural effusion"]
    )
    assert np.array_equal(from_labels, from_prompt)
    with pytest.raises(MeddiffError, match="not text-conditioned"):
        sample(load_pipeline(latent_runs[("kl", "labels")]), cond[:1], settings, progress=False, prompts=["x"])


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_trainable_text_encoder_changes_and_is_saved(tmp_path, autoencoders, data):
    from meddiff.conditioning.text import TextConfig, load_text_encoder

    cfg = _latent(tmp_path, autoencoders["kl"], "text", text=TextConfig(train_encoder=True), learning_rate=1e-3)
    train(cfg, data, progress=False)
    _, original = load_text_encoder(TextConfig())
    trained = load_pipeline(tmp_path).text_encoder
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert changed  # the encoder was trained and exported


def test_latent_errors_are_one_line(tmp_path, autoencoders, data):
    with pytest.raises(MeddiffError, match="needs a trained autoencoder"):
        LatentDiffusion(_latent(tmp_path, "", "labels"), data)
    with pytest.raises(MeddiffError, match="trained at 32 px"):
        LatentDiffusion(_latent(tmp_path, autoencoders["kl"], "labels"), load_dataset(DATA, 64))
    with pytest.raises(MeddiffError, match="'conditioning' = 'captions' is not one of labels, text, both, none"):
        LatentDiffusion(_latent(tmp_path, autoencoders["kl"], "captions"), data)


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_latent_text_training_resumes_exactly(tmp_path, autoencoders, data):
    from safetensors.torch import load_file

    train(_latent(tmp_path / "a", autoencoders["kl"], "both", max_steps=4), data, progress=False)
    train(_latent(tmp_path / "b", autoencoders["kl"], "both", max_steps=2), data, progress=False)
    train(_latent(tmp_path / "b", autoencoders["kl"], "both", max_steps=4, resume="latest"), data, progress=False)
    for name in ("checkpoints/step-0000004/model.safetensors", "checkpoints/step-0000004/ema.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sample_latents_draws_from_the_posterior_or_takes_its_mean():
    import torch

    from meddiff.training.methods.latent import sample_latents

    batch = {"mean": torch.full((2, 4, 3, 3), 2.0), "std": torch.full((2, 4, 3, 3), 0.5)}
    mean = sample_latents(batch, 0.5, torch.Generator().manual_seed(0), "mean")
    assert torch.equal(mean, torch.full((2, 4, 3, 3), 1.0))
    a, b = (sample_latents(batch, 0.5, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert not torch.equal(a, b) and abs(float(a.mean()) - 1.0) < 0.2 and 0.1 < float(a.std()) < 0.4
