"""Fine-tuning the text encoder only (the U-Net and VAE frozen)."""

from __future__ import annotations

from meddiff.training.methods.finetune.strategy import FinetuneStrategy


class TextEncoderFinetune(FinetuneStrategy):
    name = "text"

    @property
    def trains_text_encoder(self) -> bool:
        return True
