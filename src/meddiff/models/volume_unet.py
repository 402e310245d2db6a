"""The 3D denoiser of volume latent diffusion: MONAI's `DiffusionModelUNet(spatial_dims=3)` with meddiff's label
conditioning.

A condition is meddiff's vector of 2K values per volume, (present * known, known) for K label names
(meddiff.models.pipeline.encode_condition). It reaches the U-Net as a one-token cross-attention context
(`with_conditioning=True, cross_attention_dim=2K`): the attention over one token returns that token's projected
value, which is zero for the zero vector, so the zero condition is the null condition of classifier-free guidance.
With K = 0 the U-Net is unconditional. Saved as config.json + model.safetensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from diffusers import DDPMScheduler

from meddiff.errors import MeddiffError
from meddiff.models.factory import make_sampler
from meddiff.models.volume_weights import load_weights, read_meta, save_module
from meddiff.options import Options, build, option

if TYPE_CHECKING:  # MONAI is imported when a network is built (config import stays light)
    from monai.networks.nets import DiffusionModelUNet

CLASS_NAME = "VolumeUNet"


@dataclass
class VolumeUNetConfig(Options):
    channels: list[int] = option([32, 64, 64], "channels per level (each level but the last halves the latent)")
    attention_levels: list[bool] = option(
        [False, True, True],
        "levels with self- and cross-attention (one per channel level; conditioning needs at least one)",
    )
    num_res_blocks: int = option(1, "residual blocks per level", minimum=1)
    norm_num_groups: int = option(16, "GroupNorm groups; must divide every channel count", minimum=1)
    num_head_channels: int = option(16, "channels per attention head", minimum=1)
    transformer_layers: int = option(1, "transformer blocks per attention level", minimum=1)
    num_train_timesteps: int = option(1000, "diffusion timesteps", minimum=1)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = option(
        "scaled_linear", "noise schedule (scaled_linear as in latent diffusion)"
    )
    prediction_type: Literal["epsilon", "v_prediction"] = option("epsilon", "what the U-Net predicts")
    sampler: Literal["dpm++", "ddim", "ddpm"] = option("dpm++", "scheduler a saved pipeline samples with")
    label_embedding: bool = option(
        True,
        "labels also enter through the timestep embedding (a linear map of the condition vector added to it, so "
        "every residual block at every level sees them), not only through cross-attention at the attention levels",
    )


# options added after models and runs were saved with this config, and what their absence there means
SAVED_WITHOUT = {"label_embedding": False}


def check_unet_config(cfg: VolumeUNetConfig, num_labels: int) -> None:
    if len(cfg.attention_levels) != len(cfg.channels):
        raise MeddiffError(f"attention_levels {cfg.attention_levels} needs one entry per channel level {cfg.channels}")
    bad = [c for c in cfg.channels if c % cfg.norm_num_groups]
    if bad:
        raise MeddiffError(f"U-Net channels {bad} are not divisible by norm_num_groups {cfg.norm_num_groups}")
    heads = [c for c, a in zip(cfg.channels, cfg.attention_levels) if a and c % cfg.num_head_channels]
    if heads:
        raise MeddiffError(
            f"U-Net channels {heads} at attention levels are not divisible by num_head_channels {cfg.num_head_channels}"
        )
    if num_labels > 0 and not any(cfg.attention_levels):
        raise MeddiffError("a label-conditioned volume U-Net needs at least one attention level (attention_levels)")


def build_monai_unet(cfg: VolumeUNetConfig, latent_channels: int, num_labels: int) -> DiffusionModelUNet:
    """MONAI DiffusionModelUNet (spatial_dims=3); conditioned through a one-token context of 2K values if K > 0."""
    from monai.networks.nets import DiffusionModelUNet

    check_unet_config(cfg, num_labels)
    conditioned = num_labels > 0
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        with_conditioning=conditioned,
        transformer_num_layers=cfg.transformer_layers,
        cross_attention_dim=2 * num_labels if conditioned else None,
    )
    if conditioned and cfg.label_embedding:  # MONAI's class-embedding hook: emb += class_embedding(class_labels)
        net.num_class_embeds = 2 * num_labels
        net.class_embedding = torch.nn.Linear(2 * num_labels, 4 * cfg.channels[0])  # type: ignore[assignment]  # time_embed_dim
    return net


def build_volume_noise_scheduler(cfg: VolumeUNetConfig):
    """The training noise schedule (diffusers' schedulers work on 5D latents unchanged)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def build_volume_sampler(cfg: VolumeUNetConfig):
    """The sampling scheduler a saved pipeline uses (latents: no clipping to [-1, 1])."""
    return make_sampler(cfg.sampler, build_volume_noise_scheduler(cfg).config, clip=False)


class VolumeUNet(torch.nn.Module):
    """A MONAI 3D diffusion U-Net (`.net`) with its config and the number of labels it is conditioned on."""

    def __init__(self, config: VolumeUNetConfig, latent_channels: int, num_labels: int = 0):
        super().__init__()
        self.config = config
        self.latent_channels = int(latent_channels)
        self.num_labels = int(num_labels)
        self.net: DiffusionModelUNet = build_monai_unet(config, self.latent_channels, self.num_labels)

    @property
    def condition_width(self) -> int:
        """2K: the length of a condition vector (0: unconditional)."""
        return 2 * self.num_labels

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Prediction (noise or v) for (B, C, d, h, w) latents; `conditions` (B, 2K), None/zeros: unconditional."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(latents.shape[0])
        if self.num_labels == 0:
            return self.net(latents, timesteps.to(latents.device))
        if conditions is None:
            conditions = torch.zeros(latents.shape[0], self.condition_width, device=latents.device)
        if conditions.ndim != 2 or conditions.shape[1] != self.condition_width:
            raise MeddiffError(
                f"conditions must be (B, {self.condition_width}) for {self.num_labels} labels, got "
                f"{tuple(conditions.shape)}"
            )
        context = conditions.to(latents.device, latents.dtype).unsqueeze(1)  # one token per volume
        labels = context[:, 0] if self.net.num_class_embeds is not None else None  # the timestep-embedding path
        return self.net(latents, timesteps.to(latents.device), context=context, class_labels=labels)

    def save_pretrained(self, folder: Path) -> Path:
        return save_module(
            self,
            folder,
            {
                "class": CLASS_NAME,
                "config": self.config.to_dict(),
                "latent_channels": self.latent_channels,
                "num_labels": self.num_labels,
            },
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VolumeUNet:
        folder = Path(folder).expanduser()
        meta = read_meta(folder, CLASS_NAME)
        saved = {**SAVED_WITHOUT, **meta["config"]}  # models saved before an option lack its path
        model = cls(build(VolumeUNetConfig, saved), int(meta["latent_channels"]), int(meta["num_labels"]))
        load_weights(model, folder)
        return model.eval()
