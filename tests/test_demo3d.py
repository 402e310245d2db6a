"""`meddiff demo --3d` end to end on 16^3 phantoms with a few fixed steps (MEDDIFF_DEMO3D_SIZE / _N)."""

import csv
import json

import pytest

from meddiff import demo
from meddiff.cli import main
from meddiff.demo import add_side_label, run_demo3d


def test_side_and_size_label_columns(tmp_path):
    for name in ("train.csv", "valid.csv"):
        rows = [
            {"path": "a", "Tumour": "1", "side": "left", "Tumour volume mL": "20.5"},
            {"path": "b", "Tumour": "1", "side": "right", "Tumour volume mL": "6.1"},
            {"path": "c", "Tumour": "0", "side": "none", "Tumour volume mL": "0"},
        ]
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    add_side_label(tmp_path)
    add_side_label(tmp_path)  # idempotent
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert [r["Left"] for r in rows] == ["1", "0", "0"]
    assert [r["Large"] for r in rows] == ["1", "0", "0"]  # core >= LARGE_TUMOUR_ML (14.1 mL)


@pytest.mark.slow
def test_demo_3d_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDDIFF_DEMO3D_SIZE", "16")
    monkeypatch.setenv("MEDDIFF_DEMO3D_N", "8")
    run_demo3d(tmp_path / "demo", progress=False, ae_steps=4, ldm_steps=3)
    numbers = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert numbers["schedule"] == "fixed step counts"
    assert (numbers["autoencoder"]["steps"], numbers["latent_diffusion"]["steps"]) == (4, 3)
    assert {"phantoms", "autoencoder", "total"} <= set(numbers["timings_s"])
    assert set(numbers["conditions"]) == {"Tumour + Left", "Tumour", "none"}
    assert {"psnr", "ssim", "ssim_3d"} <= set(numbers["autoencoder"])
    assert numbers["label_fidelity"]["n_synthetic"] == 12
    assert "mean" in numbers["slice_fid"] and "rate_flagged" in numbers["memorization"]
    page = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png" in page and "Timings" in page and f"On {numbers['machine']}" in page
    assert numbers["machine"] == json.loads((tmp_path / "demo" / "run" / "training.json").read_text())["machine"] != ""
    assert (tmp_path / "demo" / "run" / "volumes" / "manifest.csv").is_file()


def test_demo_3d_trains_fixed_steps_unless_given_minutes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo3d", lambda out, minutes=None, seed=0: calls.append((minutes, seed)))
    assert main(["-q", "demo", "--3d", "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "demo", "--3d", "--out", str(tmp_path / "b"), "--minutes", "20", "--seed", "3"]) == 0
    assert calls == [(None, 0), (20.0, 3)]  # no --minutes: fixed steps (the same numbers on every machine)


def test_the_shipped_recipe_is_what_the_demo_trains(tmp_path):
    from pathlib import Path

    from meddiff.demo import demo3d_config
    from meddiff.training.config import load_config

    recipe = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "demo3d-cpu.yaml"), {}, {})
    trained = demo3d_config(tmp_path, "phantom3d:", 64, 0)
    assert recipe.volume == trained.volume
    assert (recipe.guidance, recipe.sample_steps, recipe.cond_dropout) == (8.0, 12, 0.15)
    keys = ("guidance", "sample_steps", "cond_dropout", "noise_offset", "learning_rate")
    assert {k: getattr(recipe, k) for k in keys} == {k: getattr(trained, k) for k in keys}
    assert trained.noise_offset == 0.1
