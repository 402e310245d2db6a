"""meddiff.training.checkpoint: which checkpoint folders count, and --resume's one-line errors (saving and loading
through accelerate are exercised by the resume tests in test_loop.py)."""

import json

import pytest

from meddiff.errors import MeddiffError
from meddiff.training.checkpoint import CHECKPOINTS, checkpoint_dirs, find_checkpoint


def make(run, step, complete=True):
    folder = run / CHECKPOINTS / f"step-{step:07d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.json").write_text(json.dumps({"step": step}))
    return folder


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    assert checkpoint_dirs(tmp_path) == []
    for step in (10, 2, 100):
        make(tmp_path, step)
    make(tmp_path, 200, complete=False)  # interrupted while saving: no state.json
    (tmp_path / CHECKPOINTS / ".tmp-step-0000300").mkdir()  # a save in progress
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000002", "step-0000010", "step-0000100"]


def test_resume_latest_and_an_explicit_folder(tmp_path):
    make(tmp_path, 4)
    latest = make(tmp_path, 8)
    make(tmp_path, 12, complete=False)
    assert find_checkpoint(tmp_path, "latest") == latest
    assert find_checkpoint(tmp_path, str(tmp_path / CHECKPOINTS / "step-0000004")).name == "step-0000004"


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="--resume latest: no checkpoint in") as info:
        find_checkpoint(tmp_path, "latest")
    assert "\n" not in str(info.value)
    incomplete = make(tmp_path, 12, complete=False)
    with pytest.raises(MeddiffError, match="not a meddiff checkpoint folder \\(no state.json\\)"):
        find_checkpoint(tmp_path, str(incomplete))
    with pytest.raises(MeddiffError, match="not a meddiff checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))


def test_a_checkpoint_of_a_differently_built_network_is_a_one_line_error(tmp_path):
    import torch
    from accelerate import Accelerator

    from meddiff.precision import reset_accelerate_state
    from meddiff.training.checkpoint import load_checkpoint

    reset_accelerate_state()
    saver = Accelerator(cpu=True)
    saver.prepare_model(torch.nn.Linear(2, 2))
    saver.save_state(str(tmp_path / "ck"))
    (tmp_path / "ck" / "state.json").write_text(json.dumps({"step": 1}))
    reset_accelerate_state()
    loader = Accelerator(cpu=True)
    loader.prepare_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))  # other weight names
    with pytest.raises(MeddiffError, match="does not fit the network") as err:
        load_checkpoint(loader, None, tmp_path / "ck")
    assert "\n" not in str(err.value)
    reset_accelerate_state()


def test_resuming_a_run_saved_before_label_embedding_keeps_it_off(tmp_path):
    import argparse

    import yaml

    from meddiff.cli import _run_config

    run = tmp_path / "run"
    run.mkdir()
    saved = {"data": "phantom3d:?n=4&size=16", "out": str(run), "volume": {"unet": {"channels": [16, 32]}}}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    args = argparse.Namespace(config=None)
    config = _run_config(args, {"resume": "latest", "out": str(run)})
    assert config.volume is not None and config.volume.unet.label_embedding is False
    saved["volume"]["unet"]["label_embedding"] = True  # a run saved since: its own setting
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _run_config(args, {"resume": "latest", "out": str(run)}).volume.unet.label_embedding is True
    explicit = {"resume": "latest", "out": str(run), "volume.unet.label_embedding": True}
    saved["volume"]["unet"].pop("label_embedding")
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _run_config(args, explicit).volume.unet.label_embedding is True  # a flag still wins
