"""`meddiff data phantom --3d`, and `data inspect` / `data prepare` on volume specs (phantom3d:, volumes:)."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from meddiff.cli import main
from meddiff.data import volume_dataset
from meddiff.data.spec import load_dataset
from tests.test_cli import one_line_error


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    """Tiny 3D phantoms written by the command line (4 train + 1 valid, 16^3)."""
    out = tmp_path_factory.mktemp("phantom3d_cli")
    assert main(["data", "phantom", "--3d", "--out", str(out), "--n", "5", "--size", "16", "--seed", "2"]) == 0
    return out


def _save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _head(shape=(20, 20, 12), seed=0):
    grid = np.indices(shape).astype(np.float32)
    centre, axes = (np.asarray(shape) - 1) / 2, np.asarray(shape) * 0.35
    inside = (((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0) < 1
    return inside * (100 + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    """Three usable volumes, a 2D slice and a constant volume (two cases to skip)."""
    root = tmp_path_factory.mktemp("volumes_cli")
    for i in range(3):
        _save(root / f"case{i}.nii.gz", _head(seed=i))
    _save(root / "flat.nii.gz", np.zeros((20, 20)))
    _save(root / "const.nii.gz", np.full((20, 20, 12), 7.0))
    return root


def test_phantom_3d_writes_volumes_masks_and_tables(phantom_dir, capsys, tmp_path):
    rows = list(csv.DictReader(open(phantom_dir / "train.csv")))
    assert len(rows) == 4 and len(list(csv.DictReader(open(phantom_dir / "valid.csv")))) == 1
    assert {"path", "mask", "Tumour", "Tumour volume mL"} <= set(rows[0])
    image, mask = nib.load(phantom_dir / rows[0]["path"]), nib.load(phantom_dir / rows[0]["mask"])
    assert image.shape == mask.shape == (16, 16, 16)
    assert b"NOT medical data" in image.header["descrip"].tobytes()
    out = tmp_path / "ph"
    assert main(["data", "phantom", "--3d", "--out", str(out), "--n", "2", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and f"--data 'phantom3d:{out}'" in printed  # the default grid: no size=
    one_line_error(capsys, ["data", "phantom", "--3d", "--out", str(tmp_path / "x"), "--size", "8"], "between 16")
    one_line_error(capsys, ["data", "phantom", "--3d", "--out", str(tmp_path / "x"), "--bit-depth", "16"], "2D")


def test_phantom_3d_prints_the_spec_with_its_size(tmp_path, capsys):
    assert main(["data", "phantom", "--3d", "--out", str(tmp_path / "p"), "--n", "2", "--size", "16"]) == 0
    assert f"phantom3d:{tmp_path / 'p'}?size=16" in capsys.readouterr().out


def test_inspect_phantom3d_reports_grid_labels_intensities_and_store(phantom_dir, tmp_path, capsys):
    spec = f"phantom3d:{phantom_dir}?size=16"
    assert main(["data", "inspect", spec, "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    rows = list(csv.DictReader(open(phantom_dir / "train.csv")))
    tumours = sum(int(r["Tumour"]) for r in rows)
    assert report["cases"] == 4 and report["skipped"] == 0 and report["split"] == "train"
    assert report["shape"] == [16, 16, 16] and report["spacing"] == [13.0, 13.0, 13.0]
    assert report["channels"] == ["image"]
    assert report["labels"]["Tumour"] == {"known": 4, "positive": tumours, "prevalence": tumours / 4}
    assert report["labels"]["Tumour volume mL"]["max"] > 0.5  # a measurement: its range is shown
    intensity = report["intensity"]["image"]
    assert -1 <= intensity["min"] <= intensity["p1"] <= intensity["mean"] <= intensity["p99"] <= intensity["max"] <= 1
    store = report["store"]
    assert store.endswith(load_dataset(spec, 16).key) and report["store_bytes"] > 0
    assert "4 volume cases" in text and "16x16x16 voxels at 13 x 13 x 13 mm" in text and store in text
    assert "Tumour" in text and "skipped cases: none" in text


def test_inspect_volumes_counts_skipped_cases_by_reason(volume_dir, capsys):
    assert main(["data", "inspect", f"volumes:{volume_dir}?split=all", "--resolution", "16"]) == 0
    text = capsys.readouterr().out
    assert "3 volume cases" in text and "2 skipped" in text and "labels: none" in text
    assert "skipped cases: 2 (" in text and "1 2D image (not a volume)" in text and "1 constant intensity" in text
    assert "flat.nii.gz" in text and "const.nii.gz" in text


def test_prepare_volume_spec_builds_the_store_training_maps(phantom_dir, tmp_path, capsys, monkeypatch):
    spec = f"phantom3d:{phantom_dir}?size=16"
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))  # a cache of its own: built here
    assert main(["data", "prepare", spec, "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [s["split"] for s in summary["splits"]] == ["train", "valid"]  # the held-out split too
    assert [s["cases"] for s in summary["splits"]] == [4, 1] and summary["edge"] == 16
    for split in summary["splits"]:
        assert split["store"].startswith(str(tmp_path / "cache")) and split["store"] in text
    cases = list(csv.DictReader(open(tmp_path / "report" / "manifest.csv")))
    assert [c["split"] for c in cases] == ["train"] * 4 + ["valid"] and "Tumour" in cases[0]
    assert list(csv.DictReader(open(tmp_path / "report" / "skipped.csv"))) == []
    assert f"meddiff train --data '{spec}'" in text

    def no_decoding(*args, **kwargs):
        raise AssertionError("volumes were decoded again instead of mapped from the prepared store")

    monkeypatch.setattr(volume_dataset, "decode_case", no_decoding)
    assert len(load_dataset(spec, 16)) == 4 and len(load_dataset(spec + "&split=valid", 16)) == 1


def test_prepare_volumes_without_out_and_with_a_split(volume_dir, capsys):
    assert main(["data", "prepare", f"volumes:{volume_dir}?split=all", "--resolution", "16"]) == 0
    text = capsys.readouterr().out
    assert "split all: 3 cases, 2 skipped, 16x16x16 voxels" in text and "--volume.size 16" in text
    assert "split valid" not in text  # the spec names its split: only that one


def test_volume_spec_errors_are_one_line(capsys, tmp_path, phantom_dir):
    one_line_error(capsys, ["data", "inspect", f"phantom3d:{tmp_path / 'missing'}"], "has no train.csv")
    one_line_error(capsys, ["data", "inspect", f"volumes:{tmp_path / 'missing'}"], "does not exist")
    one_line_error(capsys, ["data", "inspect", f"phantom3d:{phantom_dir}?bogus=1"], "unknown option(s) bogus")
    one_line_error(capsys, ["data", "prepare", f"volumes:{tmp_path / 'missing'}"], "does not exist")
    one_line_error(capsys, ["data", "inspect", f"phantom3d:{phantom_dir}?shape=4"], "shape=")
    one_line_error(capsys, ["data", "inspect", f"phantom:{tmp_path}", "--resolution", "16"], "not volume data")
    one_line_error(capsys, ["data", "prepare", f"folder:{tmp_path}"], "--out DIR is required")
