"""The attention processor choice: classic on CPU in bf16 for small attention maps (measured faster), SDPA
elsewhere; both compute the same attention."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from meddiff.errors import MeddiffError
from meddiff.models.factory import ModelConfig, build_unet, choose_attention, largest_attention_tokens, set_attention

TINY = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=8)


def test_auto_picks_classic_only_for_small_maps_on_cpu_bf16():
    small = build_unet(TINY, 16, 2)  # attention at 8 px -> 64 tokens
    assert largest_attention_tokens(small) == 64
    assert choose_attention("auto", small, "cpu", "bf16") == "classic"
    assert choose_attention("auto", small, "cpu", "fp32") == "sdpa"
    assert choose_attention("auto", small, "cuda", "bf16") == "sdpa"
    wide = build_unet(
        ModelConfig(block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=8, attention_max_resolution=64),
        64,
        2,
    )  # attention at 64 px -> 4096 tokens
    assert largest_attention_tokens(wide) == 4096
    assert choose_attention("auto", wide, "cpu", "bf16") == "sdpa"
    assert choose_attention("classic", wide, "cuda", "fp32") == "classic"
    with pytest.raises(MeddiffError, match="attention must be one of"):
        choose_attention("flash", small, "cpu", "bf16")


def test_classic_and_sdpa_give_the_same_prediction():
    torch.manual_seed(0)
    unet = build_unet(TINY, 16, 2).eval()
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.randn(2, 4)
    with torch.no_grad():
        set_attention(unet, "sdpa")
        assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
        a = unet(x, t, encoder_hidden_states=None, class_labels=c).sample
        set_attention(unet, "classic")
        assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
        b = unet(x, t, encoder_hidden_states=None, class_labels=c).sample
    assert torch.allclose(a, b, atol=1e-5)
