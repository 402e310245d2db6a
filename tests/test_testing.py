"""meddiff.testing: the tiny offline Stable Diffusion is a real diffusers folder that the product code loads."""

from __future__ import annotations

import json

import torch

import meddiff.models.stable_diffusion as stable_diffusion
from meddiff.models.stable_diffusion import load_stable_diffusion
from meddiff.testing import build_tiny_stable_diffusion, write_clip_tokenizer


def test_tiny_stable_diffusion_loads_as_a_pretrained_model(tmp_path):
    base = build_tiny_stable_diffusion(tmp_path / "sd", image_size=32, seed=1)
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert not (base / "_tokenizer_build").exists()  # the scratch folder is removed
    parts = load_stable_diffusion(str(base))
    assert parts.unet.config.sample_size == 8 and parts.unet.config.cross_attention_dim == 32  # f=4 latents
    assert parts.vae.config.scaling_factor == 0.18215 and parts.scheduler.config.beta_schedule == "scaled_linear"
    ids = parts.tokenizer("a chest x-ray", padding="max_length", max_length=32, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = parts.text_encoder(ids)[0]
    assert hidden.shape == (1, 32, 32)
    again = load_stable_diffusion(str(build_tiny_stable_diffusion(tmp_path / "sd2", image_size=32, seed=1)))
    assert all(torch.equal(a, b) for a, b in zip(parts.unet.parameters(), again.unet.parameters()))  # seeded


def test_offline_tokenizer_round_trips_text(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path / "tok", max_length=16)
    ids = tokenizer("chest x ray").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 5  # its merges make "chest" and "ray" one token each
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "chest x ray"


def test_builders_are_not_in_product_modules():
    for name in ("build_tiny_stable_diffusion", "write_clip_tokenizer", "save_stable_diffusion"):
        assert not hasattr(stable_diffusion, name), name
