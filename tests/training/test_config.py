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
