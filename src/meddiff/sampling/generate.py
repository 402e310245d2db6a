"""Sampling images from a trained pipeline.

Every image has its own seed, derived from (base seed, image index), and its own generator, so the same image
comes out whatever the batch size or however the work is split across processes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.conditioning.labels import LabelCodec
from meddiff.data.prompts import prompt_from_labels
from meddiff.errors import MeddiffError
from meddiff.models.factory import SamplerName, choose_attention, make_sampler, set_attention
from meddiff.models.pipeline import MedDiffusionPipeline
from meddiff.options import Options, option
from meddiff.precision import autocast, resolve_precision

logger = logging.getLogger(__name__)


def image_seed(base_seed: int, index: int) -> int:
    """A 63-bit seed per (base seed, image index): distinct images never share noise across runs or shards."""
    a, b = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(a) << 32 | int(b)) & 0x7FFF_FFFF_FFFF_FFFF)


@dataclass
class SamplingSettings(Options):
    """How images are drawn (generate, fidelity, serve, the grids after training); flags of `meddiff generate`."""

    steps: int = option(20, "denoising steps", minimum=1)
    guidance: float = option(
        2.0,
        "classifier-free guidance scale (1: conditional only; > 1 doubles the network evaluations); commands that "
        "load a model default to the scale its run was trained and reported with (config.yaml)",
        minimum=0,
    )
    scheduler: SamplerName = option(
        "dpm++", "sampler (flow models: euler, heun, dpm++, dpm++3, unipc; distilled models use their own)"
    )
    seed: int = option(0, "base seed; image i gets its own seed from (seed, i), whatever the batch or shard")
    batch_size: int = option(64, "images per network batch", minimum=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto: bf16/fp16 on GPUs where supported, else fp32"
    )
    negative_prompt: str | None = option(
        None, "text models: what guidance steers away from (default: the empty prompt)"
    )


def prompts_for_labels(labels: torch.Tensor, known: torch.Tensor, names: list[str]) -> list[str]:
    """(N, K) labels and known mask -> the prompts a text model was trained with ("chest x-ray with
    cardiomegaly"); a row with no known label is the empty (unconditional) prompt."""
    return [
        ""
        if not bool(known_row.any())
        else prompt_from_labels([n for j, n in enumerate(names) if known_row[j] and row[j] > 0.5])
        for row, known_row in zip(labels, known.bool())
    ]


def prompts_from_conditions(conditions: torch.Tensor, names: list[str]) -> list[str]:
    """The same from (N, 2K) condition vectors (value * known, known)."""
    k = len(names)
    return prompts_for_labels(conditions[:, :k], conditions[:, k:] > 0.5, names)


def sample(
    pipe: MedDiffusionPipeline,
    conditions: torch.Tensor,
    settings: SamplingSettings,
    indices: list[int] | None = None,
    progress: bool = True,
    prompts: Sequence[str | None] | None = None,
    callback=None,
    init_images: np.ndarray | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """conditions (N, 2K) and/or prompts (N) -> images (N, H, W) in [0, 1]. Row i is image number indices[i]
    (default i) and uses image_seed(settings.seed, indices[i]). A text model given only label conditions gets the
    prompts built from them. callback(row_offset, step, timestep, sample) sees every denoising step.
    init_images ((N, H, W) in [0, 1]) and strength: image-to-image from those images (MedDiffusionPipeline)."""
    if init_images is not None and len(init_images) != len(conditions):
        raise MeddiffError(f"{len(init_images)} start images for {len(conditions)} conditions")
    if settings.steps < 1:
        raise MeddiffError("--steps must be at least 1")
    if pipe.supports_prompts:
        derived = prompts_from_conditions(conditions, pipe.label_names) if pipe.label_names else [""] * len(conditions)
        prompts = [p if p else d for p, d in zip(prompts or [None] * len(conditions), derived)]
    elif prompts is not None and any(prompts):
        raise MeddiffError("this model is not text-conditioned; it takes labels, not prompts")
    phased = pipe.phased_steps
    if phased and settings.steps != phased:  # a phased student knows only its own grid: it samples in its steps
        if getattr(pipe, "_phased_told", None) != settings.steps:
            logger.info("a phased student samples in its own %d steps (asked for %d)", phased, settings.steps)
            pipe._phased_told = settings.steps  # once per pipeline and step count
        settings = dataclasses.replace(settings, steps=phased)
    pipe.scheduler = make_sampler(
        settings.scheduler, pipe.scheduler.config, clip=not pipe.is_latent, phased=bool(phased)
    )
    precision = resolve_precision(settings.precision, pipe.device)  # for the device the pipeline is on
    device = pipe.device.type
    if choose_attention("auto", pipe.unet, device, precision) == "classic":  # faster on CPU in bf16 (measured)
        set_attention(pipe.unet, "classic")
    n = conditions.shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    out = []
    bar = tqdm(
        total=n,
        desc=f"sample {settings.scheduler} x{settings.steps}",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    for start in range(0, n, settings.batch_size):
        cond = conditions[start : start + settings.batch_size]
        gens = [
            torch.Generator().manual_seed(image_seed(settings.seed, indices[start + i])) for i in range(cond.shape[0])
        ]
        extra: dict[str, Any] = {}
        if pipe.supports_prompts:
            assert prompts is not None  # filled in above
            extra = {
                "prompt": prompts[start : start + settings.batch_size],
                "negative_prompt": settings.negative_prompt,
            }
        if callback is not None:
            extra["callback_on_step"] = lambda i, t, x, _s=start: callback(_s, i, t, x)
        if init_images is not None:
            chunk = init_images[start : start + settings.batch_size]
            extra["init_images"] = torch.from_numpy(np.ascontiguousarray(chunk)).float().unsqueeze(1)
            extra["strength"] = strength
        with autocast(precision, device):
            images = pipe(
                conditions=cond,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                generator=gens,
                output_type="pt",
                **extra,
            ).images
        out.append(images[:, 0].float().cpu().numpy())
        bar.update(cond.shape[0])
    bar.close()
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def conditions_for(
    codec: LabelCodec, labels_text: str | None, unconditional: bool, n: int, unspecified: str = "absent"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(conditions, labels, known) for n images of one label combination, or unconditional."""
    k = len(codec.label_names)
    if unconditional or labels_text is None:
        labels, known = torch.zeros(n, k), torch.zeros(n, k, dtype=torch.bool)
    else:
        one, one_known = codec.parse(labels_text, unspecified)
        labels, known = one.expand(n, k).clone(), one_known.expand(n, k).clone()
    return codec.encode(labels, known), labels, known
