"""Textual inversion: new token(s) initialised from a word; only their embedding rows learn (every other row is
restored after each step) and only they are exported (learned_embeds.safetensors, load_textual_inversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff.errors import MeddiffError
from meddiff.training.methods.finetune.strategy import (
    FinetuneRun,
    FinetuneStrategy,
    text_encoder_of,
    write_adapter_note,
)

EMBEDDINGS_FILE = "learned_embeds.safetensors"


class TextualInversionFinetune(FinetuneStrategy):
    name = "textual-inversion"
    default_learning_rate = 5e-4
    uses_ema = False  # most of the embedding matrix is restored every step: no EMA of it

    new_token_ids: list[int]
    placeholder: str  # the new token(s) as they appear in a prompt
    original_embeddings: torch.Tensor

    @property
    def text_encoder_learns(self) -> bool:
        return True

    def add_trainable(self, unet: Any, tokenizer: Any, text_encoder: Any) -> None:
        ft = self.ft
        tokens = [ft.placeholder_token] + [f"{ft.placeholder_token}_{i}" for i in range(1, ft.num_vectors)]
        if tokenizer.add_tokens(tokens) != len(tokens):
            raise MeddiffError(
                f"the tokenizer already has {ft.placeholder_token!r}; choose another --placeholder-token"
            )
        init = tokenizer.encode(ft.initializer_token, add_special_tokens=False)
        if len(init) != 1:
            raise MeddiffError(
                f"--initializer-token {ft.initializer_token!r} is {len(init)} tokens; use a "
                "single-token word (e.g. chest, lung, xray)"
            )
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.new_token_ids = tokenizer.convert_tokens_to_ids(tokens)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[self.new_token_ids] = weight[init[0]].clone()
        self.original_embeddings = weight.detach().clone()
        self.placeholder = " ".join(tokens)
        weight.requires_grad_(True)

    def _with_token(self, prompt: str) -> str:
        return self.ft.template.format(token=self.placeholder, prompt=prompt).strip()

    def training_prompt(self, prompt: str) -> str:
        return self._with_token(prompt)

    def validation_prompts(self) -> list[str]:
        return [self._with_token(p) for p in self.ft.validation_prompts]

    def after_step(self, model: torch.nn.Module) -> None:
        """Every row but the new tokens' goes back to what it was."""
        weight = text_encoder_of(model).get_input_embeddings().weight
        keep = torch.ones(weight.shape[0], dtype=torch.bool)
        keep[self.new_token_ids] = False
        with torch.no_grad():
            weight[keep] = self.original_embeddings[keep].to(weight.device, weight.dtype)

    def export(self, run: FinetuneRun, model: torch.nn.Module, out_dir: Path) -> Path:
        from safetensors.torch import save_file

        folder = out_dir / "textual_inversion"
        weight = text_encoder_of(model).get_input_embeddings().weight.detach().cpu()
        folder.mkdir(parents=True, exist_ok=True)
        token = self.ft.placeholder_token
        save_file({token: weight[self.new_token_ids].clone().contiguous()}, str(folder / EMBEDDINGS_FILE))
        write_adapter_note(run, folder, "textual-inversion", EMBEDDINGS_FILE, token=token, template=self.ft.template)
        return folder

    def diffusers_usage(self, export: Path) -> list[str]:
        return [
            "pipe = StableDiffusionPipeline.from_pretrained(BASE)",
            f"pipe.load_textual_inversion('{export / EMBEDDINGS_FILE}', token='{self.ft.placeholder_token}')",
        ]

    def card_details(self) -> str:
        return f"; placeholder {self.ft.placeholder_token} ({self.ft.num_vectors} vectors)"
