"""LoRA: peft adapters on the U-Net's attention projections (optionally the text encoder's); exports only the
adapter weights, loadable with diffusers' load_lora_weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff.errors import MeddiffError
from meddiff.training.methods.finetune.strategy import (
    FinetuneRun,
    FinetuneStrategy,
    text_encoder_of,
    unet_of,
    write_adapter_note,
)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def check_text_encoder_adapters(peft_version: str | None = None, needed: str | None = None) -> None:
    """LoRA on the text encoder goes through transformers' PEFT integration, which refuses peft releases older
    than its MIN_PEFT_VERSION (transformers 5.x: 0.22) with a traceback: say so in one line before anything loads.
    The arguments default to the installed peft and what the installed transformers needs."""
    import re
    from importlib.metadata import version

    def release(text: str) -> tuple[int, ...]:  # "0.22.0.dev0" -> (0, 22, 0)
        found = re.match(r"\d+(?:\.\d+)*", text.strip())
        return tuple(int(part) for part in found.group(0).split(".")) if found else (0,)

    if needed is None:
        try:
            from transformers.integrations.peft import MIN_PEFT_VERSION
        except ImportError:  # older transformers: no such gate
            return
        needed = str(MIN_PEFT_VERSION)
    peft_version = peft_version or version("peft")
    if release(peft_version) < release(needed):
        raise MeddiffError(
            f"--lora-text-encoder needs peft >= {needed} with the installed transformers (peft {peft_version} is "
            "installed): upgrade peft, or train LoRA on the U-Net only"
        )


class LoraFinetune(FinetuneStrategy):
    name = "lora"
    default_learning_rate = 1e-4

    def check(self) -> None:
        if self.ft.lora_text_encoder:
            check_text_encoder_adapters()

    @property
    def text_encoder_learns(self) -> bool:
        return self.ft.lora_text_encoder

    def add_trainable(self, unet: Any, tokenizer: Any, text_encoder: Any) -> None:
        unet.add_adapter(self._adapter(LORA_TARGETS))
        if self.ft.lora_text_encoder:
            text_encoder.add_adapter(self._adapter(TEXT_LORA_TARGETS))

    def _adapter(self, targets: list[str]):
        from peft import LoraConfig

        alpha: Any = self.ft.lora_alpha  # peft annotates an int; a float alpha (scale alpha / rank) works as well
        return LoraConfig(r=self.ft.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)

    def export(self, run: FinetuneRun, model: torch.nn.Module, out_dir: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        folder = out_dir / "lora"
        text_layers = None
        if self.ft.lora_text_encoder:
            text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder_of(model)))
        folder.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet_of(model))),
            text_encoder_lora_layers=text_layers,  # type: ignore[arg-type]  # None (the default) is not in diffusers' type
            safe_serialization=True,
        )
        write_adapter_note(run, folder, "lora", LORA_WEIGHTS)
        return folder

    def diffusers_usage(self, export: Path) -> list[str]:
        return ["pipe = StableDiffusionPipeline.from_pretrained(BASE)", f"pipe.load_lora_weights('{export}')"]
