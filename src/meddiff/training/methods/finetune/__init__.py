"""Fine-tuning a pretrained Stable Diffusion (method "finetune"): one strategy class per `--method`, sharing the
one training loop through base.StableDiffusionFinetune.

- unet: the U-Net (VAE and text encoder frozen; prompt features cached), RoentGen's most promising setting;
- unet+text: U-Net and text encoder together (RoentGen's best fidelity);
- text: the text encoder only;
- dreambooth: an instance prompt on every training image plus prior preservation on class images the base
  model generates first (cached in RUN/class_images), optionally with the text encoder;
- lora: peft LoRA adapters on the U-Net's attention projections (optionally the text encoder's); exports only
  the adapter weights, loadable with diffusers' load_lora_weights;
- textual-inversion: new token(s) initialised from a word; only their embedding rows learn and only they are
  exported (learned_embeds.safetensors, load_textual_inversion).

A new strategy is a FinetuneStrategy subclass (strategy.py) listed in registry.py."""

from meddiff.training.methods.finetune.base import StableDiffusionFinetune
from meddiff.training.methods.finetune.registry import (
    FINETUNE_METHODS,
    STRATEGIES,
    default_learning_rate,
    finetune_strategy,
)
from meddiff.training.methods.finetune.strategy import FinetuneStrategy

__all__ = [
    "FINETUNE_METHODS",
    "STRATEGIES",
    "FinetuneStrategy",
    "StableDiffusionFinetune",
    "default_learning_rate",
    "finetune_strategy",
]
