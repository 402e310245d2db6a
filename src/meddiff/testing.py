"""Tiny offline models for tests and examples.

Randomly initialised, seconds to build, no download: a Stable-Diffusion-architecture pipeline folder stands in for
a hub model wherever one is expected (fine-tuning, generation, serving). Not for real use: their outputs are noise.

    from meddiff.testing import build_tiny_stable_diffusion
    base = build_tiny_stable_diffusion("tiny_sd")  # then: meddiff finetune --pretrained tiny_sd ...
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_tiny_stable_diffusion", "save_stable_diffusion", "write_clip_tokenizer"]


def write_clip_tokenizer(folder: str | Path, max_length: int = 77):
    """A CLIP BPE tokenizer with a byte-level vocabulary and a few merges, made offline (no hub download)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_symbols()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["c h", "e s", "r a", "ra y</w>", "ch es", "ches t</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    pairs = [tuple(m.split()) for m in merges]  # the tokenizers backend takes pairs (the annotation says str)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=max_length)  # type: ignore[arg-type]
    tokenizer.save_pretrained(folder)
    return tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes: printable Latin-1 bytes stand for themselves,
    the others are shifted above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted, symbols = 0, {}
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def save_stable_diffusion(out_dir: str | Path, *, unet, vae, text_encoder, tokenizer) -> Path:
    """Assemble SD v1 parts with v1's training scheduler (scaled-linear betas, no safety checker) and save them as
    a plain diffusers StableDiffusionPipeline folder."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates it as required; None is supported
        feature_extractor=None,  # type: ignore[arg-type]  # likewise
        requires_safety_checker=False,
    )
    pipe.save_pretrained(Path(out_dir), safe_serialization=True)
    return Path(out_dir)


def build_tiny_stable_diffusion(out_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised Stable-Diffusion-architecture pipeline (RGB VAE with f=4, CLIP text model, tiny
    U-Net), saved as a plain diffusers StableDiffusionPipeline folder: the offline stand-in for a hub model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "_tokenizer_build", max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=0.18215,
    )
    with torch.no_grad():  # like a trained VAE: a sharp posterior (std ~ 0.01), so latents carry the image
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -9.0
    unet = UNet2DConditionModel(
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    save_stable_diffusion(out_dir, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    shutil.rmtree(out_dir / "_tokenizer_build", ignore_errors=True)
    return out_dir
