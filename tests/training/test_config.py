"""Training configuration: defaults, YAML, overrides, explicit settings."""

import pytest

from meddiff.errors import MeddiffError
from meddiff.training.config import load_config


def test_overrides_skip_none_but_settings_keep_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("snr_gamma: 3.0\nmodel:\n  prediction_type: epsilon\n")
    assert load_config(path, {}).snr_gamma == 3.0
    # a CLI option left out (None) does not erase the file's value
    assert load_config(path, {"snr_gamma": None}).snr_gamma == 3.0
    config = load_config(path, {"model.prediction_type": "v_prediction"}, {"snr_gamma": None})
    assert config.snr_gamma is None  # an explicit null switches Min-SNR off
    assert config.model.prediction_type == "v_prediction"


def test_missing_or_broken_config_file_is_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="not found"):
        load_config(tmp_path / "nope.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(MeddiffError, match="not valid YAML"):
        load_config(bad, {})


def test_an_option_declared_once_reaches_yaml_cli_api_and_the_optimizer(tmp_path):
    """adam_beta2 was added as one option(...) field: YAML, the flag, validation and --help follow from it."""
    import torch

    from meddiff.cli import build_parser
    from meddiff.options import given
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import make_optimizer

    path = tmp_path / "c.yaml"
    path.write_text("adam_beta2: 0.95\n")
    assert load_config(path, {}).adam_beta2 == 0.95
    assert given(build_parser().parse_args(["train", "--adam-beta2", "0.98"])) == {"adam_beta2": 0.98}
    with pytest.raises(MeddiffError, match="'adam_beta2' = 1.5 is above the maximum"):
        TrainConfig(adam_beta2=1.5)
    optimizer = make_optimizer(TrainConfig(adam_beta2=0.97), [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.97)
