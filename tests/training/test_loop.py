import pytest
import torch
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.factory import ModelConfig
from meddiff.training.checkpoint import checkpoint_dirs
from meddiff.training.config import TrainConfig, load_config
from meddiff.training.loop import batch_indices, train

SMALL = ModelConfig(block_out_channels=[16, 32], layers_per_block=1)


def cfg(out, **kw):
    base = dict(
        data="phantom:?n=48&seed=5", out=str(out), batch_size=8, checkpoint_every=0, lr_warmup_steps=2, model=SMALL
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    return load_dataset("phantom:?n=48&seed=5", 32)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_resume_gives_identical_weights(tmp_path, data, precision):
    train(cfg(tmp_path / "straight", max_steps=8, precision=precision), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=4, precision=precision), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=8, precision=precision, resume="latest"), data, progress=False)
    for name in (
        "checkpoints/step-0000008/model.safetensors",
        "checkpoints/step-0000008/ema.safetensors",
        "pipeline/unet/diffusion_pytorch_model.safetensors",
    ):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # and training changed the weights at all
    first = load_file(tmp_path / "split" / "checkpoints/step-0000004/model.safetensors")
    last = load_file(tmp_path / "split" / "checkpoints/step-0000008/model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_checkpoints_are_pruned_and_time_budget_stops(tmp_path, data):
    result = train(
        cfg(tmp_path, max_steps=10_000, max_minutes=0.05, checkpoint_every=2, checkpoints_keep=2), data, progress=False
    )
    assert 0 < result.steps < 10_000 and result.train_seconds >= 3.0
    kept = checkpoint_dirs(tmp_path)
    assert len(kept) <= 2 and kept[-1].name == f"step-{result.steps:07d}"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs").is_dir()
    assert result.loss_history and result.loss_history[0][0] == 1


def test_a_long_run_is_announced_with_its_estimate_and_the_time_budget_option(tmp_path, data, monkeypatch, caplog):
    from meddiff.devices import machine_description, run_device
    from meddiff.training import loop

    assert loop.long_run_notice(20, 60.0, 100, "a CPU") is None  # 300 s left: short
    notice = loop.long_run_notice(20, 60.0, 2480, "a slow CPU")  # 3 s a step, 2 h left
    assert notice is not None and "2480 more steps at 3.00 s a step on a slow CPU: about 2.1 hours" in notice
    assert "--max-minutes" in notice and "--minutes" in notice
    assert "about 40 minutes" in (loop.long_run_notice(10, 10.0, 2400, "x") or "")
    assert loop.long_run_notice(0, 0.0, 100, "x") is None
    # in the loop: announced once, after WARMUP_STEPS untimed and ESTIMATE_AFTER_STEPS timed steps, only without
    # a time budget
    monkeypatch.setattr(loop, "WARMUP_STEPS", 1)
    monkeypatch.setattr(loop, "ESTIMATE_AFTER_STEPS", 2)
    monkeypatch.setattr(loop, "LONG_RUN_S", 0.0)
    timed = []
    real_long_run_notice = loop.long_run_notice

    def spy(steps_timed, seconds, steps_left, machine):
        timed.append((steps_timed, seconds))
        return real_long_run_notice(steps_timed, seconds, steps_left, machine)

    monkeypatch.setattr(loop, "long_run_notice", spy)
    clock = iter([100.0, 106.0])  # the synchronised clock read after warm-up step 1 and after timed step 3
    monkeypatch.setattr(loop, "synced_clock", lambda on: next(clock))
    with caplog.at_level("WARNING", logger="meddiff.training.loop"):
        train(cfg(tmp_path / "fixed", max_steps=5), data, progress=False)
    # the two timed steps (2 and 3) are all the estimate saw: not the start-up or step 1
    assert timed == [(2, 6.0)]
    said = [r.getMessage() for r in caplog.records if "more steps at" in r.getMessage()]
    assert (
        len(said) == 1
        and said[0].startswith("2 more steps at 3.00 s a step")
        and f" on {machine_description(run_device())}:" in said[0]
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="meddiff.training.loop"):
        train(cfg(tmp_path / "budget", max_steps=5, max_minutes=10), data, progress=False)
    assert not [r for r in caplog.records if "more steps at" in r.getMessage()]


def test_resume_without_checkpoint_is_an_error(tmp_path, data):
    with pytest.raises(MeddiffError, match="no checkpoint"):
        train(cfg(tmp_path, max_steps=2, resume="latest"), data, progress=False)


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(4) for i in batch_indices(32, 8, 0, step)]
    assert sorted(seen) == list(range(32))
    assert batch_indices(32, 8, 0, 4).tolist() != batch_indices(32, 8, 0, 0).tolist()


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("resolution: 28\nmodel:\n  prediction_type: v_prediction\n")
    config = load_config(path, {"batch_size": 4, "resolution": None})
    assert config.resolution == 28 and config.batch_size == 4 and config.model.prediction_type == "v_prediction"
    path.write_text("resolutoin: 28\n")
    with pytest.raises(MeddiffError, match="unknown config key"):
        load_config(path, {})


