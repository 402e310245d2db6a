"""One class per fine-tuning strategy: the registry knows exactly the strategies there are, and each strategy
trains what it says (which parameters require grad, what joins the trained model), with its own prompts, extra
loss, EMA choice and checkpoint state. Fast: no training run (tests/training/test_finetune.py trains them)."""

import typing
from pathlib import Path

import pytest
import torch

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.testing import build_tiny_stable_diffusion
from meddiff.training.config import FinetuneConfig, TrainConfig
from meddiff.training.methods import METHODS
from meddiff.training.methods.finetune import (
    FINETUNE_METHODS,
    STRATEGIES,
    FinetuneStrategy,
    StableDiffusionFinetune,
    default_learning_rate,
    dreambooth,
    finetune_strategy,
    lora,
    text_encoder,
    textual_inversion,
    unet,
)

PACKAGE = "meddiff.training.methods.finetune."
DATA = "phantom:?n=8&seed=5"
INSTANCE = "chest x-ray with sks effusion"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA, 32)


def _config(base, out, method, **ft) -> TrainConfig:
    return TrainConfig(
        data=DATA,
        out=str(out),
        method="finetune",
        resolution=32,
        batch_size=4,
        cond_dropout=0.0,
        precision="fp32",
        finetune=FinetuneConfig(pretrained=str(base), method=method, **ft),
    )


def _method(base, tmp_path, data, method, **ft) -> StableDiffusionFinetune:
    torch.manual_seed(0)
    return StableDiffusionFinetune(_config(base, tmp_path, method, **ft), data)


def _trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _all(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()}


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


# the registry ----------------------------------------------------------------------------------------------------
def test_registry_has_every_strategy_once_in_the_cli_order():
    assert FINETUNE_METHODS == ("unet", "unet+text", "text", "dreambooth", "lora", "textual-inversion")
    package = {c for c in _subclasses(FinetuneStrategy) if c.__module__.startswith(PACKAGE)}
    assert set(STRATEGIES.values()) == package  # no strategy class left out of the registry, none unknown
    assert all(finetune_strategy(name).name == name for name in FINETUNE_METHODS)
    assert {c.__module__ for c in package} == {
        m.__name__ for m in (unet, text_encoder, dreambooth, lora, textual_inversion)
    }


def test_unknown_strategy_is_one_line():
    for bad in ("everything", "", ["lora"]):
        with pytest.raises(MeddiffError, match="unknown fine-tuning method") as error:
            finetune_strategy(bad)
        assert "\n" not in str(error.value) and "textual-inversion" in str(error.value)


def test_default_learning_rates_come_from_the_strategies():
    from meddiff.workflow import FINETUNE_LEARNING_RATES

    assert FINETUNE_LEARNING_RATES == {
        "unet": 1e-5,
        "unet+text": 1e-5,
        "text": 1e-5,
        "dreambooth": 5e-6,
        "lora": 1e-4,
        "textual-inversion": 5e-4,
    }
    assert all(default_learning_rate(m) == STRATEGIES[m].default_learning_rate for m in FINETUNE_METHODS)


def test_the_loop_runs_the_strategy_the_config_names(base, tmp_path, data):
    method = METHODS["finetune"](_config(base, tmp_path, "text"), data)
    assert isinstance(method.strategy, text_encoder.TextEncoderFinetune) and method.mode == "text"


# what each strategy trains ---------------------------------------------------------------------------------------
def test_unet_trains_the_whole_unet_only(base, tmp_path, data):
    m = _method(base, tmp_path, data, "unet")
    assert type(m.strategy) is unet.UnetFinetune
    assert not isinstance(m.model, torch.nn.ModuleDict) and _trainable(m.model) == _all(m.model)
    assert not _trainable(m.text_encoder) and m.prompt_cache is not None  # frozen encoder: cached prompt features
    assert m.uses_ema and not m.has_unused_parameters
    assert m.training_prompt(0) == data.prompts[0]


def test_unet_and_text_trains_both(base, tmp_path, data):
    m = _method(base, tmp_path, data, "unet+text")
    assert type(m.strategy) is unet.UnetTextFinetune
    assert set(m.model) == {"unet", "text_encoder"} and _trainable(m.model) == _all(m.model)
    assert m.prompt_cache is None and m.has_unused_parameters


def test_text_trains_the_encoder_only(base, tmp_path, data):
    m = _method(base, tmp_path, data, "text")
    assert not _trainable(m.model["unet"]) and _trainable(m.model["text_encoder"]) == _all(m.model["text_encoder"])
    assert m.has_unused_parameters and m.uses_ema


def test_dreambooth_trains_the_unet_with_the_instance_prompt(base, tmp_path, data):
    m = _method(base, tmp_path, data, "dreambooth", instance_prompt=INSTANCE, validation_prompts=["x"])
    assert type(m.strategy) is dreambooth.DreamBoothFinetune
    assert _trainable(m.model) == _all(m.model) and not _trainable(m.text_encoder)
    assert [m.training_prompt(i) for i in range(3)] == [INSTANCE] * 3
    assert m.validation_prompts() == [INSTANCE]  # no class prompt: no prior preservation, no class images
    assert m.strategy.class_mean is None and not (tmp_path / "class_images").exists()
    with_text = _method(base, tmp_path / "te", data, "dreambooth", instance_prompt=INSTANCE, train_text_encoder=True)
    assert _trainable(with_text.model["text_encoder"]) == _all(with_text.model["text_encoder"])
    with pytest.raises(MeddiffError, match="instance-prompt"):
        _method(base, tmp_path, data, "dreambooth")


