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
    base = dict(data="phantom:?n=48&seed=5", out=str(out), batch_size=8, checkpoint_every=0, lr_warmup_steps=2,
                model=SMALL)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def data():
    return load_dataset("phantom:?n=48&seed=5", 32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_gives_identical_weights(tmp_path, data, precision):
    train(cfg(tmp_path / "straight", max_steps=8, precision=precision), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=4, precision=precision), data, progress=False)
    train(cfg(tmp_path / "split", max_steps=8, precision=precision, resume="latest"), data, progress=False)
    for name in ("checkpoints/step-0000008/model.safetensors", "checkpoints/step-0000008/ema.safetensors",
                 "pipeline/unet/diffusion_pytorch_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # and training changed the weights at all
    first = load_file(tmp_path / "split" / "checkpoints/step-0000004/model.safetensors")
    last = load_file(tmp_path / "split" / "checkpoints/step-0000008/model.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_checkpoints_are_pruned_and_time_budget_stops(tmp_path, data):
    result = train(cfg(tmp_path, max_steps=10_000, max_minutes=0.05, checkpoint_every=2, checkpoints_keep=2),
                   data, progress=False)
    assert 0 < result.steps < 10_000 and result.train_seconds >= 3.0
    kept = checkpoint_dirs(tmp_path)
    assert len(kept) <= 2 and kept[-1].name == f"step-{result.steps:07d}"
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "logs").is_dir()
    assert result.loss_history and result.loss_history[0][0] == 1


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


def test_v_prediction_trains(tmp_path, data):
    result = train(cfg(tmp_path, max_steps=3, model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1,
                                                                  prediction_type="v_prediction")), data, progress=False)
    assert result.steps == 3
