"""DP-SGD: per-sample gradients of the U-Net are right, batches are Poisson samples of patients (one image each),
each patient's gradient is clipped before the noise, epsilon follows the accountant, a DP run trains, resumes
exactly and states its guarantee; what DP cannot be combined with is one line."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from meddiff.models.factory import ModelConfig, build_unet
from meddiff.training.config import TrainConfig
from meddiff.training.differential_privacy import (
    DPConfig,
    PrivateTraining,
    contiguous_inputs,
    epsilon_spent,
    poisson_batch,
    privacy_units,
)
from meddiff.training.loop import train

pytest.importorskip("opacus")

SMALL = ModelConfig(block_out_channels=[16, 32], layers_per_block=1)


@pytest.fixture(scope="module")
def data():
    """48 phantom images of 24 patients (two images each)."""
    ds = load_dataset("phantom:?n=48&seed=5", 32)
    return dataclasses.replace(ds, patients=[f"P{i // 2:03d}" for i in range(len(ds))])


def cfg(out, **kw):
    base = dict(
        data="phantom:?n=48&seed=5", out=str(out), batch_size=6, checkpoint_every=0, lr_warmup_steps=1, model=SMALL,
        precision="fp32", dp=DPConfig(epsilon=8.0),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_per_sample_gradients_of_the_unet_are_those_of_one_image_backward_passes():
    """opacus' hooks on meddiff's label-conditioned U-Net (attention blocks hand permuted tensors to convolutions:
    without contiguous_inputs their per-sample gradients were zeros) against one backward pass per image."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    unet = build_unet(SMALL, 16, 2, in_channels=1)
    contiguous_inputs(unet)
    hooks = GradSampleModule(unet, batch_first=True, loss_reduction="mean", strict=True)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 50, 500])
    c = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])

    def loss(i):
        return (unet(x[i], t[i], class_labels=c[i], encoder_hidden_states=None).sample ** 2).mean(dim=(1, 2, 3)).mean()

    loss(slice(None)).backward()  # the module itself is called, as the training methods do
    per_sample = {n: p.grad_sample.clone() for n, p in unet.named_parameters()}
    hooks.disable_hooks()
    for i in range(3):
        unet.zero_grad()
        loss(slice(i, i + 1)).backward()
        # tolerance from the model's largest gradient: some are exactly zero in theory (attention key biases)
        scale = max(float(p.grad.abs().max()) for p in unet.parameters())
        for name, p in unet.named_parameters():
            assert torch.allclose(per_sample[name][i], p.grad, atol=1e-5 * scale, rtol=1e-3), name
    assert all(float(g.abs().sum()) > 0 for n, g in per_sample.items() if "conv" in n and n.endswith("weight"))


def test_batches_are_poisson_samples_of_patients_with_one_image_each():
    patients = [f"P{i % 50}" for i in range(200)]  # 50 patients, 4 images each, interleaved
    unit, members, starts = privacy_units(patients, 200, "auto")
    assert unit == "patient" and len(starts) - 1 == 50 and sorted(members.tolist()) == list(range(200))
    batches = [poisson_batch(members, starts, 0.2, seed=3, step=s) for s in range(400)]
    for b in batches:
        assert len({patients[i] for i in b}) == len(b)  # at most one image of a patient per step
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 10) < 4 * np.sqrt(50 * 0.2 * 0.8 / 400)  # E = q x patients, binomial spread
    assert sizes.std() > 1.5 and sizes.min() < 10 < sizes.max()  # not a fixed batch size
    assert len({i for b in batches for i in b}) == 200  # every image of a patient gets its turn
    assert poisson_batch(members, starts, 0.2, seed=3, step=7) == batches[7]  # a function of (seed, step)
    assert poisson_batch(members, starts, 0.2, seed=4, step=7) != batches[7]
    image_unit = privacy_units(patients, 200, "image")
    assert image_unit[0] == "image" and len(image_unit[2]) - 1 == 200
    assert privacy_units([], 200, "auto")[0] == "image"  # no ids: per image