def test_dreambooth_prior_preservation_adds_weighted_class_samples(base, tmp_path, data):
    config = _config(
        base, tmp_path, "dreambooth", instance_prompt=INSTANCE, class_prompt="chest x-ray", prior_loss_weight=0.5
    )
    db = dreambooth.DreamBoothFinetune(config)
    assert db.prior_preservation
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert db.batch_loss(per_sample, 2) == 2.0  # classes not prepared yet: the batch alone

    class Run:  # the few things extend_batch uses of the run
        @staticmethod
        def sample_latents(mean, std, generator):
            return mean + std

    db.class_mean, db.class_std = torch.full((3, 4, 2, 2), 7.0), torch.zeros(3, 4, 2, 2)
    latents, prompts = db.extend_batch(Run(), torch.zeros(2, 4, 2, 2), [INSTANCE, ""], torch.Generator())
    assert prompts == [INSTANCE, "", "chest x-ray", "chest x-ray"]
    assert torch.equal(latents[:2], torch.zeros(2, 4, 2, 2)) and torch.all(latents[2:] == 7.0)
    assert db.batch_loss(per_sample, 2) == 2.0 + 0.5 * 15.0


def test_lora_trains_only_adapters(base, tmp_path, data):
    m = _method(base, tmp_path, data, "lora")
    assert type(m.strategy) is lora.LoraFinetune
    trainable = _trainable(m.model)
    assert trainable and all("lora" in n for n in trainable)
    assert {n.split(".lora")[0].rsplit(".", 1)[1] for n in trainable} <= {"to_q", "to_k", "to_v", "0"}
    assert not _trainable(m.text_encoder) and m.prompt_cache is not None and not m.has_unused_parameters


def test_domain_encoder_projection_always_learns(base, tmp_path, data):
    m = _method(base, tmp_path, data, "lora", text_encoder="minilm")
    projection = {n for n in _trainable(m.model) if n.startswith("encoder_hid_proj")}
    assert projection == {"encoder_hid_proj.weight", "encoder_hid_proj.bias"}


def test_textual_inversion_trains_only_the_embedding_with_new_rows(base, tmp_path, data):
    m = _method(base, tmp_path, data, "textual-inversion", num_vectors=2, validation_prompts=["chest"])
    ti = m.strategy
    assert type(ti) is textual_inversion.TextualInversionFinetune
    weight = m.model["text_encoder"].get_input_embeddings().weight
    assert [p for p in m.model.parameters() if p.requires_grad] == [weight]
    assert not m.uses_ema and m.has_unused_parameters
    assert ti.placeholder == "<lung-xray> <lung-xray>_1" and len(ti.new_token_ids) == 2
    assert m.training_prompt(0) == f"<lung-xray> <lung-xray>_1 {data.prompts[0]}"
    assert m.validation_prompts() == ["<lung-xray> <lung-xray>_1 chest"]
    init = m.tokenizer.encode("chest", add_special_tokens=False)[0]
    assert torch.equal(weight[ti.new_token_ids[1]], weight[init])  # new rows start as the initializer word
    before = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)  # as if an optimizer step moved every row
    m.after_step(m.model, {}, torch.Generator(), 0)
    changed = (weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ti.new_token_ids)  # every other row restored


def test_a_strategy_refuses_another_strategys_checkpoint(base, tmp_path, data):
    m = _method(base, tmp_path, data, "unet")
    assert m.extra_state() == {"mode": "unet"}
    m.load_extra_state({"mode": "unet"})
    m.load_extra_state({})
    with pytest.raises(MeddiffError, match="trained with --method lora"):
        m.load_extra_state({"mode": "lora"})


def test_model_card_lines_say_how_to_load_each_export():
    def lines(method, **ft):
        s = finetune_strategy(method)(TrainConfig(finetune=FinetuneConfig(method=method, **ft)))
        return s.diffusers_usage(Path("RUN/x")), s.card_details()

    assert lines("unet") == (["pipe = StableDiffusionPipeline.from_pretrained('RUN/x', safety_checker=None)"], "")
    assert lines("lora")[0][1] == "pipe.load_lora_weights('RUN/x')"
    usage, details = lines("textual-inversion", placeholder_token="<t>", num_vectors=3)
    assert usage[1] == "pipe.load_textual_inversion('RUN/x/learned_embeds.safetensors', token='<t>')"
    assert details == "; placeholder <t> (3 vectors)"
    assert (
        lines("dreambooth", instance_prompt="a sks", class_prompt="a")[1]
        == "; instance prompt 'a sks', class prompt 'a'"
    )


def test_the_config_accepts_exactly_the_registered_strategies():
    choices = typing.get_args(typing.get_type_hints(FinetuneConfig)["method"])
    assert choices == FINETUNE_METHODS


def test_lora_on_the_text_encoder_with_a_too_old_peft_is_one_line():
    """transformers 5.x refuses peft < 0.22 for text-encoder adapters with a traceback; the strategy says so first."""
    from meddiff.training.methods.finetune.lora import check_text_encoder_adapters

    with pytest.raises(MeddiffError, match=r"needs peft >= 0\.22\.0 .*peft 0\.21\.2 is installed"):
        check_text_encoder_adapters("0.21.2", "0.22.0")
    check_text_encoder_adapters("0.22.0", "0.22.0")
    check_text_encoder_adapters("0.23.1", "0.22.0")
    check_text_encoder_adapters("0.22.0.dev0", "0.22.0")  # a development release of the needed one counts
    with pytest.raises(MeddiffError):
        check_text_encoder_adapters("0.9.0", "0.22.0")  # compared as numbers, not as text
