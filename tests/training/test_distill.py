"""Few-step distillation: the student starts as its teacher, the consistency pieces are right, `meddiff distill`
gives a model that loads and samples everywhere a model does, in the promised number of network evaluations."""

import argparse
import copy
import json

import numpy as np
import pytest
import torch
import yaml

from meddiff.errors import MeddiffError
from meddiff.models.factory import make_sampler
from meddiff.models.pipeline import guidance_embedding
from meddiff.models.storage import load_pipeline
from meddiff.training.methods.distill import consistency_scalings, x0_and_eps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_network_output_converts_back_to_x0_and_noise(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    abar = torch.tensor([0.9, 0.3, 0.01]).view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    output = eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    got_x0, got_eps = x0_and_eps(output, xt, abar, prediction)
    torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_eps, eps, atol=1e-5, rtol=1e-5)


def test_consistency_boundary_condition():
    c_skip, c_out = consistency_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x: the image itself
    assert c_skip[2] < 1e-6 and abs(float(c_out[2]) - 1) < 1e-6  # at high noise f is the network's estimate
    from diffusers import LCMScheduler

    # the same formula the sampler applies (diffusers' LCMScheduler)
    lcm = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 19, 999):
        skip, out = lcm.get_scalings_for_boundary_condition_discrete(t)
        s, o = consistency_scalings(torch.tensor([t]))
        assert abs(float(skip) - float(s)) < 1e-6 and abs(float(out) - float(o)) < 1e-6


def test_guidance_embedding_tells_scales_apart():
    e = guidance_embedding(torch.tensor([1.0, 1.5, 3.0]), 64)
    assert e.shape == (3, 64) and torch.isfinite(e).all()
    assert (e[0] - e[1]).abs().max() > 0.1 and (e[1] - e[2]).abs().max() > 0.1
    assert guidance_embedding(torch.tensor([2.0]), 7).shape == (1, 7)


def _distill_config(teacher, out, **distill):
    from meddiff.training.config import DistillConfig, TrainConfig

    return TrainConfig(
        data="phantom:?n=64&seed=3",
        out=str(out),
        method="distill",
        resolution=32,
        batch_size=8,
        max_steps=2,
        checkpoint_every=0,
        lr_warmup_steps=1,
        learning_rate=1e-4,
        distill=DistillConfig(teacher=str(teacher), **distill),
    )


def test_student_starts_as_the_teacher(tiny_run):
    """The guidance input's projection starts at zero: before training, the student's output is the teacher's,
    whatever guidance scale it is given."""
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused")
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 400])
    labels = torch.zeros(2, 2 * len(method.codec.label_names))
    with torch.no_grad():
        teacher = method.teacher.unet(x, t, encoder_hidden_states=None, class_labels=labels).sample
        for scale in (1.0, 3.0):
            w = guidance_embedding(torch.full((2,), scale), config.distill.guidance_dim)
            student = method.student(x, t, encoder_hidden_states=None, class_labels=labels, timestep_cond=w).sample
            torch.testing.assert_close(student, teacher)
            # and it is read as the teacher reads it: the same clean-image estimate (clipped to the pixel range)
            estimate = method.consistency(
                method.student, x, t, {"class_labels": labels, "encoder_hidden_states": None}, w
            )
            abar = method.abar[t].view(-1, 1, 1, 1)
            x0, _ = x0_and_eps(teacher, x, abar, method.teacher.scheduler.config["prediction_type"])
            c_skip, c_out = consistency_scalings(t)
            expected = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0.clamp(-1, 1)
            torch.testing.assert_close(estimate, expected)
    assert method.student.config.time_cond_proj_dim == config.distill.guidance_dim
    scheduler = method.student_scheduler()
    assert scheduler.config.prediction_type == method.teacher.scheduler.config["prediction_type"]
    assert scheduler.config.clip_sample and scheduler.config.clip_sample_range == 1.0
    # LCM's teacher steps: one solver interval down the uniform grid, the last to the clean image
    every = torch.arange(len(method.grid))
    assert method.teacher_step_to(every).tolist() == (method.grid - method.skip).tolist()
    assert method.teacher_step_to(every)[0] == -1


def test_an_ema_target_network_trails_the_student_and_resumes_exactly(tiny_run, tmp_path):
    """target_decay > 0: the target starts as the student, moves by (1 - decay) towards it after each step, and is
    saved with the checkpoint, so that a resumed run ends with the same student as an uninterrupted one."""
    from accelerate import Accelerator

    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", target_decay=0.5)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    method.setup(Accelerator(cpu=True))
    assert method.target is not None and method.target is not method.student
    before = [p.detach().clone() for p in method.target.parameters()]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_step(method.student, {}, torch.Generator(), 1)
    for old, new, s in zip(before, method.target.parameters(), method.student.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * s)
    assert ConsistencyDistillation(_distill_config(tiny_run, "unused"), method.dataset).target is None  # default

    assert_resumed_run_matches_whole_run(tiny_run, tmp_path, load_dataset(config.data, 32), target_decay=0.5)


