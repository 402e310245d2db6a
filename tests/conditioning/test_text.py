"""Text conditioning: the packaged offline encoder, prompt features, and one-line errors for unreachable ids."""

import pytest
import torch

from meddiff.conditioning.text import PromptCache, TextConfig, load_text_encoder, text_width
from meddiff.errors import MeddiffError
from meddiff.models.pipeline import encode_prompt


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(TextConfig(max_tokens=16))


def test_default_encoder_is_offline_minilm(minilm):
    tokenizer, encoder = minilm
    assert text_width(encoder) == 384 and tokenizer.model_max_length == 16
    assert not any(p.requires_grad for p in encoder.parameters())
    feats = encode_prompt(tokenizer, encoder, ["chest x-ray with cardiomegaly", ""])
    assert feats.shape == (2, 16, 384)
    # different findings give different features; the same prompt the same features
    a, b = encode_prompt(tokenizer, encoder, ["chest x-ray with edema", "chest x-ray with pneumothorax"])
    assert not torch.allclose(a, b)


def test_prompt_cache_matches_direct_encoding(minilm):
    tokenizer, encoder = minilm
    cache = PromptCache(tokenizer, encoder)
    prompts = ["chest x-ray with edema", "", "chest x-ray with edema"]
    encoded = []

    def count(module, args, kwargs, output):  # the batch size of each encoder pass
        encoded.append(len(args[0]) if args else len(kwargs["input_ids"]))

    hook = encoder.register_forward_hook(count, with_kwargs=True)
    try:
        first = cache(prompts)
        assert encoded == [2]  # one encoder pass over the two distinct prompts
        assert len(cache) == 2 and (cache.misses, cache.hits) == (2, 1)
        assert torch.equal(cache(["", "chest x-ray with edema"]), first[[1, 0]])  # served from the cache
        assert encoded == [2] and (cache.misses, cache.hits) == (2, 3)
    finally:
        hook.remove()
    assert torch.allclose(first, encode_prompt(tokenizer, encoder, prompts), atol=1e-6)


def test_prompt_cache_drops_the_least_recently_used_beyond_its_budget(minilm):
    tokenizer, encoder = minilm
    one = 16 * 384 * 4  # bytes of one prompt's features (16 tokens x 384 floats)
    cache = PromptCache(tokenizer, encoder, max_bytes=2 * one)
    cache(["a", "b"])
    cache(["a"])  # a is now the most recently used
    cache(["c"])
    assert list(cache._cache) == ["a", "c"] and cache._bytes == 2 * one
    assert torch.allclose(cache(["b"]), encode_prompt(tokenizer, encoder, ["b"]), atol=1e-6)  # recomputed
    assert cache.misses == 4


def test_unreachable_hub_id_and_missing_folder_fail_in_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="hub is unreachable") as err:
        load_text_encoder(TextConfig(encoder="no-such-org/radbert-that-is-not-cached"))
    assert "\n" not in str(err.value)
    with pytest.raises(MeddiffError, match="does not exist"):
        load_text_encoder(TextConfig(encoder=str(tmp_path / "missing")))


def test_any_local_transformers_encoder_works(tmp_path, minilm):
    """A local folder (here a re-saved copy, as a user's RadBERT/SapBERT download would be) loads like an id."""
    tokenizer, encoder = minilm
    tokenizer.save_pretrained(tmp_path / "enc")
    encoder.save_pretrained(tmp_path / "enc")
    tok2, enc2 = load_text_encoder(TextConfig(encoder=str(tmp_path / "enc"), train_encoder=True, max_tokens=8))
    assert tok2.model_max_length == 8 and all(p.requires_grad for p in enc2.parameters())