def test_each_patients_gradient_is_clipped_before_the_mean():
    """No noise to speak of: the update is the sum of per-image gradients, each scaled to norm <= clip, divided by
    the expected batch size."""
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1, bias=False)
    private = PrivateTraining(DPConfig(noise_multiplier=1e-9, clip=0.5), [], 40, 4, 10, seed=0)
    opt = private.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"))
    x = torch.randn(3, 4) * torch.tensor([[10.0], [0.01], [3.0]])  # large, tiny and mid gradients
    w0 = model.weight.detach().clone()
    (model(x) ** 2).squeeze(1).mean().backward()
    opt.step()
    grads = 2 * (x @ w0.T) * x  # d(w.x)^2/dw per image
    clipped = grads * torch.clamp(0.5 / grads.norm(dim=1, keepdim=True), max=1.0)
    assert torch.allclose(w0 - model.weight.detach(), clipped.sum(0, keepdim=True) / 4, atol=1e-6)
    assert float(grads[0].norm()) > 0.5 > float(grads[1].norm())  # one clipped, one not


def test_with_noise_multiplicity_each_image_comes_k_times_and_its_rows_are_averaged_before_clipping():
    """--dp.multiplicity K: a drawn image is K consecutive rows (K time/noise draws); its per-sample gradient is the
    mean of its rows' gradients, clipped once: the update is as with K = 1, with that mean as the image's gradient."""
    patients = [f"P{i % 50}" for i in range(200)]
    _, members, starts = privacy_units(patients, 200, "auto")
    one = poisson_batch(members, starts, 0.2, seed=3, step=7)
    three = poisson_batch(members, starts, 0.2, seed=3, step=7, multiplicity=3)
    assert three == [i for i in one for _ in range(3)]  # the same draw, each image 3 times in a row

    torch.manual_seed(1)
    model = torch.nn.Linear(4, 1, bias=False)
    private = PrivateTraining(DPConfig(noise_multiplier=1e-9, clip=0.5, multiplicity=3), [], 40, 4, 10, seed=0)
    opt = private.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"))
    x = torch.randn(6, 4) * torch.tensor([[10.0], [10.0], [10.0], [0.01], [0.02], [0.03]])  # image A x3, B x3
    w0 = model.weight.detach().clone()
    (model(x) ** 2).squeeze(1).mean().backward()
    with pytest.raises(MeddiffError, match="6 per-sample gradients for 9 loaded rows"):
        private.merge_multiplicity(9)  # a method that changed the row count: one line, nothing mixed
    with pytest.raises(MeddiffError, match="4 loaded rows are not a multiple of --dp.multiplicity 3"):
        private.merge_multiplicity(4)
    private.merge_multiplicity(6)
    assert model.weight.grad_sample.shape == (2, 1, 4)  # one gradient per drawn image
    opt.step()
    rows = 2 * (x @ w0.T) * x  # per-row gradients
    per_image = rows.reshape(2, 3, 4).mean(1)
    clipped = per_image * torch.clamp(0.5 / per_image.norm(dim=1, keepdim=True), max=1.0)
    assert torch.allclose(w0 - model.weight.detach(), clipped.sum(0, keepdim=True) / 4, atol=1e-6)
    assert float(per_image[0].norm()) > 0.5 > float(per_image[1].norm())
    assert private.report(0)["multiplicity"] == 3


def test_a_dp_run_with_noise_multiplicity_trains_and_states_it(tmp_path, data):
    dp = DPConfig(epsilon=8.0, multiplicity=2)
    result = train(cfg(tmp_path / "k2", max_steps=3, dp=dp), data, progress=False)
    report = json.loads((tmp_path / "k2" / "training.json").read_text())["differential_privacy"]
    assert report["multiplicity"] == 2 and report["steps"] == 3 and 0 < report["epsilon"] <= 8.0
    # the accountant does not see K: the same epsilon and noise as K = 1 (K costs compute, not privacy)
    plain = PrivateTraining(DPConfig(epsilon=8.0), data.patients, len(data), 6, 3, seed=0)
    assert report["noise_multiplier"] == pytest.approx(plain.noise_multiplier, rel=1e-4)
    from meddiff.models.card import privacy_section
    from meddiff.models.storage import load_pipeline

    assert "2 noise draws per image averaged before clipping" in " ".join(privacy_section(tmp_path / "k2").lines)
    assert all(torch.isfinite(p).all() for p in load_pipeline(result.pipeline_dir).unet.parameters())
    with pytest.raises(MeddiffError, match="--dp.multiplicity needs differential privacy"):
        train(cfg(tmp_path / "nodp", max_steps=1, dp=DPConfig(multiplicity=2)), data, progress=False)


