"""Fine-tuning the U-Net (VAE and text encoder frozen; prompt features cached), RoentGen's most promising
setting, and the U-Net with the text encoder (RoentGen's best fidelity)."""

from __future__ import annotations

from meddiff.training.methods.finetune.strategy import FinetuneStrategy


class UnetFinetune(FinetuneStrategy):
    name = "unet"

    @property
    def trains_unet(self) -> bool:
        return True


class UnetTextFinetune(UnetFinetune):
    name = "unet+text"

    @property
    def trains_text_encoder(self) -> bool:
        return True