def assert_resumed_run_matches_whole_run(tiny_run, tmp_path, data, **distill):
    """3 distillation steps in one go and as 1 + 2 resumed from the checkpoint give the same student (returned): side
    networks' weights and optimizer state must come back for step 3's student to match."""
    from meddiff.training.loop import train

    whole = _distill_config(tiny_run, tmp_path / "whole", **distill)
    whole.max_steps = 3
    train(whole, data, progress=False)
    part = _distill_config(tiny_run, tmp_path / "part", **distill)
    part.max_steps, part.checkpoint_every = 1, 1
    train(part, data, progress=False)
    part.max_steps, part.resume = 3, "latest"
    train(part, data, progress=False)
    a, b = load_pipeline(tmp_path / "whole").unet, load_pipeline(tmp_path / "part").unet
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
    return a


def test_resuming_with_another_target_network_setting_is_one_line(tiny_run, tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.errors import MeddiffError
    from meddiff.training.loop import train

    config = _distill_config(tiny_run, tmp_path)
    config.max_steps, config.checkpoint_every = 1, 1
    data = load_dataset(config.data, 32)
    train(config, data, progress=False)
    again = _distill_config(tiny_run, tmp_path, target_decay=0.5)
    again.max_steps, again.resume = 2, "latest"
    with pytest.raises(MeddiffError, match=r"holds 1 network\(s\), this run prepares 2; resume with the settings"):
        train(again, data, progress=False)


def test_distill_gives_a_model_that_samples_in_the_promised_evaluations(tiny_run, tmp_path):
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import distilled_info

    config = _distill_config(tiny_run, tmp_path, steps=2)
    from meddiff.data.spec import load_dataset

    result = train(config, load_dataset(config.data, 32), progress=False)
    assert result.steps == 2
    pipe = load_pipeline(tmp_path)  # a normal meddiff model
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.guidance_dim == 64
    info = distilled_info(tmp_path / "pipeline")
    assert info is not None and info["steps"] == 2 and info["teacher"].endswith(tiny_run.name)
    for name in ("dpm++", "ddim"):  # whatever is asked for, a consistency student gets its own sampler
        assert type(make_sampler(name, pipe.scheduler.config)).__name__ == "LCMScheduler"
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    conditions = pipe.encode_labels([["Cardiomegaly"], ["Pleural Effusion"], []])
    settings = SamplingSettings(steps=2, guidance=2.5, precision="fp32")
    images = sample(pipe, conditions, settings, progress=False)
    hook.remove()
    assert images.shape == (3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert rows == [3, 3]  # two evaluations per image, guidance included: no doubled batch
    again = sample(pipe, conditions[:1], settings, progress=False)
    assert abs(again[0] - images[0]).max() < 1e-5  # per-image seeds: the same image whatever the batch
    # and plain diffusers loads the student too (the pipeline.py saved next to it)
    from diffusers import DiffusionPipeline

    folder = tmp_path / "pipeline"
    plain = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    out = plain(conditions=plain.encode_labels([["Cardiomegaly"]]), num_inference_steps=2, guidance_scale=2.0).images
    assert out.shape == (1, 32, 32, 1) and type(plain.scheduler).__name__ == "LCMScheduler"


def test_phase_grid_is_the_students_own_ddim_grid():
    from diffusers import DDIMScheduler

    from meddiff.training.methods.distill import phase_grid

    sampler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)
    starts, ends = phase_grid(sampler, 4, 1000)
    assert starts.tolist() == [999, 749, 499, 249] and ends.tolist() == [749, 499, 249, -1]  # -1: the clean image
    starts, ends = phase_grid(sampler, 1, 1000)
    assert starts.tolist() == [999] and ends.tolist() == [-1]
    starts, ends = phase_grid(sampler, 3, 1000)  # where DDIMScheduler.step lands: 333, not the next start 332
    assert starts.tolist() == [999, 666, 332] and ends.tolist() == [666, 333, -1]
    starts, ends = phase_grid(sampler, 6, 1000)
    assert ends[-1] == 0  # 6 does not divide 1000: DDIM's last step ends at timestep 0


@pytest.mark.parametrize(
    "prediction,steps,clip",
    [("epsilon", 4, True), ("v_prediction", 4, True), ("epsilon", 3, True), ("v_prediction", 7, True),
     ("epsilon", 4, False)],
)  # fmt: skip
def test_a_phased_student_is_trained_on_the_jumps_its_ddim_sampler_takes(tiny_run, prediction, steps, clip):
    """The phased consistency function f(x, t -> end) is exactly what the saved DDIMScheduler's step computes from
    the same network output, for every phase (so training and sampling agree), and a teacher step that reaches the
    phase's end is its own target. clip False: a latent model's student (no fixed data range, nothing clipped)."""
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", consistency="phased", steps=steps)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    method.prediction = prediction
    if not clip:
        method.x0_clip = None  # as for a latent teacher
    method.teacher.scheduler.register_to_config(prediction_type=prediction)
    sampler = method.student_scheduler()
    assert type(sampler).__name__ == "DDIMScheduler" and sampler.config.prediction_type == prediction
    assert sampler.config.clip_sample == clip
    assert set(method.phase_starts.tolist()) <= set(method.grid.tolist())  # phase starts are training points
    sampler.set_timesteps(steps)
    g = torch.Generator().manual_seed(2)
    labels = torch.zeros(1, 2 * len(method.codec.label_names))
    cond = {"class_labels": labels, "encoder_hidden_states": None}
    w = guidance_embedding(torch.full((1,), 2.0), config.distill.guidance_dim)
    with torch.no_grad():
        for start, end in zip(method.phase_starts.tolist(), method.phase_ends.tolist()):
            x = torch.randn(1, 1, 32, 32, generator=g)
            t = torch.tensor([start])
            got = method.consistency(method.student, x, t, cond, w, torch.tensor([end]))
            out = method.student(x, t, timestep_cond=w, **cond).sample
            expected = sampler.step(out, start, x).prev_sample
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # every training point's phase ends where the sampler's step from that phase's start lands
        t_hi = method.grid
        starts = method.phase_starts
        end = method.phase_ends[(starts.view(1, -1) >= t_hi.view(-1, 1)).sum(1) - 1]
        lands = method.teacher_step_to(torch.arange(len(t_hi)))
        for t, e, lo in zip(t_hi.tolist(), end.tolist(), lands.tolist()):
            start = min(s for s in starts.tolist() if s >= t)  # the phase t lies in
            assert e == max(start - 1000 // steps, -1) and e < t
            # the teacher's step is at most `skip` long and lands where the student is trained (or the clean image)
            assert 0 < t - lo <= method.skip and (lo in t_hi.tolist() or lo == -1)
    # the loss is finite and trains the student (the guidance input included); its targets are taken at training
    # points, the clean image or a phase's end (where the teacher's step is the target itself)
    calls = []
    evaluate = method.consistency_from  # every consistency evaluation, target and prediction, goes through it

    def recorded(out, x, t, *args):
        calls.append((t.clone(), args[-1].clone()))
        return evaluate(out, x, t, *args)

    method.consistency_from = recorded
    uniform = set((torch.arange(1, config.distill.solver_steps + 1) * method.skip - 1).tolist())
    off_grid = set(method.phase_starts.tolist()) - uniform  # phase starts between the teacher's grid points
    trained = set(method.grid.tolist()) | {-1}
    for seed in range(50):  # until a batch has drawn an off-grid start (the case a plain t - skip gets wrong)
        calls.clear()
        method.student.zero_grad()
        loss = method.loss(method.student, method.batch(torch.arange(8), "cpu"), torch.Generator().manual_seed(seed))
        (t_target, end), (t_prediction, _) = calls
        assert set(t_prediction.tolist()) <= set(method.grid.tolist()) and (t_target < t_prediction).all()
        assert all(t in trained or t == e for t, e in zip(t_target.tolist(), end.tolist()))
        if off_grid & set(t_prediction.tolist()):
            break
    assert off_grid & set(t_prediction.tolist())
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert method.student.time_embedding.cond_proj.weight.grad.abs().sum() > 0


def test_phase_loss_clean_weighs_early_phases_in_clean_image_units(tiny_run):
    """phase_loss clean divides both phase-end images by the signal scale at the phase's end: the same loss as
    noisy in the last phase (it ends at the clean image), a larger one in the first (its end is mostly noise)."""
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    losses = {}
    for phase_loss in ("noisy", "clean"):
        config = _distill_config(tiny_run, "unused", consistency="phased", steps=4, phase_loss=phase_loss)
        method = ConsistencyDistillation(config, load_dataset(config.data, 32))
        batch = method.batch(torch.arange(4), "cpu")
        for point in (19, 999):  # in the last phase (ends at -1) and in the first (ends at 749)
            method.grid = torch.tensor([point])
            with torch.no_grad():
                losses[phase_loss, point] = float(method.loss(method.student, batch, torch.Generator().manual_seed(0)))
    assert losses["clean", 19] == pytest.approx(losses["noisy", 19], rel=1e-5)
    assert losses["clean", 999] > 1.5 * losses["noisy", 999]


def test_a_phased_student_samples_deterministically_in_its_steps(tiny_run, tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import distilled_info

    config = _distill_config(tiny_run, tmp_path, consistency="phased", steps=2)
    train(config, load_dataset(config.data, 32), progress=False)
    pipe = load_pipeline(tmp_path)
    assert pipe.phased_steps == 2 and pipe.guidance_dim == 64
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    info = distilled_info(tmp_path / "pipeline")
    assert info is not None and info["consistency"] == "phased" and "phased" in info["method"]
    for name in ("dpm++", "lcm", "ddpm"):  # whatever is asked for, the student keeps its own DDIM grid
        chosen = make_sampler(name, pipe.scheduler.config, phased=True)
        assert type(chosen).__name__ == "DDIMScheduler" and chosen.config.timestep_spacing == "trailing"
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[0], int(args[1]))))
    conditions = pipe.encode_labels([["Cardiomegaly"], []])
    settings = SamplingSettings(steps=2, guidance=2.0, precision="fp32", scheduler="dpm++")
    images = sample(pipe, conditions, settings, progress=False)
    hook.remove()
    assert seen == [(2, 999), (2, 499)]  # two evaluations per image at the phase starts, guidance embedded
    assert images.shape == (2, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    # asked for another step count (generate's default 20), it still samples in its own two
    seen.clear()
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[0], int(args[1]))))
    again = sample(pipe, conditions, SamplingSettings(steps=20, guidance=2.0, precision="fp32"), progress=False)
    hook.remove()
    assert seen == [(2, 999), (2, 499)] and np.abs(again - images).max() < 1e-5
    with pytest.raises(MeddiffError, match="already distilled"):
        from meddiff.training.methods.distill import distillable

        distillable(pipe)