def test_noise_is_calibrated_to_the_target_epsilon_and_epsilon_grows_with_steps():
    private = PrivateTraining(DPConfig(epsilon=4.0), [], 1000, 20, 500, seed=0)
    assert private.delta == pytest.approx(1e-5) and private.rate == pytest.approx(0.02)

    def spent(sigma, steps, accountant="rdp"):
        return epsilon_spent(sigma, 0.02, steps, 1e-5, accountant)

    sigma = private.noise_multiplier
    assert 3.95 <= spent(sigma, 500) <= 4.0 and spent(0.99 * sigma, 500) > 4.0  # the smallest noise that does
    assert spent(sigma, 250) < spent(sigma, 500) < spent(sigma, 1000)
    assert spent(2 * sigma, 500) < spent(sigma, 500)  # more noise, less epsilon
    for _ in range(500):
        private.step_done()
    assert private.report(500)["epsilon"] == pytest.approx(spent(sigma, 500), abs=1e-4)
    prv = PrivateTraining(DPConfig(epsilon=4.0, accountant="prv"), [], 1000, 20, 500, seed=0)
    assert prv.noise_multiplier <= sigma  # PRV is tighter than RDP: less noise for the same epsilon
    assert 3.9 <= spent(prv.noise_multiplier, 500, "prv") <= 4.02
    small = PrivateTraining(DPConfig(epsilon=1.0), [], 100, 5, 10, seed=0)
    assert small.delta == pytest.approx(1e-5) and spent(small.noise_multiplier, 10) > 0
    assert epsilon_spent(small.noise_multiplier, 0.05, 10, 1e-5, "rdp") <= 1.0


def test_a_dp_run_trains_per_patient_resumes_exactly_and_states_its_guarantee(tmp_path, data):
    from meddiff.models.card import privacy_section
    from meddiff.models.storage import load_pipeline

    result = train(cfg(tmp_path / "straight", max_steps=6), data, progress=False)
    dp = json.loads((tmp_path / "straight" / "training.json").read_text())["differential_privacy"]
    assert dp["unit"] == "patient" and dp["units"] == 24 and dp["steps"] == 6
    assert dp["sample_rate"] == pytest.approx(6 / 24) and 0 < dp["epsilon"] <= 8.0 and dp["noise_multiplier"] > 0
    assert result.summary is not None and result.summary.differential_privacy == dp
    lines = " ".join(privacy_section(tmp_path / "straight").lines)
    assert "-DP per patient" in lines and "24 patients" in lines and f"{dp['epsilon']:.3g}" in lines
    pipe = load_pipeline(result.pipeline_dir)
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())

    # resumed: a run stopped at step 3 (its noise was calibrated for 3 steps) continues with the noise that keeps
    # the whole run at the target, and the accountant composes both stretches
    train(cfg(tmp_path / "split", max_steps=3), data, progress=False)
    split = train(cfg(tmp_path / "split", max_steps=6, resume="latest"), data, progress=False).summary
    assert split is not None and split.differential_privacy is not None
    resumed = split.differential_privacy
    (first_noise, _, first), (second_noise, _, second) = resumed["history"]
    assert (first, second) == (3, 3)
    assert first_noise < dp["noise_multiplier"] < second_noise  # 3 steps at eps 8 need less; the rest pays for it
    assert resumed["epsilon"] <= 8.0 and resumed["steps"] == 6
    with pytest.raises(MeddiffError, match="nothing is left"):  # the target already spent: one line
        train(cfg(tmp_path / "split", max_steps=9, resume="latest", dp=DPConfig(epsilon=0.5)), data, progress=False)


def test_a_resumed_dp_run_draws_the_same_batches_and_noise(tmp_path, data, monkeypatch):
    """Given the run's key (restored from the checkpoint on resume; fixed here so that the uninterrupted run can be
    compared), the resumed run trains the same weights."""
    import meddiff.training.differential_privacy as dpmod

    keys = iter(["ab" * 16, "ab" * 16, "cd" * 16])  # straight, split, and a fresh key the resume must replace
    monkeypatch.setattr(dpmod.secrets, "token_hex", lambda n: next(keys))
    fixed = DPConfig(noise_multiplier=1.2)
    train(cfg(tmp_path / "straight", max_steps=6, dp=fixed), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=3, dp=fixed), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=6, resume="latest", dp=fixed), data, progress=False)
    name = "checkpoints/step-0000006/model.safetensors"
    a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same Poisson batches and the same noise, step by step
    first = load_file(tmp_path / "split" / "checkpoints/step-0000003/model.safetensors")
    assert any(not torch.equal(first[k], b[k]) for k in b)
    one = json.loads((tmp_path / "straight" / "training.json").read_text())["differential_privacy"]
    two = json.loads((tmp_path / "split" / "training.json").read_text())["differential_privacy"]
    assert one["epsilon"] == pytest.approx(two["epsilon"], rel=1e-6)  # 6 steps at sigma 1.2 either way


