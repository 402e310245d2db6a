"""The loop's TrainingSummary is what training.json holds: the keys it has always had, plus "checks" and
"machine"."""

import json

import torch

from meddiff.data.spec import load_dataset
from meddiff.devices import machine_description, run_device
from meddiff.models.factory import ModelConfig
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train
from meddiff.training.summary import TrainingSummary

TRAINING_JSON_KEYS = [
    "steps",
    "train_seconds_total",
    "images_per_second",
    "precision",
    "parameters",
    "processes",
    "global_batch",
    "dataset",
    "loss_history",
    "machine",  # added so that speeds from different machines can be told apart
    "checks",  # added with the checks during training (empty without them)
    "differential_privacy",  # added with DP-SGD (null without it)
]


def test_loop_returns_the_summary_it_writes(tmp_path):
    cfg = TrainConfig(
        data="phantom:?n=16&seed=3",
        out=str(tmp_path),
        max_steps=2,
        batch_size=4,
        checkpoint_every=0,
        lr_warmup_steps=1,
        log_every=1,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    result = train(cfg, load_dataset(cfg.data, 32), progress=False)
    raw = json.loads((tmp_path / "training.json").read_text())
    assert list(raw) == TRAINING_JSON_KEYS
    summary = result.summary
    assert isinstance(summary, TrainingSummary) and TrainingSummary.read(tmp_path) == summary
    assert summary.steps == result.steps == 2 and summary.processes == 1 and summary.global_batch == 4
    assert summary.parameters == result.parameters > 0 and summary.precision == result.precision
    assert [row[0] for row in summary.loss_history] == [1, 2] and summary.dataset == raw["dataset"]
    assert summary["train_seconds_total"] == raw["train_seconds_total"]  # dict-style reads still work
    assert summary.machine == machine_description(run_device())  # the training device, named as it is
    assert raw["differential_privacy"] is None and summary.differential_privacy is None
    if run_device().type == "cpu":
        assert f"{torch.get_num_threads()} thread" in summary.machine


def test_a_training_json_from_before_machine_and_checks_still_reads(tmp_path):
    old = {
        "steps": 3,
        "train_seconds_total": 1.5,
        "images_per_second": 8.0,
        "precision": "fp32",
        "parameters": 1000,
        "processes": 1,
        "global_batch": 4,
        "dataset": "phantom:?n=16",
        "loss_history": [[1, 0.5, 0.5]],
    }
    (tmp_path / "training.json").write_text(json.dumps(old))
    summary = TrainingSummary.read(tmp_path)
    assert summary.steps == 3 and summary.loss_history == [[1, 0.5, 0.5]]
    assert summary.machine == "" and summary.checks == {}  # not recorded then: empty, never a guess
