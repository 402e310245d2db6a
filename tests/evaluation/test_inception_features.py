"""--features inception: the TorchScript Inception-v3 file (no torchvision) behind FID/KID/PRDC. A stand-in
TorchScript network with the same calling convention checks the plumbing offline."""

import json

import pytest
import torch

from meddiff.cli import main
from meddiff.errors import MeddiffError
from meddiff.evaluation.features import InceptionFeatures, require_optional


class StandIn(torch.nn.Module):
    """Same interface as inception-2015-12-05.pt: (N, 3, 299, 299) floats in [0, 255], return_features=True."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 9, stride=8)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        torch._assert(x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299, "expects 3x299x299")
        torch._assert(bool(x.min() >= 0) and bool(x.max() <= 255), "expects 0..255")
        f = torch.relu(self.conv(x / 255)).mean(dim=(2, 3))
        return f if return_features else f.sum(1)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inc") / "inception-standin.pt"
    torch.jit.script(StandIn()).save(str(path))
    return path


def test_inception_features_from_a_local_torchscript_file(standin, tmp_path):
    feats = InceptionFeatures(standin)(torch.rand(5, 1, 32, 32) * 2 - 1, batch_size=2)
    assert feats.shape == (5, 8)
    with pytest.raises(MeddiffError, match="--feature-weights PATH"):
        require_optional("inception", None)
    with pytest.raises(MeddiffError, match="no such file"):
        require_optional("inception", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(MeddiffError, match="not a TorchScript model"):
        InceptionFeatures(tmp_path / "junk.pt")


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_evaluate_with_inception_features(standin, tmp_path, tiny_run, phantom_dir):
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
                "16",
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
                "inception",
                "--feature-weights",
                str(standin),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["distribution"]["features"] == "inception" and m["distribution"]["fid_synthetic_vs_real_test"] > 0
    assert "inception features" in (tmp_path / "e" / "report.html").read_text()
