"""3D volume models: the autoencoder (meddiff.models.volume_autoencoder), the latent diffusion U-Net
(meddiff.models.volume_unet) and the pipeline that joins them (meddiff.models.volume_pipeline), all on MONAI's
generative networks. This module holds their joint config and the size presets.

Presets: `cpu64` (the default sizes) turns 64^3 volumes into 16^3 latents with small channels, so a demo trains
on 2 CPU cores; `gpu128` turns 128^3 volumes into 32^3 latents with wider networks for one GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meddiff.errors import MeddiffError
from meddiff.models.volume_autoencoder import VolumeAutoencoder, VolumeAutoencoderConfig
from meddiff.models.volume_unet import VolumeUNet, VolumeUNetConfig
from meddiff.options import Options, option, section

__all__ = [
    "VolumeAutoencoder",
    "VolumeAutoencoderConfig",
    "VolumeModelConfig",
    "VolumeUNet",
    "VolumeUNetConfig",
    "volume_preset",
    "PRESETS",
]

PRESETS = ("cpu64", "gpu128")


@dataclass
class VolumeModelConfig(Options):
    """Everything that sizes the 3D models (a section of a training config)."""

    size: int = option(
        64, "volume edge in voxels (the training grid is size^3 unless the data says otherwise)", minimum=8
    )
    autoencoder: VolumeAutoencoderConfig = section(VolumeAutoencoderConfig, "the 3D autoencoder")
    unet: VolumeUNetConfig = section(VolumeUNetConfig, "the 3D latent diffusion U-Net")


def volume_preset(name: Literal["cpu64", "gpu128"]) -> VolumeModelConfig:
    """A named size preset."""
    if name == "cpu64":
        return VolumeModelConfig()
    if name == "gpu128":
        return VolumeModelConfig(
            size=128,
            autoencoder=VolumeAutoencoderConfig(channels=[32, 64, 128], num_res_blocks=2, norm_num_groups=16),
            unet=VolumeUNetConfig(
                channels=[64, 128, 256],
                attention_levels=[False, True, True],
                num_res_blocks=2,
                norm_num_groups=32,
                num_head_channels=32,
            ),
        )
    raise MeddiffError(f"unknown volume preset {name!r}; choose one of {', '.join(PRESETS)}")
