"""Checks during training: they run on the EMA weights every N steps, leave the training itself untouched (same
weights with and without), land in training.json and tensorboard, survive a resume, and can stop the run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset, parse_spec
from meddiff.errors import MeddiffError
from meddiff.models.factory import ModelConfig
from meddiff.training.config import PrivacyMonitorConfig, TrainConfig
from meddiff.training.loop import train
from meddiff.workflow import training_checks

SMALL = ModelConfig(block_out_channels=[16, 32], layers_per_block=1)
DATA = "phantom:?n=48&seed=5"


def cfg(out, **kw):
    base = dict(data=DATA, out=str(out), batch_size=8, checkpoint_every=0, lr_warmup_steps=2, model=SMALL)
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """A check that records what it saw: the step, whether the U-Net was in eval mode, a weight of the pipeline."""

    name = "recorder"

    def __init__(self, every, stop_at=None):
        self.every, self.stop_at, self.seen = every, stop_at, []

    def __call__(self, step, pipe, method, history):
        self.seen.append((step, pipe.unet.training, len(history)))
        return {"value": float(step), "stop": step == self.stop_at}


def test_checks_run_on_schedule_without_changing_training(tmp_path):
    data = load_dataset(DATA, 32)
    train(cfg(tmp_path / "plain", max_steps=6), data, progress=False)
    recorder = Recorder(every=2)
    result = train(cfg(tmp_path / "checked", max_steps=6), data, progress=False, checks=[recorder])
    assert recorder.seen == [(2, False, 0), (4, False, 1), (6, False, 2)]  # eval mode, history grows
    name = "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "checked" / name)
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampling and EMA swaps left no trace
    saved = json.loads((tmp_path / "checked" / "training.json").read_text())
    assert (
        [r["step"] for r in saved["checks"]["recorder"]]
        == [2, 4, 6]
        == [r["value"] for r in result.summary.checks["recorder"]]
    )
    assert list((tmp_path / "checked" / "logs").rglob("events.out.tfevents.*"))


def test_a_check_can_stop_the_run_and_a_resume_keeps_its_history(tmp_path):
    data = load_dataset(DATA, 32)
    out = tmp_path / "stopped"
    result = train(cfg(out, max_steps=10), data, progress=False, checks=[Recorder(every=2, stop_at=4)])
    assert result.steps == 4 and (out / "checkpoints" / "step-0000004").is_dir()
    recorder = Recorder(every=2)
    train(cfg(out, max_steps=6, resume="latest"), data, progress=False, checks=[recorder])
    assert recorder.seen == [(6, False, 2)]
    saved = json.loads((out / "training.json").read_text())
    assert [r["step"] for r in saved["checks"]["recorder"]] == [2, 4, 6]


def test_the_memorisation_monitor_reports_in_training_json(tmp_path):
    spec = "phantom:?n=120&seed=5"  # 24 held-out images: enough for alpha 0.05
    config = cfg(
        tmp_path / "monitored",
        data=spec,
        max_steps=4,
        privacy=PrivacyMonitorConfig(every=2, samples=8, sample_steps=2, alpha=0.05, loss_images=8),
    )
    data = load_dataset(spec, 32)
    (monitor,) = training_checks(config, parse_spec(spec), data)
    train(config, data, progress=False, checks=[monitor])
    rows = json.loads((tmp_path / "monitored" / "training.json").read_text())["checks"]["privacy"]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert 0 <= row["copy_rate_low"] <= row["copy_rate"] <= row["copy_rate_high"] <= 1 and row["samples"] == 8
        assert row["loss_train"] > 0 and row["loss_heldout"] > 0
        assert abs(row["loss_gap"] - (row["loss_heldout"] - row["loss_train"])) < 1e-9
    assert training_checks(cfg(tmp_path / "off"), parse_spec(spec), data) == []
    with pytest.raises(MeddiffError, match="needs at least 100 held-out images for alpha 0.01"):
        training_checks(cfg(tmp_path / "small", data=DATA, privacy=PrivacyMonitorConfig(every=2)), parse_spec(DATA),
                        load_dataset(DATA, 32))  # fmt: skip


class AttentionSwitcher(Recorder):
    """A check that, like sample() on a CPU with fast bf16, switches the U-Net to another attention kernel, and
    records which kernel it found (the loop must have put the original back before the next check)."""

    def __init__(self, every):
        super().__init__(every)
        self.found = []

    def __call__(self, step, pipe, method, history):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processors = pipe.unet.attn_processors
        assert processors  # this U-Net has attention
        self.found.append({type(p).__name__ for p in processors.values()})
        other = AttnProcessor2_0 if self.found[-1] == {"AttnProcessor"} else AttnProcessor
        pipe.unet.set_attn_processor(other())
        return super().__call__(step, pipe, method, history)


def test_a_check_that_changes_the_attention_kernel_leaves_no_trace(tmp_path):
    data = load_dataset(DATA, 32)
    model = ModelConfig(block_out_channels=[16, 32], layers_per_block=1, attention_max_resolution=16)
    switcher = AttentionSwitcher(every=2)
    train(cfg(tmp_path / "switched", max_steps=4, model=model), data, progress=False, checks=[switcher])
    assert len(switcher.found) == 2 and switcher.found[0] == switcher.found[1]
