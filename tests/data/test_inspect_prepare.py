import csv
import http.server
import threading

import numpy as np
import pytest
import torch

from meddiff.cli import main
from meddiff.data import materialize
from meddiff.data import store as store_module
from meddiff.data.download import download_medmnist
from meddiff.data.inspect import format_report, inspect_spec
from meddiff.data.spec import load_dataset
from meddiff.errors import MeddiffError
from tests.data.fixtures import chexpert_small


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return chexpert_small(tmp_path_factory.mktemp("cx"))


def test_inspect_counts_values_views_and_problems(chexpert):
    report = inspect_spec(f"chexpert:{chexpert}?view=all&val_fraction=0")
    eff = report["labels"]["Pleural Effusion"]
    assert eff.get("-1", 0) > 0 and eff.get("1", 0) > 0 and eff.get("0", 0) > 0
    assert report["labels"]["Fracture"] == {"blank": report["images"]}
    assert report["views"]["LATERAL"] == 2 and report["views"]["AP"] > 0
    assert set(report["sex"]) == {"Male", "Female"} and "40-49" in report["age"]
    assert report["sizes"] == {"40x40": report["images"] - 2}
    assert sorted(report["problem_counts"]) == ["missing", "unreadable"]
    text = format_report(report)
    assert "problems: 2" in text and "patient00013" in text


def test_prepare_writes_manifest_and_second_load_uses_cache(chexpert, tmp_path, monkeypatch):
    spec = f"chexpert:{chexpert}?val_fraction=0&labels=Cardiomegaly"
    assert main(["data", "prepare", spec, "--out", str(tmp_path / "p"), "--resolution", "32"]) == 0
    with open(tmp_path / "p" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "p" / "skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    assert len(skipped) == 2 and rows and set(rows[0]) == {"index", "Cardiomegaly", "prompt", "patient", "source"}
    assert all(r["patient"].startswith("patient") and r["source"].endswith(".jpg") for r in rows)
    first = load_dataset(spec, 32)  # implicit preparation into the cache

    def no_reading(*a, **k):
        raise AssertionError("images were decoded again instead of coming from the store")

    monkeypatch.setattr(materialize, "_read_all", no_reading)
    monkeypatch.setattr(store_module, "decode", no_reading)
    again = load_dataset(spec, 32)
    assert len(again) == len(rows) and again.skipped == 2
    assert torch.equal(again.images[:], first.images[:])
    prepared = load_dataset(f"store:{tmp_path / 'p'}", 32)  # the prepared folder, without the sources
    assert torch.equal(prepared.images[:], first.images[:]) and torch.equal(prepared.labels, first.labels)
    assert list(prepared.prompts) == list(first.prompts)
    monkeypatch.undo()
    # a different resolution is a different store
    assert load_dataset(spec, 16).resolution == 16


def test_download_offline_is_one_line_error(tmp_path):
    with pytest.raises(MeddiffError, match="cannot download pneumoniamnist_64.npz.*medmnist:"):
        download_medmnist("pneumoniamnist", 64, tmp_path, url_template="http://127.0.0.1:9/{file}", timeout=3)
    assert not list(tmp_path.iterdir())
    with pytest.raises(MeddiffError, match="unknown MedMNIST dataset"):
        download_medmnist("catmnist", 28, tmp_path)


def test_download_from_a_reachable_server(tmp_path):
    served = tmp_path / "srv"
    served.mkdir()
    np.savez(served / "breastmnist.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        path = download_medmnist(
            "breastmnist", 28, tmp_path / "out", url_template=f"http://127.0.0.1:{server.server_port}/{{file}}"
        )
    finally:
        server.shutdown()
    assert len(load_dataset(f"medmnist:{path}", 28)) == 2
