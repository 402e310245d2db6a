"""MedDiffusionPipeline: label-conditioned (or unconditional) pixel diffusion with classifier-free guidance.

This file depends only on torch and diffusers and is copied next to every saved model as `pipeline.py`,
so a model trained by meddiff loads with plain diffusers:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(run_dir + "/pipeline", custom_pipeline=run_dir + "/pipeline",
                                             trust_remote_code=True)
    images = pipe(conditions=pipe.encode_labels([["Cardiomegaly"]]), guidance_scale=2.0).images

Conditioning: a condition vector has two entries per label name, (present * known, known); the zero vector
is "no condition" and is what classifier-free guidance contrasts against.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor


def encode_condition(labels: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(B, K) labels and (B, K) known mask -> (B, 2K) condition vectors."""
    k = known.to(torch.float32)
    return torch.cat([(labels > 0.5).to(torch.float32) * k, k], dim=1)


class MedDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"
    supports_prompts = False  # label-conditioned; text-conditioned pipelines take prompts

    def __init__(self, unet: UNet2DConditionModel, scheduler, label_names: Optional[list] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(label_names=list(label_names or []))

    @property
    def label_names(self) -> list:
        return list(self.config.label_names or [])

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

    @torch.no_grad()
    def __call__(
        self,
        conditions: Optional[torch.Tensor] = None,
        num_images: Optional[int] = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        generator: Optional[Union[torch.Generator, list]] = None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        conditional = self.unet.config.class_embed_type is not None
        if conditions is None:
            if num_images is None:
                num_images = len(generator) if isinstance(generator, list) else 1
            conditions = torch.zeros(num_images, 2 * len(self.label_names))
        batch = conditions.shape[0]
        device, dtype = self._execution_device, self.unet.dtype
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        if isinstance(generator, list):  # one generator per image: results do not depend on batching
            sample = torch.cat([randn_tensor((1,) + shape[1:], generator=g, device=device, dtype=dtype)
                                for g in generator])
        else:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sample = sample * self.scheduler.init_noise_sigma
        conditions = conditions.to(device=device, dtype=dtype)
        guided = conditional and guidance_scale != 1.0 and bool(conditions.abs().sum() > 0)
        if guided:
            class_labels = torch.cat([torch.zeros_like(conditions), conditions])
        else:
            class_labels = conditions if conditional else None
        # stochastic schedulers (DDPM, DDIM with eta) take the per-image generators; PNDM takes none
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([sample, sample]) if guided else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            out = self.unet(model_in, t, encoder_hidden_states=None, class_labels=class_labels).sample.float()
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(out, t, sample, **step_kwargs).prev_sample.to(dtype)
        images = (sample.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
