"""Defaults that follow the image size, for `meddiff train` on pixels without a `--config` recipe.

The built-in defaults (TrainConfig, ModelConfig) are the 28-32 px recipe measured on PneumoniaMNIST. From 48 px up,
a pixel model without a recipe gets the 64 px recipe measured on the brain MRI set (configs/alzheimer-mri-64.yaml,
docs/benchmarks.md "Brain MRI at 64 px"): one more U-Net level (the 64 px map needs a fourth downsampling to reach
the 8 px bottleneck the 28 px model has), one residual block per level (half the cost a step), attention from 16 px
down, and the flow-matching objective (fewer steps to quality). Above 96 px pixel diffusion becomes slow on a CPU:
a latent model is suggested (configs/pneumoniamnist-latent-64.yaml shows one). Flags and `--config` always win."""

from __future__ import annotations

from typing import Any

PIXEL_64: dict[str, Any] = {
    "model.block_out_channels": [32, 64, 128, 128],
    "model.layers_per_block": 1,
    "model.attention_max_resolution": 16,
    "model.objective": "flow",
}
LARGE_PIXEL = 96  # from here on, say that a latent model is the better choice
# flags that only mean something under the diffusion objective: given one, the recipe keeps that objective
DIFFUSION_ONLY = ("model.prediction_type", "model.beta_schedule", "model.num_train_timesteps")


def size_defaults(
    resolution: int, method: str | None, given: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str | None]:
    """(settings, a sentence saying so) for a pixel run at `resolution` without a recipe; ({}, None) where the
    built-in defaults apply. `given`: the flags passed (a diffusion-only one keeps the diffusion objective)."""
    if method not in (None, "pixel") or resolution < 48:
        return {}, None
    settings = dict(PIXEL_64)
    objective = "flow objective"
    if any(key in (given or {}) for key in DIFFUSION_ONLY):
        del settings["model.objective"]
        objective = "the diffusion objective your flags ask for"
    note = (
        f"{resolution} px without --config: the 64 px recipe (U-Net {PIXEL_64['model.block_out_channels']}, one "
        f"block per level, attention <= 16 px, {objective}); flags or --config override it"
    )
    if resolution >= LARGE_PIXEL:
        note += f"; at {resolution} px a latent model trains far faster (--method latent --autoencoder AE_RUN)"
    return settings, note
