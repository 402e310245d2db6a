"""3D through the command line: train-autoencoder -> train -> generate on tiny phantom volumes, and the report."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from meddiff.cli import main
from meddiff.workflow_volume import RandomConvFeatures, is_volume_data

DATA = "phantom3d:?n=8&size=16"
TINY = {
    "max_steps": 2,
    "batch_size": 2,
    "checkpoint_every": 0,
    "lr_warmup_steps": 1,
    "sample_steps": 2,
    "threads": 1,
    "volume": {
        "autoencoder": {"channels": [8, 16, 16], "norm_num_groups": 8, "scale_samples": 4},
        "unet": {
            "channels": [16, 32],
            "attention_levels": [False, True],
            "norm_num_groups": 8,
            "num_head_channels": 8,
        },
    },
}


def test_volume_specs_are_recognised():
    assert is_volume_data(DATA) and is_volume_data("volumes:/data/brats?modalities=flair")
    assert not is_volume_data("phantom:/data/chest") and not is_volume_data("") and not is_volume_data("nonsense")


def test_random_conv_features_are_fixed_and_tell_slices_apart():
    import torch

    slices = torch.rand(4, 1, 32, 32) * 2 - 1
    a, b = RandomConvFeatures(0)(slices), RandomConvFeatures(0)(slices)
    assert a.shape == (4, 224) and np.array_equal(a, b)
    assert not np.allclose(a[0], RandomConvFeatures(0)(torch.zeros(1, 1, 32, 32))[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("volume_cli")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDDIFF_CACHE", str(root / "cache"))
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    ae, run = root / "ae", root / "run"
    assert main(["-q", "train-autoencoder", "--config", str(recipe), "--data", DATA, "--out", str(ae)]) == 0
    args = ["-q", "train", "--config", str(recipe), "--data", DATA, "--autoencoder", str(ae), "--out", str(run)]
    assert main(args) == 0
    yield root, ae, run
    mp.undo()


@pytest.mark.slow
def test_train_autoencoder_on_volumes_reports_reconstruction(runs):
    _, ae, _ = runs
    metrics = json.loads((ae / "metrics.json").read_text())
    assert {"psnr", "ssim", "ssim_3d", "volumes"} <= set(metrics["reconstruction"])
    assert metrics["latent_shape"] == [4, 4, 4, 4] and metrics["steps"] == 2
    # phantoms: the exact tumour measurement on held-out round trips (the ceiling of a latent model's fidelity)
    trip = metrics["tumour_round_trip"]
    assert trip["n_synthetic"] == trip["n_real"] == metrics["reconstruction"]["volumes"]
    assert trip["real_presence_auc"] is not None and "presence_auc" in trip
    assert (ae / "volume_autoencoder" / "model.safetensors").is_file()
    assert "not for diagnosis" in (ae / "README.md").read_text().lower()
    assert "data:image/png" in (ae / "report.html").read_text()


@pytest.mark.slow
def test_train_on_volumes_writes_metrics_and_report(runs):
    _, _, run = runs
    metrics = json.loads((run / "metrics.json").read_text())
    keys = {"slice_fid", "slice_fid_real", "consistency", "diversity", "memorization", "tumour", "timings"}
    assert keys <= set(metrics)
    assert set(metrics["slice_fid"]["planes"]) == {"axial", "coronal", "sagittal"}
    # "Tumour volume mL" is a measurement (not 0/1): kept in the data, not a condition
    assert metrics["label_names"] == ["Tumour"] and metrics["conditions"] == {"Tumour": 8, "none": 8}
    assert {"presence_auc", "real_presence_auc", "side_accuracy"} <= set(metrics["tumour"])
    assert {"train_s", "generate_s", "metrics_s", "feature_nets_s", "classifier_3d_s"} <= set(metrics["timings"])
    # feature nets trained on the real volumes: slices for the three-plane FID, a 3D classifier for 3D FID and AUC
    assert metrics["features"].startswith("domain slice net") and "Tumour" in metrics["features"]
    c3d = metrics["classifier"]
    assert c3d["labels"] == ["Tumour"] and c3d["n_synthetic"] == 16 and c3d["feature_dim"] == 128
    assert np.isfinite(c3d["fid"]) and c3d["fid"] >= 0 and c3d["real_fid"] is not None
    assert set(c3d["synthetic_auc"]) == {"Tumour"}
    page = (run / "report.html").read_text()
    assert "3D classifier: FID / KID and label fidelity" in page
    assert "real (left) and synthetic (right)" in page and "data:image/png" in page and "type='range'" in page
    assert (run / "samples" / "sweep_axial.gif").is_file()
    assert len(list(csv.DictReader(open(run / "volumes" / "manifest.csv")))) == 16


@pytest.mark.slow
def test_generate_writes_nifti_volumes_on_the_training_grid(runs, capsys):
    root, _, run = runs
    out = root / "generated"
    assert main(["-q", "generate", "--model", str(run), "--labels", "Tumour", "--n", "2", "--steps", "2"] + [
        "--out", str(out)
    ]) == 0  # fmt: skip
    grid = json.loads((run / "pipeline" / "volume_pipeline.json").read_text())["grid"]
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 2 and rows[0]["Tumour"] == "1"
    image = nib.load(out / rows[0]["path"])
    assert image.shape == (16, 16, 16)
    np.testing.assert_allclose(image.affine, np.asarray(grid["affine"]), atol=1e-4)
    assert "synthetic" in image.header["descrip"].item().decode().lower()
    capsys.readouterr()
    assert main(["-q", "generate", "--model", str(run), "--unconditional", "--out", str(out), "--format", "png"]) == 2
    assert "volumes are nifti" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_dicom_series_and_bad_method(runs, capsys):
    root, ae, run = runs
    out = root / "dicom"
    args = ["-q", "generate", "--model", str(run), "--labels", "Tumour", "--n", "1", "--steps", "1", "--format"]
    assert main(args + ["dicom", "--out", str(out)]) == 0
    assert len([p for p in (out / "dicom").rglob("*") if p.is_file()]) == 16  # one file per axial slice
    capsys.readouterr()
    bad = ["-q", "train", "--data", DATA, "--method", "volume-autoencoder", "--out", str(root / "bad")]
    assert main(bad) == 2
    assert "does not train on volumes here" in capsys.readouterr().err


def test_tumour_fidelity_scores_the_requested_size_by_measurement():
    """Large/small tumours rendered at known radii: the size AUC is 1 when the requested sizes are the drawn ones
    and 0 when they are swapped; per-size means and errors against the real ones are reported."""
    from types import SimpleNamespace

    import torch

    from meddiff.data.phantom3d import LARGE_TUMOUR_ML, render_brain_phantom
    from meddiff.workflow_volume import tumour_fidelity

    cases = [(True, 11.0), (True, 19.0), (True, 12.0), (True, 18.0), (False, 15.0)]
    phantoms = [render_brain_phantom(70 + i, 64, tumour=t, side="left", radius_mm=r) for i, (t, r) in enumerate(cases)]
    assert [p.tumour_volume_ml >= LARGE_TUMOUR_ML for p in phantoms] == [False, True, False, True, False]
    images = torch.stack([torch.from_numpy(p.image * 2 - 1)[None] for p in phantoms])
    names = ["Tumour", "Left", "Large"]
    labels = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    known = torch.ones_like(labels, dtype=torch.bool)
    heldout = SimpleNamespace(images=images, labels=labels, known=known, label_names=names)
    spacing = [phantoms[0].spacing] * 3
    right = tumour_fidelity(images, labels, known, heldout, names, spacing)
    assert right.size_auc == 1.0 and right.real_size_auc == 1.0
    large, small = right.mean_volume_ml_by_size["large"], right.mean_volume_ml_by_size["small"]
    assert large > 2 * small and large > LARGE_TUMOUR_ML > small
    assert right.volume_error_ml_by_size == {"large": 0.0, "small": 0.0}  # the same volumes as the real ones
    swapped = labels.clone()
    swapped[:4, 2] = 1 - swapped[:4, 2]
    wrong = tumour_fidelity(images, swapped, known, heldout, names, spacing)
    assert wrong.size_auc == 0.0 and wrong.real_size_auc == 1.0
    assert wrong.volume_error_ml_by_size["large"] == pytest.approx(large - small, abs=0.01)
    plain = tumour_fidelity(images, labels[:, :2], known[:, :2], heldout, names[:2], spacing)
    assert plain.size_auc is None and plain.mean_volume_ml_by_size is None  # no size label: no size rows


@pytest.mark.slow  # a benchmark script in a subprocess
def test_volume_sampling_bench_scores_each_guidance(runs, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, _, run = runs
    out = tmp_path / "v.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "volume_sampling.py"
    env = {**os.environ, "MEDDIFF_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(bench), "--run", str(run), "--guidance", "1", "3", "--steps", "2"]
    cmd += ["--per-condition", "2"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["guidance"], r["steps"], r["volumes"]) for r in rows] == [(1.0, 2, 4), (3.0, 2, 4)]
    assert all(set(r["classifier_auc"]) == {"Tumour"} and "measured_presence_auc" in r for r in rows)
    # what guidance costs: slice FID and 3D diversity per row, with the real held-out reference beside them
    assert all(r["slice_fid"] >= 0 and -1 <= r["diversity_ssim3d"] <= 1 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["slice_fid_real_heldout"] >= 0 and -1 <= saved["diversity_real_heldout"] <= 1


def test_condition_rows_and_their_real_volumes_use_the_model_columns_only():
    """The data holds a measurement and more labels than the model is conditioned on: rows and matching volumes
    come from the model's columns (a mismatch once raised a size error while writing the report)."""
    from types import SimpleNamespace

    import torch

    from meddiff.errors import MeddiffError
    from meddiff.workflow_volume import _matching, condition_rows, label_subset

    labels = torch.tensor([[1, 20.5, 1], [1, 6.0, 0], [0, 0, 0], [1, 18.0, 1]], dtype=torch.float32)
    data = SimpleNamespace(
        labels=labels,
        known=torch.ones_like(labels, dtype=torch.bool),
        label_names=["Tumour", "Tumour volume mL", "Left"],
    )
    data.__len__ = lambda: 4
    rows = condition_rows(data, ["Tumour", "Left"])
    assert [r[0] for r in rows] == ["Tumour + Left", "Tumour", "none"]
    assert [_matching(data, ["Tumour", "Left"], lab, kn) for _, lab, kn in rows] == [[0, 3], [1], [2]]
    with pytest.raises(MeddiffError, match="lacks the model's label column"):
        label_subset(data, ["Tumour", "Large"])