def test_an_empty_poisson_batch_is_a_noise_only_step(tmp_path, data, monkeypatch):
    """Every batch drawn empty: the run still steps (weights move by noise alone) and reports its epsilon."""
    import meddiff.training.differential_privacy as dpmod

    monkeypatch.setattr(dpmod, "poisson_batch", lambda *a, **k: [])
    result = train(cfg(tmp_path / "empty", max_steps=2, dp=DPConfig(noise_multiplier=1.0)), data, progress=False)
    assert result.steps == 2
    w = load_file(tmp_path / "empty" / "checkpoints/step-0000002/model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_the_noise_of_a_step_has_std_noise_multiplier_times_clip_over_the_expected_batch():
    """An empty step with SGD at lr 1: the update is the noise alone, N(0, (sigma C / B)^2) per weight."""
    model = torch.nn.Linear(200, 100, bias=False)
    private = PrivateTraining(DPConfig(noise_multiplier=2.0, clip=0.5), [], 400, 8, 10, seed=0)
    opt = private.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), torch.device("cpu"))
    w0 = model.weight.detach().clone()
    private.before_step(0)
    private.empty_batch()
    opt.step()
    update = (w0 - model.weight.detach()).flatten()
    assert abs(float(update.mean())) < 0.01 * 0.125 * 5
    assert float(update.std()) == pytest.approx(2.0 * 0.5 / 8, rel=0.03)  # 20,000 draws: ~0.5 % spread