def test_distill_cli_writes_card_and_metrics(tiny_run, tmp_path):
    from meddiff.cli import main

    out = tmp_path / "fast"
    main(
        [
            "-q",
            "distill",
            "--model",
            str(tiny_run),
            "--out",
            str(out),
            "--steps",
            "1",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--no-eval",
            "--eval.grid-per-label",
            "2",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "distill" and metrics["distillation"]["network_evaluations_per_image"] == 1
    assert metrics["distillation"]["teacher_network_evaluations_per_image"] == 40  # 20 steps x 2 (guidance)
    assert metrics["data"] == "phantom:?n=64&seed=3"  # the teacher's data, from its config.yaml
    assert metrics["prediction_type"] == "epsilon (consistency student)"  # its teacher's parametrisation
    card = (out / "README.md").read_text()
    assert "## Distillation" in card and "1 network evaluations per image" in card and str(tiny_run) in card
    assert (out / "samples" / "grid_cardiomegaly.png").is_file()
    run = yaml.safe_load((out / "config.yaml").read_text())  # the measured recipe: cosine-decayed learning rate
    assert run["lr_schedule"] == "cosine" and run["learning_rate"] == 1e-4 and run["max_steps"] == 2
    assert "decay-0 target" in metrics["distillation"]["method"]
    assert "LCMScheduler" in card and metrics["distillation"]["sampler"] == "LCMScheduler"


def test_distill_cli_makes_a_phased_student_and_says_so(tiny_run, tmp_path):
    from meddiff.cli import main

    out = tmp_path / "phased"
    main(
        ["-q", "distill", "--model", str(tiny_run), "--out", str(out), "--steps", "2", "--consistency", "phased"]
        + ["--max-steps", "1", "--batch-size", "8", "--no-eval", "--eval.grid-per-label", "1"]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert "phased consistency" in metrics["distillation"]["method"] and "2 phases" in metrics["distillation"]["method"]
    assert metrics["distillation"]["sampler"].startswith("DDIMScheduler")
    card = (out / "README.md").read_text()
    assert "DDIMScheduler (eta 0, trailing timesteps)" in card and "--steps 2" in card
    assert load_pipeline(out).phased_steps == 2


@pytest.mark.parametrize("steps", ["0", "9"])
def test_steps_outside_one_to_eight_is_one_line(tiny_run, tmp_path, steps, capsys):
    from meddiff.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--model", str(tiny_run), "--out", str(tmp_path), "--steps", steps])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert "distill.steps" in err.splitlines()[-1] and ("minimum 1" in err or "maximum 8" in err)


def test_models_it_cannot_distil_are_refused(tiny_run, tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import ConsistencyDistillation

    data = load_dataset("phantom:?n=64&seed=3", 32)
    flow = TrainConfig(
        data="phantom:?n=64&seed=3",
        out=str(tmp_path / "flow"),
        max_steps=1,
        batch_size=8,
        checkpoint_every=0,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1, objective="flow"),
    )
    train(flow, data, progress=False)
    with pytest.raises(MeddiffError, match="flow-matching model already samples in few steps"):
        ConsistencyDistillation(_distill_config(tmp_path / "flow", "unused"), data)
    student = _distill_config(tiny_run, tmp_path / "student")
    train(student, data, progress=False)
    with pytest.raises(MeddiffError, match="already distilled"):
        ConsistencyDistillation(_distill_config(tmp_path / "student", "unused"), data)
    with pytest.raises(MeddiffError, match="does not exist"):
        ConsistencyDistillation(_distill_config(tmp_path / "nowhere", "unused"), data)
    other = copy.copy(data)
    other.label_names = ["Normal", "Pneumonia"]  # not the teacher's findings
    with pytest.raises(MeddiffError, match="the teacher was trained on labels"):
        ConsistencyDistillation(_distill_config(tiny_run, "unused"), other)


def test_a_lora_student_starts_as_the_teacher_trains_only_its_adapters_and_exports_fused_and_alone(tiny_run, tmp_path):
    """distill.lora_rank (LCM-LoRA): the student is the teacher's U-Net with LoRA adapters and no guidance input;
    only the adapters learn; the export is a fused pipeline that samples in one evaluation per step at guidance 1,
    and the adapter alone, which loaded over the teacher's U-Net gives the fused one's output."""
    from diffusers import UNet2DConditionModel

    from meddiff.data.spec import load_dataset
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import ConsistencyDistillation, distilled_info

    config = _distill_config(tiny_run, tmp_path / "lora", steps=2, lora_rank=4)
    data = load_dataset(config.data, 32)
    method = ConsistencyDistillation(config, data)
    student, teacher = method.student, method.teacher.unet
    assert student.config.time_cond_proj_dim is None
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("conv1" in n for n in trainable) and any("time_emb_proj" in n for n in trainable)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([999, 400]), torch.zeros(2, 2 * len(method.codec.label_names))
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, t, encoder_hidden_states=None, class_labels=labels).sample,
            teacher(x, t, encoder_hidden_states=None, class_labels=labels).sample,
        )
    config.learning_rate = 1e-2  # so that two steps move the adapters visibly
    teacher_file = tiny_run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    before = teacher_file.read_bytes()
    train(config, data, progress=False)
    assert teacher_file.read_bytes() == before  # the teacher's weights on disk are untouched
    pipe = load_pipeline(tmp_path / "lora")
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.guidance_dim is None
    info = distilled_info(tmp_path / "lora" / "pipeline")
    assert info["lora_rank"] == 4 and info["sampling_guidance"] == 1.0 and "LoRA" in info["method"]
    assert not any("lora" in k for k in pipe.unet.state_dict())  # fused: a plain U-Net
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    conditions = pipe.encode_labels([["Cardiomegaly"], []])
    images = sample(pipe, conditions, SamplingSettings(steps=2, guidance=1.0, precision="fp32"), progress=False)
    hook.remove()
    assert images.shape == (2, 32, 32) and rows == [2, 2]  # one evaluation per image and step
    with torch.no_grad():
        fused = pipe.unet(x, t, encoder_hidden_states=None, class_labels=labels).sample
        assert not torch.allclose(fused, teacher(x, t, encoder_hidden_states=None, class_labels=labels).sample)
        plain = UNet2DConditionModel.from_pretrained(tiny_run / "pipeline" / "unet")
        plain.load_lora_adapter(
            tmp_path / "lora" / "lora", prefix="unet", weight_name="pytorch_lora_weights.safetensors"
        )
        adapted = plain(x, t, encoder_hidden_states=None, class_labels=labels).sample
    torch.testing.assert_close(adapted, fused, atol=1e-4, rtol=1e-4)
    saved = yaml.safe_load((tmp_path / "lora" / "config.yaml").read_text())
    assert saved["distill"]["lora_rank"] == 4 and saved["guidance"] == 1.0
    # so that sampling commands and the web page default to guidance 1 for it (its teacher: the run's 2)
    from meddiff.cli import _sampling_settings
    from meddiff.models.storage import model_guidance
    from meddiff.serve.service import ModelService, Request

    assert model_guidance(tmp_path / "lora") == model_guidance(tmp_path / "lora" / "pipeline") == 1.0
    assert model_guidance(tiny_run) == 2.0 and model_guidance(tmp_path / "nowhere") == 2.0
    args = argparse.Namespace(model=str(tmp_path / "lora"))
    assert _sampling_settings(args).guidance == 1.0
    service = ModelService(tmp_path / "lora", work_dir=tmp_path / "serve")
    assert service.default_guidance == 1.0  # the page's slider starts there, and a request without one uses it
    assert service.check(Request(findings=["Cardiomegaly"]))[1].guidance == 1.0
    assert service.check(Request(findings=["Cardiomegaly"], guidance=2.5))[1].guidance == 2.5
    assert (tmp_path / "lora" / "lora" / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.slow  # builds a tiny Stable Diffusion and fine-tunes it first
def test_lcm_lora_of_a_fine_tuned_stable_diffusion_samples_in_few_steps(tmp_path):
    """The LCM-LoRA path for the model it is made for: a fine-tuned Stable Diffusion (RGB autoencoder, text
    prompts) distilled with `meddiff distill --lora-rank`; the student loads in meddiff and, as an adapter over the
    fine-tuned pipeline, in plain diffusers with LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from meddiff.cli import main
    from meddiff.data.spec import load_dataset
    from meddiff.testing import build_tiny_stable_diffusion
    from meddiff.training.config import FinetuneConfig, TrainConfig
    from meddiff.training.loop import train

    base = build_tiny_stable_diffusion(tmp_path / "sd")
    data = "phantom:?n=8&seed=5"
    tuned = tmp_path / "tuned"
    ft = TrainConfig(
        data=data, out=str(tuned), method="finetune", resolution=32, batch_size=4, max_steps=2, checkpoint_every=0,
        lr_warmup_steps=1, precision="fp32", ema=False,
        finetune=FinetuneConfig(pretrained=str(base), method="unet", validation_images=1),
    )  # fmt: skip
    train(ft, load_dataset(data, 32), progress=False)
    out = tmp_path / "fast"
    command = ["-q", "distill", "--model", str(tuned), "--out", str(out), "--steps", "2", "--lora-rank", "4"]
    command += ["--max-steps", "2", "--batch-size", "4", "--no-eval", "--eval.grid-per-label", "1"]
    main([*command, "--learning-rate", "0.01"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["network_evaluations_per_image"] == 2 and "LoRA" in metrics["distillation"]["method"]
    assert yaml.safe_load((out / "config.yaml").read_text())["guidance"] == 1.0
    pipe = load_pipeline(out)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.vae.config.in_channels == 3
    plain = StableDiffusionPipeline.from_pretrained(tuned / "pipeline", safety_checker=None)
    plain.load_lora_weights(out / "lora")
    plain.scheduler = LCMScheduler.from_pretrained(out / "lora", subfolder="scheduler")
    image = plain("chest x-ray", num_inference_steps=2, guidance_scale=1.0, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # the adapter over the fine-tuned U-Net is the student: the same output as meddiff's fused U-Net
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    states = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = pipe.unet(x, t, encoder_hidden_states=states).sample
        adapted = plain.unet(x, t, encoder_hidden_states=states).sample
        tuned_only = load_pipeline(tuned).unet(x, t, encoder_hidden_states=states).sample
    torch.testing.assert_close(adapted, fused, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fused, tuned_only, atol=1e-4)  # and the adapter did learn something


def test_a_lora_student_resumes_exactly(tiny_run, tmp_path):
    """An LCM-LoRA run interrupted after 2 of 3 steps and resumed ends with the same adapter (and fused U-Net) as an
    uninterrupted one, with an EMA target network too (it moves only the adapters)."""
    from safetensors.torch import load_file

    from meddiff.data.spec import load_dataset
    from meddiff.training.loop import train

    data = load_dataset("phantom:?n=64&seed=3", 32)
    whole = _distill_config(tiny_run, tmp_path / "whole", lora_rank=4, target_decay=0.5)
    whole.max_steps, whole.learning_rate = 3, 1e-2
    train(whole, data, progress=False)
    part = _distill_config(tiny_run, tmp_path / "part", lora_rank=4, target_decay=0.5)
    part.max_steps, part.checkpoint_every, part.learning_rate = 2, 1, 1e-2
    train(part, data, progress=False)
    part.max_steps, part.resume = 3, "latest"
    train(part, data, progress=False)
    a = load_file(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "part" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and any(x.abs().sum() > 0 for k, x in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    fused_a, fused_b = load_pipeline(tmp_path / "whole").unet, load_pipeline(tmp_path / "part").unet
    for (name, x), (_, y) in zip(fused_a.state_dict().items(), fused_b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)


@pytest.mark.slow  # builds a tiny Stable Diffusion and LoRA-fine-tunes it first
def test_a_lora_fine_tuned_teacher_is_fused_before_distilling(tmp_path):
    from meddiff.data.spec import load_dataset
    from meddiff.testing import build_tiny_stable_diffusion
    from meddiff.training.config import FinetuneConfig, TrainConfig
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import ConsistencyDistillation

    base = build_tiny_stable_diffusion(tmp_path / "sd")
    data = load_dataset("phantom:?n=8&seed=5", 32)
    ft = TrainConfig(
        data="phantom:?n=8&seed=5", out=str(tmp_path / "tuned"), method="finetune", resolution=32, batch_size=4,
        max_steps=1, checkpoint_every=0, lr_warmup_steps=1, precision="fp32", ema=False,
        finetune=FinetuneConfig(pretrained=str(base), method="lora", validation_images=1),
    )  # fmt: skip
    train(ft, data, progress=False)
    for rank in (0, 4):
        config = _distill_config(tmp_path / "tuned" / "lora", tmp_path / f"student{rank}", lora_rank=rank)
        config.data, config.batch_size, config.max_steps = "phantom:?n=8&seed=5", 4, 1
        method = ConsistencyDistillation(config, data)
        assert not getattr(method.teacher.unet, "peft_config", None)  # the fine-tune's adapter is fused in
        train(config, data, progress=False)
        assert load_pipeline(tmp_path / f"student{rank}").vae.config.in_channels == 3


def test_a_teacher_with_a_text_encoder_adapter_is_one_line():
    from types import SimpleNamespace

    from meddiff.training.methods.distill import fuse_adapters

    pipe = SimpleNamespace(text_encoder=SimpleNamespace(peft_config={"default": None}), unet=SimpleNamespace())
    with pytest.raises(MeddiffError, match="LoRA adapter on its text encoder"):
        fuse_adapters(pipe)
    fuse_adapters(SimpleNamespace(text_encoder=SimpleNamespace(), unet=SimpleNamespace()))  # nothing to fuse


def test_an_adversarial_student_trains_a_conditional_discriminator_and_resumes_exactly(tiny_run, tmp_path):
    """adversarial_weight > 0: the discriminator (conditioned on the teacher's labels) judges the student's clean
    estimates, its step follows the student's, the adversarial term is scaled to `adversarial_weight` of the
    consistency gradient at the last trainable weight, and the discriminator is checkpointed with the run."""
    from accelerate import Accelerator

    from meddiff.data.spec import load_dataset
    from meddiff.training.loop import train
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", adversarial_weight=0.5)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    method.setup(Accelerator(cpu=True))
    disc = method.discriminator
    assert disc.embed is not None and disc.embed.in_features == method.codec.dim  # conditioned by projection
    batch = {**method.batch(torch.arange(8), "cpu"), "step": 0}
    loss = method.loss(method.student, batch, torch.Generator().manual_seed(0))
    m = method.metrics
    assert set(m) >= {"consistency", "adversarial", "adversarial_scale"}
    torch.testing.assert_close(loss.detach(), m["consistency"] + m["adversarial_scale"] * m["adversarial"])
    assert all(p.grad is None for p in method.student.parameters())  # the scale's gradients left .grad alone
    # the scale: 0.5 x |d consistency / d output| / |d adversarial / d output| (gradient norms 6 : 2 here)
    output = torch.randn(2, 1, 4, 4, requires_grad=True)
    assert float(method.relative_scale(output, 6 * output.sum(), -2 * output.sum(), 0.5)) == pytest.approx(0.5 * 3)
    assert output.grad is None
    before = [p.detach().clone() for p in disc.parameters()]
    method.loss(method.student, batch, torch.Generator().manual_seed(1))  # a second micro-batch of the same step
    assert len(method._last["fake"]) == 2  # gradient accumulation: the discriminator will see both
    method.after_step(method.student, batch, torch.Generator(), 0)
    assert "discriminator" in method.metrics and not method._last
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # it took a step
    # it learns in the right direction: a few steps on one batch put real logits above the student's
    real, fake = batch_real_fake(method, batch)
    for _ in range(5):
        method.discriminator_step(real, fake, method.codec.encode(batch["labels"], batch["known"]))
    c = method.codec.encode(batch["labels"], batch["known"])
    with torch.no_grad():
        assert float(method.judge(real, c).mean()) > float(method.judge(fake, c).mean())
    # before adversarial_start only the consistency loss counts (the discriminator still gets its images)
    late = ConsistencyDistillation(
        _distill_config(tiny_run, "unused", adversarial_weight=0.5, adversarial_start=5), method.dataset
    )
    late.loss(late.student, {**batch, "step": 4}, torch.Generator().manual_seed(0))
    assert "adversarial" not in late.metrics and len(late._last["fake"]) == 1

    data = load_dataset(config.data, 32)
    # the discriminator resumes as well: the same student at step 3
    a = assert_resumed_run_matches_whole_run(tiny_run, tmp_path, data, adversarial_weight=0.5)
    note = json.loads((tmp_path / "whole" / "pipeline" / "meddiff_distill.json").read_text())
    assert note["adversarial_weight"] == 0.5 and note["method"].endswith("with an adversarial loss (weight 0.5)")
    plain = _distill_config(tiny_run, tmp_path / "plain")
    plain.max_steps = 3
    train(plain, data, progress=False)
    c = load_pipeline(tmp_path / "plain").unet
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def batch_real_fake(method, batch):
    """The batch's real images and the student's clean estimates of them (as the loss makes them)."""
    method._last = {}
    method.loss(method.student, batch, torch.Generator().manual_seed(2))
    real, fake = method._last["real"][0], method._last["fake"][0]
    method._last = {}
    return real, fake


def test_an_adversarial_lora_student_weighs_at_the_output_and_trains_only_adapters(tiny_run):
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", adversarial_weight=0.5, lora_rank=4)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    batch = {**method.batch(torch.arange(8), "cpu"), "step": 0}
    loss = method.loss(method.student, batch, torch.Generator().manual_seed(0))
    assert float(method.metrics["adversarial_scale"]) > 0
    loss.backward()
    trained = {n for n, p in method.student.named_parameters() if p.grad is not None}
    assert trained and all("lora" in n for n in trained)  # the adversarial term reaches only the adapters


def test_an_adversarial_phased_student_is_refused_in_one_line(tiny_run):
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", adversarial_weight=0.5, consistency="phased", steps=2)
    with pytest.raises(MeddiffError, match="adversarial-weight is for LCM students"):
        ConsistencyDistillation(config, load_dataset(config.data, 32))


def test_a_distribution_matching_student_trains_a_fake_score_and_resumes_exactly(tiny_run, tmp_path):
    """distribution_weight > 0: a fake-score network starts as the teacher and learns the student's images after each
    student step; the student's loss adds DMD's term scaled to `distribution_weight` of the consistency gradient at
    the U-Net's output; the fake score is checkpointed with the run and is not exported."""
    from accelerate import Accelerator

    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", distribution_weight=0.5)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    method.setup(Accelerator(cpu=True))
    teacher = {k: v.clone() for k, v in method.teacher.unet.state_dict().items()}
    for name, value in method.fake_score.state_dict().items():
        torch.testing.assert_close(value, teacher[name], msg=name)  # it starts as the teacher
    assert all(p.requires_grad for p in method.fake_score.parameters())
    batch = {**method.batch(torch.arange(8), "cpu"), "step": 0}
    loss = method.loss(method.student, batch, torch.Generator().manual_seed(0))
    m = method.metrics
    assert set(m) >= {"consistency", "distribution_matching", "distribution_scale"} and "adversarial" not in m
    assert float(m["distribution_scale"]) > 0 and float(m["distribution_matching"]) > 0
    torch.testing.assert_close(loss.detach(), m["consistency"] + m["distribution_scale"] * m["distribution_matching"])
    assert all(p.grad is None for p in method.student.parameters())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert all(p.grad is None for p in method.fake_score.parameters())  # the student's loss does not train it
    method.loss(method.student, batch, torch.Generator().manual_seed(1))  # a second micro-batch of the same step
    assert len(method._last["fake"]) == len(method._last["cond"]) == 2  # the fake score will learn from both
    before = [p.detach().clone() for p in method.fake_score.parameters()]
    method.after_step(method.student, batch, torch.Generator().manual_seed(0), 0)
    assert torch.isfinite(method.metrics["fake_score"]) and not method._last
    assert any(not torch.equal(a, b) for a, b in zip(before, method.fake_score.parameters()))  # it took a step
    for name, value in method.teacher.unet.state_dict().items():
        torch.testing.assert_close(value, teacher[name], msg=name)  # the teacher stays frozen
    # before distribution_start only the consistency loss counts (the fake score still gets the student's images)
    late = ConsistencyDistillation(
        _distill_config(tiny_run, "unused", distribution_weight=0.5, distribution_start=5), method.dataset
    )
    late.loss(late.student, {**batch, "step": 4}, torch.Generator().manual_seed(0))
    assert "distribution_matching" not in late.metrics and len(late._last["fake"]) == 1
    # both extra losses at once
    both = ConsistencyDistillation(
        _distill_config(tiny_run, "unused", distribution_weight=0.5, adversarial_weight=0.5), method.dataset
    )
    total = both.loss(both.student, batch, torch.Generator().manual_seed(0))
    m = both.metrics
    torch.testing.assert_close(
        total.detach(),
        m["consistency"]
        + m["adversarial_scale"] * m["adversarial"]
        + m["distribution_scale"] * m["distribution_matching"],
    )

    data = load_dataset(config.data, 32)
    assert_resumed_run_matches_whole_run(tiny_run, tmp_path, data, distribution_weight=0.5, fake_score_steps=2)
    note = json.loads((tmp_path / "whole" / "pipeline" / "meddiff_distill.json").read_text())
    assert note["distribution_weight"] == 0.5 and "distribution matching (DMD, weight 0.5)" in note["method"]
    from meddiff.training.loop import train

    plain = _distill_config(tiny_run, tmp_path / "plain")
    plain.max_steps = 1
    train(plain, data, progress=False)
    listing = [sorted(str(f.relative_to(d)) for f in d.rglob("*")) for d in (tmp_path / "whole", tmp_path / "plain")]
    exported = [[f for f in files if f.startswith("pipeline")] for files in listing]
    assert exported[0] == exported[1]  # the fake score is not exported: the student's pipeline has the same files


def test_distribution_matching_moves_images_towards_the_guided_teacher(tiny_run):
    """The DMD term as the method wires it: the teacher's passes are null then conditional and guided at each image's
    own w, the fake score sees the conditional labels, and the gradient on the images is (x0_fake - x0_real) / (the
    per-image mean |images - x0_real|) / numel."""
    from types import SimpleNamespace

    from meddiff.data.spec import load_dataset
    from meddiff.training.distribution_matching import renoising_timesteps
    from meddiff.training.methods.distill import ConsistencyDistillation, x0_and_eps

    config = _distill_config(tiny_run, "unused", distribution_weight=1.0)
    method = ConsistencyDistillation(config, load_dataset(config.data, 32))
    batch = method.batch(torch.arange(4), "cpu")
    cond, null = method.conditions(batch, "cpu")
    g = torch.Generator().manual_seed(5)
    a, b, c = (0.3 * torch.randn(4, 1, 32, 32, generator=g) for _ in range(3))  # the networks' fixed outputs
    seen = {}

    def teacher(x, t, class_labels=None, encoder_hidden_states=None):
        seen["teacher"] = class_labels
        return SimpleNamespace(sample=torch.cat([a, b]))  # null half, conditional half

    def fake(x, t, class_labels=None, encoder_hidden_states=None):
        seen["fake"] = class_labels
        return SimpleNamespace(sample=c)

    method.teacher.unet = teacher
    method.fake_score = fake
    images = (0.5 * torch.randn(4, 1, 32, 32, generator=g)).clamp(-1, 1).requires_grad_(True)
    w = torch.tensor([1.0, 1.5, 2.0, 3.0])
    method.distribution_matching(images, cond, null, w, torch.Generator().manual_seed(7)).backward()

    torch.testing.assert_close(seen["teacher"], torch.cat([null["class_labels"], cond["class_labels"]]))
    torch.testing.assert_close(seen["fake"], cond["class_labels"])
    assert not torch.equal(null["class_labels"], cond["class_labels"])
    draw = torch.Generator().manual_seed(7)  # the draws the method makes, in its order
    t = renoising_timesteps(4, len(method.abar), draw)
    noise = torch.randn(images.shape, generator=draw)
    abar = method.abar[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * images.detach() + (1 - abar).sqrt() * noise
    x0 = {k: x0_and_eps(v, noisy, abar, method.prediction)[0] for k, v in (("u", a), ("c", b), ("f", c))}
    real = (x0["u"] + w.view(-1, 1, 1, 1) * (x0["c"] - x0["u"])).clamp(-1, 1)
    fake_x0 = x0["f"].clamp(-1, 1)
    scale = (images.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(images.grad, (fake_x0 - real) / scale / images.numel())


def test_a_distribution_matching_phased_student_is_refused_in_one_line(tiny_run):
    from meddiff.data.spec import load_dataset
    from meddiff.training.methods.distill import ConsistencyDistillation

    config = _distill_config(tiny_run, "unused", distribution_weight=0.5, consistency="phased", steps=2)
    with pytest.raises(MeddiffError, match="distribution-weight is for LCM students"):
        ConsistencyDistillation(config, load_dataset(config.data, 32))
