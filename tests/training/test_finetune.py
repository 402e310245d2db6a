"""Fine-tuning a (tiny, offline) pretrained Stable Diffusion with every method: the loss on a fixed set falls,
frozen parts stay bit-identical, exports reload with plain diffusers and sample, resume restores adapters and
embeddings exactly, and a hub id without a hub fails in one line."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.pipeline import encode_prompt
from meddiff.models.stable_diffusion import load_stable_diffusion, to_rgb
from meddiff.models.storage import load_pipeline
from meddiff.testing import build_tiny_stable_diffusion
from meddiff.training.config import FinetuneConfig, TrainConfig
from meddiff.training.loop import train

pytestmark = pytest.mark.slow
DATA = "phantom:?n=8&seed=5"
LR = {"unet": 1e-3, "unet+text": 5e-4, "text": 1e-3, "dreambooth": 1e-3, "lora": 3e-3, "textual-inversion": 2e-2}
INSTANCE = "chest x-ray with sks effusion"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA, 32)


def _config(base, out, method, steps=30, **ft):
    extra = (
        {"instance_prompt": INSTANCE, "class_prompt": "chest x-ray", "num_class_images": 4}
        if method == "dreambooth"
        else {}
    )
    return TrainConfig(
        data=DATA,
        out=str(out),
        method="finetune",
        resolution=32,
        batch_size=8,
        max_steps=steps,
        checkpoint_every=0,
        lr_warmup_steps=1,
        learning_rate=LR[method],
        cond_dropout=0.0,
        precision="fp32",
        ema=False,
        snr_gamma=None,
        finetune=FinetuneConfig(
            pretrained=str(base),
            method=method,
            validation_images=1,
            validation_prompts=["chest x-ray with edema"],
            **{**extra, **ft},
        ),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base, data):
    out = {}
    for method in ("unet", "unet+text", "text", "dreambooth", "lora", "textual-inversion"):
        root = tmp_path_factory.mktemp(method.replace("+", "_"))
        train(_config(base, root, method), data, progress=False)
        out[method] = root
    return out


def _prompts(method, data):
    if method == "dreambooth":
        return [INSTANCE] * len(data)
    if method == "textual-inversion":
        return [f"<lung-xray> {p}" for p in data.prompts]
    return list(data.prompts)


@torch.no_grad()
def _fixed_loss(base, data, unet, text_encoder, tokenizer, prompts, draws: int = 8):
    """Noise-prediction MSE on the training images, each at `draws` fixed (timestep, noise) pairs."""
    parts = load_stable_diffusion(str(base))
    x0 = parts.vae.encode(to_rgb(data.images)).latent_dist.mean * parts.vae.config.scaling_factor
    x0 = x0.repeat(draws, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(20, 980, (len(x0),), generator=g)
    xt = DDPMScheduler.from_pretrained(str(base), subfolder="scheduler").add_noise(x0, noise, t)
    states = encode_prompt(tokenizer, text_encoder, list(prompts) * draws)
    return F.mse_loss(unet(xt, t, encoder_hidden_states=states).sample, noise).item()


def _digest(module) -> str:
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("method", ["unet", "unet+text", "text", "dreambooth", "lora", "textual-inversion"])
def test_every_method_keeps_frozen_parts_and_lowers_the_loss(runs, base, data, method):
    parts = load_stable_diffusion(str(base))
    tuned = load_pipeline(runs[method])
    prompts = _prompts(method, data)
    base_tokenizer = parts.tokenizer
    if method == "textual-inversion":  # the base model does not know the token: compare with its initializer word
        base_prompts = [p.replace("<lung-xray>", "chest") for p in prompts]
    else:
        base_prompts = prompts
    if method != "textual-inversion":  # one token barely moves this tiny model's loss: tested on paired draws below
        before = _fixed_loss(base, data, parts.unet, parts.text_encoder, base_tokenizer, base_prompts)
        after = _fixed_loss(base, data, tuned.unet, tuned.text_encoder, tuned.tokenizer, prompts)
        assert after < before, (method, before, after)
    assert _digest(tuned.vae) == _digest(parts.vae)  # the autoencoder never trains
    if method in ("unet", "dreambooth", "lora"):
        assert _digest(tuned.text_encoder) == _digest(parts.text_encoder)
    if method in ("text", "textual-inversion"):
        assert _digest(tuned.unet) == _digest(parts.unet)
    if method in ("unet", "unet+text", "dreambooth", "text"):
        assert _digest(tuned.unet) != _digest(parts.unet) or method == "text"


def test_textual_inversion_lowers_the_loss_on_the_same_draws(tmp_path, base, data):
    """The same 30 steps (same batches, noise and timesteps) with the token frozen (lr 0) and learning."""
    losses = []
    for lr in (0.0, LR["textual-inversion"]):
        config = _config(base, tmp_path / f"ti_{lr}", "textual-inversion")
        config.learning_rate, config.log_every = lr, 1
        history = train(config, data, progress=False).loss_history
        losses.append(np.mean([loss for _, loss, _ in history[10:]]))
    assert losses[1] < losses[0], losses


def test_textual_inversion_learns_only_its_rows(runs, base):
    parts = load_stable_diffusion(str(base))
    tuned = load_pipeline(runs["textual-inversion"])
    old = parts.text_encoder.get_input_embeddings().weight
    new = tuned.text_encoder.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 1
    assert torch.equal(new[: old.shape[0]], old)  # every existing row unchanged
    init = parts.tokenizer.encode("chest", add_special_tokens=False)[0]
    assert not torch.allclose(new[-1], old[init])  # the new token moved away from its initializer
    saved = load_file(str(runs["textual-inversion"] / "textual_inversion" / "learned_embeds.safetensors"))
    assert list(saved) == ["<lung-xray>"] and torch.equal(saved["<lung-xray>"][0], new[-1])
    others = {k: v for k, v in tuned.text_encoder.state_dict().items() if "token_embedding" not in k}
    base_others = {k: v for k, v in parts.text_encoder.state_dict().items() if "token_embedding" not in k}
    assert all(torch.equal(v, base_others[k]) for k, v in others.items())


def test_lora_exports_only_adapter_weights(runs):
    weights = load_file(str(runs["lora"] / "lora" / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k for k in weights)
    assert not (runs["lora"] / "pipeline").exists()
    # the run, not its adapter folder, holds the privacy records (privacy/, training.json)
    from meddiff.models.storage import run_directory

    for method, adapter in (("lora", "lora"), ("textual-inversion", "textual_inversion")):
        assert run_directory(runs[method]) == runs[method] == run_directory(runs[method] / adapter)


def _sd_sample(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_exports_reload_with_plain_diffusers(runs, base):
    for method in ("unet", "unet+text", "text", "dreambooth"):
        sd = StableDiffusionPipeline.from_pretrained(
            runs[method] / "pipeline", safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        images = _sd_sample(sd, "chest x-ray with edema")
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    sd = StableDiffusionPipeline.from_pretrained(base)
    sd.load_lora_weights(str(runs["lora"] / "lora"))
    assert _sd_sample(sd, "chest x-ray").shape == (1, 32, 32, 3)
    sd = StableDiffusionPipeline.from_pretrained(base)
    sd.load_textual_inversion(
        str(runs["textual-inversion"] / "textual_inversion" / "learned_embeds.safetensors"), token="<lung-xray>"
    )
    assert _sd_sample(sd, "<lung-xray> chest x-ray").shape == (1, 32, 32, 3)
    for method in runs:  # and meddiff's own loader gives 1-channel images
        assert load_pipeline(runs[method])(
            prompt=["chest x-ray"], num_inference_steps=2, output_type="pt"
        ).images.shape == (1, 1, 32, 32)


def test_dreambooth_caches_its_class_images(runs):
    folder = runs["dreambooth"] / "class_images"
    assert len(list(folder.glob("*.png"))) == 4 and (folder / "class_images.json").is_file()
    assert (runs["dreambooth"] / "validation" / "final.txt").read_text().splitlines() == [
        f"row 1: {INSTANCE}",
        "row 2: chest x-ray",
    ]
    assert (runs["dreambooth"] / "validation" / "final.png").is_file()


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_resume_restores_adapters_and_embeddings(tmp_path, base, data, method):
    whole = _config(base, tmp_path / "whole", method, steps=4)
    train(whole, data, progress=False)
    half = _config(base, tmp_path / "half", method, steps=2)
    half.checkpoint_every = 2
    train(half, data, progress=False)
    rest = _config(base, tmp_path / "half", method, steps=4)
    rest.resume = "latest"
    train(rest, data, progress=False)
    name = (
        "lora/pytorch_lora_weights.safetensors" if method == "lora" else "textual_inversion/learned_embeds.safetensors"
    )
    a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "half" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_domain_text_encoder_gets_a_projection(tmp_path, base, data):
    config = _config(base, tmp_path / "minilm", "unet", steps=2, text_encoder="minilm")
    train(config, data, progress=False)
    tuned = load_pipeline(tmp_path / "minilm")
    assert tuned.unet.config.encoder_hid_dim == 384 and tuned.unet.config.encoder_hid_dim_type == "text_proj"
    sd = StableDiffusionPipeline.from_pretrained(
        tmp_path / "minilm" / "pipeline", safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    assert _sd_sample(sd, "chest x-ray with edema").shape == (1, 32, 32, 3)


def test_bad_fine_tune_requests_are_one_line(tmp_path, base, data):
    with pytest.raises(MeddiffError, match="hub is unreachable"):
        train(_config("someorg/not-a-cached-model", tmp_path / "a", "unet", steps=1), data, progress=False)
    with pytest.raises(MeddiffError, match="instance-prompt"):
        train(_config(base, tmp_path / "b", "dreambooth", steps=1, instance_prompt=""), data, progress=False)
    with pytest.raises(MeddiffError, match="initializer-token"):
        train(
            _config(base, tmp_path / "c", "textual-inversion", steps=1, initializer_token="pleural effusion"),
            data,
            progress=False,
        )
    with pytest.raises(MeddiffError, match="unknown fine-tuning method"):
        config = _config(base, tmp_path / "d", "unet", steps=1)
        config.finetune.method = "everything"
        train(config, data, progress=False)


def test_finetune_cli_then_generate_from_the_adapter(tmp_path, base, capsys):
    import csv

    from meddiff.cli import main

    run = tmp_path / "lora_run"
    assert (
        main(
            [
                "finetune",
                "--pretrained",
                str(base),
                "--data",
                DATA,
                "--method",
                "lora",
                "--resolution",
                "32",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    card = (run / "README.md").read_text()
    assert "load_lora_weights" in card and "not for diagnosis" in card
    assert (
        main(
            [
                "generate",
                "--model",
                str(run),
                "--prompt",
                "chest x-ray with edema",
                "--n",
                "2",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "gen" / "manifest.csv")))
    assert [r["prompt"] for r in rows] == ["chest x-ray with edema"] * 2
    assert main(["finetune", "--pretrained", str(tmp_path / "missing"), "--data", DATA, "--out", str(run)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_accumulation_checkpointing_noise_offset_and_validation_grids(tmp_path, base, data):
    config = _config(base, tmp_path / "opts", "unet", steps=2, gradient_checkpointing=True, validation_every=1)
    config.gradient_accumulation, config.noise_offset, config.batch_size = 2, 0.05, 4
    result = train(config, data, progress=False)
    assert result.steps == 2 and all(np.isfinite(loss) for _, loss, _ in result.loss_history)
    assert sorted(p.name for p in (tmp_path / "opts" / "validation").glob("*.png")) == [
        "final.png",
        "step-0000001.png",
        "step-0000002.png",
    ]
    from meddiff.training.methods.finetune import StableDiffusionFinetune

    assert StableDiffusionFinetune(config, data).model.is_gradient_checkpointing
    tuned = load_pipeline(tmp_path / "opts")
    assert tuned(prompt=["chest x-ray"], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 32, 32)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        config = _config(base, tmp_path / "adam8", "unet", steps=1)
        config.optimizer = "adamw8bit"
        with pytest.raises(MeddiffError, match="needs bitsandbytes"):
            train(config, data, progress=False)