def test_the_draws_are_secret_two_runs_with_one_config_differ_and_the_key_stays_in_checkpoints(tmp_path, data):
    fixed = DPConfig(noise_multiplier=1.0)
    for name in ("a", "b"):
        train(cfg(tmp_path / name, max_steps=2, dp=fixed), data, progress=False)
    a = load_file(tmp_path / "a" / "checkpoints/step-0000002/model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints/step-0000002/model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed, other secret: other batches and noise
    key = json.loads(next((tmp_path / "a" / "checkpoints").glob("*/state.json")).read_text())["dp_key"]
    assert len(key) == 32
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md", ".txt") and path.name != "state.json":
            assert key not in path.read_text(errors="ignore"), path


@pytest.mark.parametrize(
    "dp, extra, message",
    [
        (DPConfig(epsilon=2, noise_multiplier=1), {}, "not both"),
        (DPConfig(epsilon=2, unit="patient"), {"no_ids": True}, "needs patient ids"),
        (DPConfig(epsilon=2), {"batch_size": 24}, "must be below the number of patients"),
        (DPConfig(epsilon=2), {"gradient_accumulation": 2}, "gradient_accumulation must be 1"),
        (DPConfig(epsilon=2), {"method": "autoencoder"}, "not supported for the 'autoencoder' method"),
        (DPConfig(epsilon=2), {"privacy": {"every": 2, "stop": True}}, "privacy.stop is refused"),
        (DPConfig(epsilon=2), {"text": {"train_encoder": True}}, "text.train-encoder is not supported"),
    ],
)
def test_what_dp_cannot_do_is_one_line(tmp_path, data, dp, extra, message):
    use = dataclasses.replace(data, patients=()) if extra.pop("no_ids", False) else data
    if "privacy" in extra or "text" in extra:  # nested sections through the config loader
        from meddiff.training.config import PrivacyMonitorConfig, TextConfig

        extra = {k: (PrivacyMonitorConfig if k == "privacy" else TextConfig)(**v) for k, v in extra.items()}
    with pytest.raises(MeddiffError, match=message) as err:
        train(cfg(tmp_path / "bad", max_steps=2, dp=dp, **extra), use, progress=False)
    assert "\n" not in str(err.value)


def test_without_opacus_dp_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(MeddiffError, match=r"pip install 'meddiff\[dp\]'"):
        PrivateTraining(DPConfig(epsilon=1.0), [], 100, 5, 10, seed=0)


def test_dp_options_reach_the_config_from_the_command_line():
    from meddiff.training.config import load_config

    c = load_config(None, {"dp.epsilon": 3.0, "dp.unit": "image", "dp.accountant": "prv"})
    assert c.dp.enabled and c.dp.epsilon == 3.0 and c.dp.unit == "image" and c.dp.accountant == "prv"
    assert not TrainConfig().dp.enabled
    with pytest.raises(MeddiffError):
        load_config(None, {"dp.unit": "hospital"})


def test_a_dp_run_can_start_from_a_model_trained_on_other_data(tmp_path, data):
    """--init-from: the U-Net starts from another run's weights (e.g. public data), the DP run then trains from
    there, and its report and card say that the starting model's data is outside the guarantee."""
    from meddiff.models.card import privacy_section
    from meddiff.models.storage import load_pipeline
    from meddiff.training.methods import METHODS

    public = train(cfg(tmp_path / "public", max_steps=3, dp=DPConfig()), data, progress=False)
    start = load_pipeline(public.pipeline_dir).unet.state_dict()
    private_cfg = cfg(tmp_path / "private", max_steps=2, init_from=str(tmp_path / "public"))
    method = METHODS["pixel"](private_cfg, data)
    method.initialise_from(private_cfg.init_from)
    assert all(torch.equal(v, start[k]) for k, v in method.model.state_dict().items())  # every weight, EMA's
    train(private_cfg, data, progress=False)
    dp = json.loads((tmp_path / "private" / "training.json").read_text())["differential_privacy"]
    assert dp["init_from"] == str(tmp_path / "public") and 0 < dp["epsilon"] <= 8.0
    lines = " ".join(privacy_section(tmp_path / "private").lines)
    assert f"started from the weights of {tmp_path / 'public'}" in lines and "outside this guarantee" in lines
    # another model, other labels, no model: one line each, before any training
    other = cfg(tmp_path / "x", init_from=str(tmp_path / "public"), model=ModelConfig(block_out_channels=[8, 16]))
    with pytest.raises(MeddiffError, match="its U-Net is not this run's model"):
        train(other, data, progress=False)
    relabelled = dataclasses.replace(data, label_names=list(reversed(data.label_names)))
    with pytest.raises(MeddiffError, match="its labels .* are not this run's"):
        METHODS["pixel"](private_cfg, relabelled).initialise_from(private_cfg.init_from)
    with pytest.raises(MeddiffError, match="does not exist"):
        train(cfg(tmp_path / "y", init_from=str(tmp_path / "nothing")), data, progress=False)
    from meddiff.training.methods.finetune.base import StableDiffusionFinetune

    finetune = StableDiffusionFinetune.__new__(StableDiffusionFinetune)  # fine-tuning starts from --pretrained
    with pytest.raises(MeddiffError, match="--init-from is for pixel and latent diffusion"):
        finetune.initialise_from(str(tmp_path / "public"))


def test_lora_fine_tuning_of_stable_diffusion_trains_privately(tmp_path):
    """DP-SGD on LoRA adapters (the frozen U-Net gets no per-sample gradients): a tiny Stable Diffusion, a
    per-patient guarantee, adapters exported; DreamBooth (generated class images in the batch) is refused."""
    from meddiff.testing import build_tiny_stable_diffusion
    from meddiff.training.config import FinetuneConfig

    base = build_tiny_stable_diffusion(tmp_path / "tiny_sd")
    ds = load_dataset("phantom:?n=16&seed=5", 32)
    ds = dataclasses.replace(ds, patients=[f"P{i // 2}" for i in range(len(ds))])

    def config(out, method):
        return TrainConfig(
            data="phantom:?n=16&seed=5", out=str(out), method="finetune", resolution=32, batch_size=3, max_steps=3,
            checkpoint_every=0, precision="fp32", dp=DPConfig(noise_multiplier=1.0, clip=0.1),
            finetune=FinetuneConfig(pretrained=str(base), method=method, instance_prompt="chest x-ray with sks"),
        )  # fmt: skip

    train(config(tmp_path / "lora", "lora"), ds, progress=False)
    dp = json.loads((tmp_path / "lora" / "training.json").read_text())["differential_privacy"]
    assert dp["unit"] == "patient" and dp["units"] == 8 and dp["epsilon"] > 0 and dp["steps"] == 3
    adapters = load_file(tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all("lora" in k for k in adapters)
    with pytest.raises(MeddiffError, match="not supported for the 'finetune' method"):
        train(config(tmp_path / "db", "dreambooth"), ds, progress=False)
