"""MedDiffusionPipeline: pixel or latent diffusion conditioned on labels, text prompts, both, or nothing,
with classifier-free guidance.

This file depends only on torch and diffusers and is copied next to every saved model as `pipeline.py`,
so a model trained by meddiff loads with plain diffusers:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(conditions=pipe.encode_labels([["Cardiomegaly"]]), guidance_scale=2.0).images   # labels
    images = pipe(prompt=["chest x-ray with cardiomegaly"], guidance_scale=3.0).images              # text

Components: `unet` and `scheduler` always; `vae` (diffusers AutoencoderKL or VQModel) for latent models, whose
`config.scaling_factor` was measured on the training data; `text_encoder` + `tokenizer` (any transformers
encoder) for text-conditioned models. A text-conditioned model with a KL autoencoder and no label conditioning
also loads with diffusers' StableDiffusionPipeline.

Label conditioning: a condition vector has two entries per label name, (present * known, known); the zero
vector is "no condition". Text conditioning: the null condition is the empty prompt (as in Stable Diffusion).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel, VQModel
from diffusers.utils.torch_utils import randn_tensor


def encode_condition(labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(B, K) labels and (B, K) known mask -> (B, 2K) condition vectors."""
    k = known.to(torch.float32)
    return torch.cat([(labels > 0.5).to(torch.float32) * k, k], dim=1)


def encode_prompt(
    tokenizer: Any, text_encoder: Any, prompts: list, device: str | torch.device | None = None
) -> torch.Tensor:
    """Prompts -> (B, T, D) hidden states, exactly as Stable Diffusion does it (padded to the tokenizer's
    model_max_length, truncated, last hidden state; the attention mask only where the encoder's config asks)."""
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = device if device is not None else text_encoder.device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: scale 1 is the conditional prediction, 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


def guidance_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance scales -> (B, dim) sinusoidal features, the `timestep_cond` of a U-Net built with
    `time_cond_proj_dim` (a distilled student takes the guidance scale as an input: one network evaluation per
    step instead of a conditional and an unconditional one)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    angles = scale.float().reshape(-1, 1) * 1000.0 * freqs.reshape(1, -1)
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


class Sampler(Protocol):
    """What sampling uses of a diffusers scheduler (DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler, flow matching,
    LCM...). Flow-matching schedulers have no `init_noise_sigma` or `scale_model_input`: the pipeline treats them
    as 1 and the identity."""

    timesteps: torch.Tensor
    set_timesteps: Callable[..., None]
    step: Callable[..., Any]  # -> an output with .prev_sample

    @property
    def config(self) -> Any: ...


class MedDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"  # type: ignore[assignment]  # diffusers types it as None
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    # the modules register_modules sets (declared for type checkers only; no class attributes are created)
    unet: UNet2DConditionModel
    scheduler: Sampler
    vae: AutoencoderKL | VQModel | None
    text_encoder: torch.nn.Module | None  # any transformers text encoder
    tokenizer: Any  # any transformers tokenizer

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        label_names: list | None = None,
        phased_steps: int = 0,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(label_names=list(label_names or []), phased_steps=int(phased_steps))

    @property
    def label_names(self) -> list:
        return list(self.config["label_names"] or [])

    @property
    def phased_steps(self) -> int:
        """A phased-consistency student (`meddiff distill --distill.consistency phased`): the steps it samples in,
        with its own DDIM scheduler; 0 for every other model."""
        return int(self.config.get("phased_steps") or 0)

    @property
    def supports_labels(self) -> bool:
        return self.unet.config["class_embed_type"] is not None

    @property
    def supports_prompts(self) -> bool:
        return getattr(self, "text_encoder", None) is not None

    @property
    def is_latent(self) -> bool:
        return getattr(self, "vae", None) is not None

    @property
    def guidance_dim(self) -> int | None:
        """Width of the guidance-scale input of a distilled U-Net (None: guidance takes a second network pass)."""
        return getattr(self.unet.config, "time_cond_proj_dim", None)

    @property
    def image_size(self) -> int:
        """Width of the generated images in pixels."""
        if self.is_latent:
            assert self.vae is not None
            return int(self.vae.config["sample_size"])
        return int(self.unet.config["sample_size"])

    def encode_labels(self, present: list, unspecified: str = "absent") -> torch.Tensor:
        """[["Cardiomegaly", "Pleural Effusion"], []] -> (B, 2K) conditions. Other labels are known-absent
        (unspecified='absent') or left unspecified ('unknown')."""
        names = {n.lower(): k for k, n in enumerate(self.label_names)}
        labels = torch.zeros(len(present), len(names))
        for i, row in enumerate(present):
            for name in row:
                if name.lower() not in names:
                    raise ValueError(f"unknown label {name!r}; known: {self.label_names}")
                labels[i, names[name.lower()]] = 1.0
        known = torch.ones_like(labels, dtype=torch.bool) if unspecified == "absent" else labels > 0
        return encode_condition(labels, known)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space sample -> 1-channel image in [-1, 1] (identity for pixel models)."""
        if not self.is_latent:
            return latents
        assert self.vae is not None
        z = latents.to(self.vae.dtype) / self.vae.config["scaling_factor"]
        images = self.vae.decode(z).sample
        if images.shape[1] == 3:  # an RGB autoencoder (pretrained Stable Diffusion): back to 1-channel grayscale
            images = images.mean(dim=1, keepdim=True)
        return images

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """1-channel images in [0, 1] -> model space (scaled latents for latent models, [-1, 1] pixels otherwise)."""
        x = images.to(device=self._execution_device, dtype=self.unet.dtype) * 2 - 1
        if not self.is_latent:
            return x
        assert self.vae is not None
        x = x.to(self.vae.dtype)
        if self.vae.config.get("in_channels", 1) == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        encoded = self.vae.encode(x)
        z = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return (z * self.vae.config["scaling_factor"]).to(self.unet.dtype)

    @torch.no_grad()
    def null_inputs(self, batch: int, negative_prompt: list | None = None) -> dict:
        """The U-Net's unconditional inputs for `batch` images, what classifier-free guidance contrasts against:
        all-zero label vectors, the empty (or the negative) prompt, and for a distilled student guidance scale 1."""
        device, dtype = self._execution_device, self.unet.dtype
        kwargs: dict = {"encoder_hidden_states": None, "class_labels": None}
        if self.supports_labels:
            kwargs["class_labels"] = torch.zeros(batch, 2 * len(self.label_names), device=device, dtype=dtype)
        if self.supports_prompts:
            assert self.text_encoder is not None
            prompts = list(negative_prompt) if negative_prompt is not None else [""] * batch
            kwargs["encoder_hidden_states"] = encode_prompt(self.tokenizer, self.text_encoder, prompts, device).to(
                dtype
            )
        if self.guidance_dim is not None:
            scale = torch.ones(batch)
            kwargs["timestep_cond"] = guidance_embedding(scale, self.guidance_dim).to(device=device, dtype=dtype)
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        conditions: torch.Tensor | None = None,
        prompt: str | list | None = None,
        negative_prompt: str | list | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 2.0,
        generator: torch.Generator | list | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step: Callable | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
    ):
        """callback_on_step(index, timestep, sample) is called after every denoising step with the current
        model-space sample (latents for latent models), e.g. to record a denoising animation.

        init_images ((N, 1, H, W) in [0, 1]) with strength s in (0, 1]: start from those images noised to the
        timestep a fraction s into the schedule and denoise from there (image-to-image; the privacy gate's
        model-made near-copies). The schedule keeps its `num_inference_steps` spacing, so about s x that many run.
        num_inference_steps defaults to a phased student's own step count, else 20."""
        if num_inference_steps is None:
            num_inference_steps = self.phased_steps or 20
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt is not None and not self.supports_prompts:
            raise ValueError("this model is not text-conditioned; pass label conditions instead of a prompt")
        if num_images is None:
            if conditions is not None:
                num_images = conditions.shape[0]
            elif prompt is not None:
                num_images = len(prompt)
            else:
                num_images = len(generator) if isinstance(generator, list) else 1
        if init_images is not None:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength:g}")
            num_images = len(init_images)
        batch = num_images
        device, dtype = self._execution_device, self.unet.dtype

        # conditional inputs (the null inputs guidance contrasts against: null_inputs)
        cond_kwargs: dict = {"encoder_hidden_states": None, "class_labels": None}
        negatives: list | None = None  # the null prompts (None: the empty prompt)
        active = False
        if self.supports_labels:
            if conditions is None:
                conditions = torch.zeros(batch, 2 * len(self.label_names))
            conditions = conditions.to(device=device, dtype=dtype)
            cond_kwargs["class_labels"] = conditions
            active = active or bool(conditions.abs().sum() > 0)
        if self.supports_prompts:
            prompt = list(prompt) if prompt is not None else [""] * batch
            if len(prompt) != batch:
                raise ValueError(f"{len(prompt)} prompts for {batch} images")
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
            assert self.text_encoder is not None
            cond_kwargs["encoder_hidden_states"] = encode_prompt(self.tokenizer, self.text_encoder, prompt, device).to(
                dtype
            )
            active = active or any(p for p in prompt) or any(p for p in negatives or [])
        guidance_dim = self.guidance_dim
        guided = active and guidance_scale != 1.0 and guidance_dim is None
        if guidance_dim is not None:  # a distilled student: the scale is an input, one evaluation per step
            scale = torch.full((batch,), float(guidance_scale) if active else 1.0)
            cond_kwargs["timestep_cond"] = guidance_embedding(scale, guidance_dim).to(device=device, dtype=dtype)
        if guided:
            null_kwargs = self.null_inputs(batch, negatives)
            model_kwargs = {
                k: (torch.cat([null_kwargs[k], v]) if v is not None else None) for k, v in cond_kwargs.items()
            }
        else:
            model_kwargs = cond_kwargs

        size = self.unet.config["sample_size"]
        shape = (batch, self.unet.config["in_channels"], size, size)
        if isinstance(generator, list):  # one generator per image: results do not depend on batching
            sample = torch.cat(
                [randn_tensor((1,) + shape[1:], generator=g, device=device, dtype=dtype) for g in generator]
            )
        else:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if init_images is None:
            sample = sample * getattr(self.scheduler, "init_noise_sigma", 1.0)
        else:
            sample, timesteps = self._noised(self.encode_images(init_images), sample, strength)
        scale_input = getattr(self.scheduler, "scale_model_input", None)
        # stochastic schedulers (DDPM, DDIM with eta) take the per-image generators; PNDM takes none
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([sample, sample]) if guided else sample
            if scale_input is not None:
                model_in = scale_input(model_in, t)
            out = self.unet(model_in, t, **model_kwargs).sample.float()
            if guided:
                uncond, cond = out.chunk(2)
                out = guide(uncond, cond, guidance_scale)
            sample = self.scheduler.step(out, t, sample, **step_kwargs).prev_sample.to(dtype)
            if callback_on_step is not None:
                callback_on_step(i, t, sample)
        images = (self.decode_latents(sample).float() / 2 + 0.5).clamp(0, 1)
        result: torch.Tensor | np.ndarray | list
        if output_type == "pt":
            result = images
        else:
            array = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            result = self.numpy_to_pil(array) if output_type == "pil" else array
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)  # type: ignore[arg-type]  # diffusers' type omits output_type="pt"

    def _noised(self, clean: torch.Tensor, noise: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean noised to the first kept timestep, the kept timesteps): the last ~strength of the schedule."""
        timesteps = self.scheduler.timesteps
        order = int(getattr(self.scheduler, "order", 1))  # Heun / PNDM list some timesteps twice
        steps = len(timesteps) // order
        start = min(steps - 1, max(0, round(steps * (1 - strength)))) * order
        kept = timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        first = kept[:1].repeat(len(clean))
        if hasattr(self.scheduler, "add_noise"):
            noised = self.scheduler.add_noise(clean, noise, first)
        else:  # flow matching: x_t = (1 - sigma) x0 + sigma noise
            noised = getattr(self.scheduler, "scale_noise")(clean, first, noise)  # noqa: B009  # not in Sampler
        return noised.to(clean.dtype), kept