V_MODEL = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, prediction_type="v_prediction")


def test_v_prediction_trains_and_saves_a_v_prediction_model(tmp_path, data):
    import json

    from meddiff.models.factory import make_sampler
    from meddiff.models.storage import load_pipeline

    result = train(cfg(tmp_path, max_steps=3, model=V_MODEL), data, progress=False)
    assert result.steps == 3
    saved = json.loads((tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"
    pipe = load_pipeline(tmp_path)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for name in ("dpm++", "ddim", "ddpm"):  # every sampler built from the saved config keeps it
        assert make_sampler(name, pipe.scheduler.config).config.prediction_type == "v_prediction", name


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: remembers (x_t, t) and answers `answer(x_t, t)`."""

    def __init__(self, answer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a parameter, for the device lookup
        self.answer, self.seen = answer, []

    def forward(self, xt, t, **kwargs):
        from types import SimpleNamespace

        self.seen.append((xt.clone(), t.clone()))
        return SimpleNamespace(sample=self.answer(xt, t))


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_the_loss_target_is_v_or_the_noise(data, prediction):
    """The target for a fixed batch, computed by hand from the same generator draws: v = sqrt(a_t) eps -
    sqrt(1 - a_t) x0 for v-prediction, eps for epsilon; x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    from meddiff.training.methods.diffusion import PixelDiffusion

    model = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, prediction_type=prediction)
    method = PixelDiffusion(cfg("unused", model=model, conditioning="none", snr_gamma=None), data)
    x0 = data.images[:4].float()
    g = torch.Generator().manual_seed(11)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, method.noise_scheduler.config.num_train_timesteps, (4,), generator=g)
    a = method.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    target = v if prediction == "v_prediction" else eps

    unet = RecordingUNet(lambda xt, t: torch.zeros_like(xt))
    loss = method.denoising_loss(unet, x0, {}, torch.Generator().manual_seed(11))
    xt, t_seen = unet.seen[0]
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(loss, target.pow(2).mean(dim=(1, 2, 3)))  # a zero prediction scores |target|^2
    other = eps if prediction == "v_prediction" else v
    assert not torch.allclose(loss, other.pow(2).mean(dim=(1, 2, 3)), rtol=1e-2)
    exact = RecordingUNet(lambda xt, t_: target.clone())  # predicting the hand-computed target costs nothing
    assert method.denoising_loss(exact, x0, {}, torch.Generator().manual_seed(11)).abs().max() < 1e-10


def test_channels_last_trains_the_same_model_and_exports_plain_weights(tmp_path, data):
    """A speed option must not change what is learned: NHWC convolutions give the same weights up to float
    rounding, and the export loads as an ordinary (contiguous) diffusers U-Net."""
    from diffusers import UNet2DConditionModel

    train(cfg(tmp_path / "nchw", max_steps=3, precision="fp32"), data, progress=False)
    train(cfg(tmp_path / "nhwc", max_steps=3, precision="fp32", channels_last=True), data, progress=False)
    name = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "nchw" / name), load_file(tmp_path / "nhwc" / name)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "nhwc" / "pipeline" / "unet")
    assert unet.conv_in.weight.is_contiguous()


def _compiled_training(tmp_path, data):
    tiny = ModelConfig(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, attention_head_dim=8)
    result = train(cfg(tmp_path, max_steps=2, precision="fp32", compile=True, model=tiny), data, progress=False)
    weights = load_file(tmp_path / "pipeline/unet/diffusion_pytorch_model.safetensors")
    assert result.steps == 2 and not any(k.startswith("_orig_mod") for k in weights)
    assert "conv_in.weight" in weights


def test_compile_option_trains_and_exports_uncompiled_weights(tmp_path, data, monkeypatch):
    """--compile wraps the model in torch.compile (dynamo); the export unwraps it. Dynamo's eager backend here, so
    that the test checks the wrapping, not inductor's minutes of code generation (the extended test below)."""
    import torch

    real = torch.compile
    seen = []

    def eager(model=None, **kwargs):
        seen.append(kwargs.get("backend"))
        return real(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager)
    _compiled_training(tmp_path, data)
    assert seen and seen[0] == "inductor"  # what --compile asks for


@pytest.mark.slow
@pytest.mark.extended  # inductor compiles for about 80 s on 2 cores
def test_compile_option_with_inductor_trains_and_exports_uncompiled_weights(tmp_path, data):
    _compiled_training(tmp_path, data)


