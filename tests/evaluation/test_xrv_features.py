"""--features xrv: torchxrayvision cannot be installed here (it needs torchvision), so a stand-in module with xrv's
calling convention (DenseNet(weights=...), 1 x 224 x 224 input in [-1024, 1024], features2) checks meddiff's side:
scaling, resizing, local weight files and the one-line messages."""

import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from meddiff.errors import MeddiffError
from meddiff.evaluation.features import require_optional, xrv_features


class FakeDenseNet(torch.nn.Module):
    seen: list = []

    def __init__(self, weights=None):
        super().__init__()
        if weights not in (None, "densenet121-res224-all"):
            raise Exception(f"weights value must be in ['densenet121-res224-all'], got {weights}")
        self.conv = torch.nn.Conv2d(1, 6, 8, stride=8)
        self.weights = weights

    def features2(self, x):
        FakeDenseNet.seen.append((tuple(x.shape), float(x.min()), float(x.max())))
        assert x.shape[1:] == (1, 224, 224)
        return torch.relu(self.conv(x / 1024)).mean(dim=(2, 3))


@pytest.fixture
def fake_xrv(monkeypatch):
    module = types.ModuleType("torchxrayvision")
    module.models = types.SimpleNamespace(DenseNet=FakeDenseNet)
    monkeypatch.setitem(sys.modules, "torchxrayvision", module)
    FakeDenseNet.seen = []
    return module


def test_missing_torchxrayvision_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails
    with pytest.raises(MeddiffError, match="needs torchxrayvision") as err:
        require_optional("xrv")
    assert "\n" not in str(err.value)


def test_xrv_features_scale_and_resize(fake_xrv):
    require_optional("xrv")
    images = torch.linspace(-1, 1, 3 * 32 * 32).reshape(3, 1, 32, 32)
    feats = xrv_features(None)(images, batch_size=2)
    assert feats.shape == (3, 6) and np.isfinite(feats).all()
    shapes = [s for s, _, _ in FakeDenseNet.seen]
    assert shapes == [(2, 1, 224, 224), (1, 1, 224, 224)]
    assert min(lo for _, lo, _ in FakeDenseNet.seen) < -900 and max(hi for *_, hi in FakeDenseNet.seen) > 900


def test_xrv_weights_from_a_local_safetensors_file(fake_xrv, tmp_path):
    torch.manual_seed(1)
    ref = FakeDenseNet()
    path = tmp_path / "xrv.safetensors"
    save_file(ref.state_dict(), str(path))
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    feats = xrv_features(str(path))(images)
    with torch.no_grad():
        expected = ref.features2(torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear") * 1024)
    assert np.allclose(feats, expected.numpy(), atol=1e-5)
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(MeddiffError, match="does not fit"):
        xrv_features(str(tmp_path / "bad.safetensors"))


def test_unknown_xrv_weights_name_is_one_line(fake_xrv):
    with pytest.raises(MeddiffError, match="could not load weights 'no-such-weights'") as err:
        xrv_features("no-such-weights")
    assert "\n" not in str(err.value) and "--feature-weights PATH" in str(err.value)


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_evaluate_with_xrv_features(fake_xrv, tmp_path, tiny_run, phantom_dir):
    import json

    from meddiff.cli import main

    gen = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--conditions",
                str(phantom_dir / "valid.csv"),
                "--n",
                "12",
                "--out",
                str(gen),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--real",
                f"phantom:{phantom_dir}",
                "--synthetic",
                str(gen),
                "--out",
                str(tmp_path / "e"),
                "--seeds",
                "1",
                "--classifier-epochs",
                "1",
                "--features",
                "xrv",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["distribution"]["features"] == "xrv" and m["distribution"]["fid_synthetic_vs_real_test"] > 0
    assert FakeDenseNet.seen  # the xrv network embedded the images
