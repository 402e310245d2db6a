"""Distribution matching for few-step students (DMD: Yin et al., "One-step Diffusion with Distribution Matching
Distillation", 2024; DMD2, the same authors, 2024).

The student's clean images x are noised again to a random level t and denoised twice: by the frozen, guided teacher
(the "real" score: what the data distribution says x_t came from) and by a fake-score network (a copy of the teacher
that keeps learning to denoise the *student's* images, so it knows the student's distribution). Where the two
disagree, the student's distribution differs from the teacher's; the student's images are moved along the
difference x0_real - x0_fake, the descent direction of the KL divergence between the two noised distributions.
With the teacher guided, this is mode-seeking: it pulls each image towards what the guided teacher would make of it
under its labels, where a consistency loss averages over what the teacher could draw.

This module holds the two losses; meddiff.training.methods.distill wires them into the student's training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# DMD2's range of re-noising levels, as fractions of the schedule (the ends carry no useful score difference)
LEVELS = (0.02, 0.98)


def renoising_timesteps(batch: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Random timesteps in LEVELS of a `total`-step schedule, one per image."""
    low, high = int(LEVELS[0] * total), int(LEVELS[1] * total)
    return torch.randint(low, high + 1, (batch,), generator=generator)


def distribution_matching_loss(images: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to `images` is (x0_fake - x0_real) / (its per-image mean |images - x0_real|)
    / images.numel(): DMD's update, normalised per image as DMD does, written as half the squared distance of the
    images to themselves moved against it (the moved copy carries no gradient)."""
    with torch.no_grad():
        scale = (images - x0_real).abs().mean(dim=tuple(range(1, images.ndim)), keepdim=True).clamp(min=1e-6)
        moved = images - torch.nan_to_num((x0_fake - x0_real) / scale)
    return 0.5 * F.mse_loss(images, moved, reduction="mean")


def fake_score_loss(
    network, images: torch.Tensor, scheduler, condition: dict, generator: torch.Generator
) -> torch.Tensor:
    """The fake-score network's denoising loss on the student's (detached) images under their conditions: the
    teacher's own training objective (epsilon or v, from the teacher's noise `scheduler`) at uniform timesteps."""
    device, b = images.device, images.shape[0]
    t = torch.randint(0, int(scheduler.config["num_train_timesteps"]), (b,), generator=generator).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device)
    noisy = scheduler.add_noise(images, noise, t)
    v_prediction = scheduler.config["prediction_type"] == "v_prediction"
    target = scheduler.get_velocity(images, noise, t) if v_prediction else noise
    return F.mse_loss(network(noisy, t, **condition).sample.float(), target)