def test_speed_options_in_cli_reach_the_config(tmp_path):
    from meddiff.cli import _run_config, build_parser
    from meddiff.options import given

    args = build_parser().parse_args(
        ["train", "--data", "phantom:?n=8", "--out", str(tmp_path), "--channels-last", "--compile", "--threads", "1"]
    )
    config = _run_config(args, given(args))
    assert config.channels_last and config.compile and config.threads == 1
    plain = build_parser().parse_args(["train", "--data", "phantom:?n=8", "--out", str(tmp_path)])
    config = _run_config(plain, given(plain))
    assert not config.channels_last and not config.compile and config.threads is None


def test_shuffled_findings_reach_the_text_encoder(data):
    from meddiff.training.methods.diffusion import PixelDiffusion

    config = cfg("unused", conditioning="text", cond_dropout=0.0, resolution=32)
    config.text.shuffle_findings = True
    method = PixelDiffusion(config, data)
    seen = []

    def record(prompts):
        seen.append(list(prompts))
        return torch.zeros(len(prompts), 4, 384)

    method.prompt_cache = record
    rows = [i for i, p in enumerate(data.prompts) if " and " in p][:4]
    assert rows, "phantoms with two findings expected"
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        method.condition_kwargs(method.model, {"index": torch.tensor(rows)}, g, "cpu")
    for j, row in enumerate(rows):
        variants = {batch[j] for batch in seen}
        assert len(variants) > 1 and data.prompts[row] in variants
        findings = lambda text: sorted(text.split(" with ", 1)[1].replace(" and ", ", ").split(", "))  # noqa: E731
        assert all(findings(v) == findings(data.prompts[row]) for v in variants)
    from meddiff.cli import _run_config, build_parser
    from meddiff.options import given

    args = build_parser().parse_args(["train", "--data", "phantom:?n=8", "--out", "x", "--shuffle-findings"])
    assert given(args)["text.shuffle_findings"] is True
    assert _run_config(args, given(args)).text.shuffle_findings


def test_a_non_finite_loss_is_never_checkpointed(tmp_path, data, monkeypatch):
    """Host syncs happen only at logging steps, but a checkpoint step is checked too: a loss that turned NaN
    between two logging steps stops the run in one line before it is saved over the good checkpoints."""
    from meddiff.training.methods.diffusion import PixelDiffusion

    real = PixelDiffusion.loss
    calls = {"n": 0}

    def poisoned(self, model, batch, generator):
        calls["n"] += 1
        value = real(self, model, batch, generator)
        return value * float("nan") if calls["n"] >= 4 else value

    monkeypatch.setattr(PixelDiffusion, "loss", poisoned)
    with pytest.raises(MeddiffError, match="loss became nan by step 4"):
        train(cfg(tmp_path, max_steps=8, checkpoint_every=2, log_every=100), data, progress=False)
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step-0000002"]


FLOW_MODEL = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, objective="flow", flow_shift=2.0)


def test_flow_loss_target_is_the_velocity(data):
    """Flow objective, by hand from the same generator draws: noise first, then the logit-normal u, index
    floor(u T) into the shifted training sigmas; x_t = (1 - s) x0 + s noise, target noise - x0, timestep s T."""
    from meddiff.training.methods.diffusion import PixelDiffusion

    method = PixelDiffusion(cfg("unused", model=FLOW_MODEL, conditioning="none"), data)
    scheduler = method.noise_scheduler
    x0 = data.images[:4].float()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (4,), generator=g))
    index = (u * 1000).long()
    s = scheduler.sigmas[index].view(-1, 1, 1, 1)
    unet = RecordingUNet(lambda xt, t: torch.zeros_like(xt))
    loss = method.denoising_loss(unet, x0, {}, torch.Generator().manual_seed(3))
    xt, t_seen = unet.seen[0]
    torch.testing.assert_close(t_seen, scheduler.timesteps[index])
    torch.testing.assert_close(t_seen / 1000, s.flatten())  # timesteps are the noise levels times T
    torch.testing.assert_close(xt, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(dim=(1, 2, 3)))
    # the shift moved the levels up: with k = 2 the median level is 2/3, not 1/2
    assert 0.6 < float(scheduler.sigmas[500]) < 0.7


def test_flow_model_trains_saves_and_samples(tmp_path, data):
    import json

    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.generate import SamplingSettings, sample

    result = train(cfg(tmp_path, max_steps=3, model=FLOW_MODEL), data, progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(entry[1])) for entry in result.loss_history)
    saved = json.loads((tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FlowMatchEulerDiscreteScheduler" and saved["shift"] == 2.0
    pipe = load_pipeline(tmp_path)
    conditions = torch.zeros(2, 2 * len(pipe.label_names))
    for name in ("euler", "heun", "dpm++"):
        images = sample(pipe, conditions, SamplingSettings(steps=2, scheduler=name, precision="fp32"), progress=False)
        assert images.shape == (2, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1, name
