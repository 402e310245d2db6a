"""The demo end to end on a few steps (the real demo trains DEMO_STEPS; here the plumbing is checked)."""

import json
import re

import pytest

from meddiff.demo import run_demo
from meddiff.devices import machine_description, run_device


@pytest.mark.slow
def test_demo_writes_a_self_contained_report(tmp_path, monkeypatch):
    from meddiff import demo

    shipped = demo.demo_config

    def lighter(*args, **kwargs):  # the demo's recipe, evaluated on fewer samples (512 x 40 NFE: 15 min on Zen 1)
        config = shipped(*args, **kwargs)
        config.sample_steps, config.eval.fidelity_samples, config.eval.grid_per_label = 4, 96, 2
        return config

    monkeypatch.setattr(demo, "demo_config", lighter)
    report = run_demo(tmp_path, steps=6, n=160, progress=False)
    page = report.read_text()
    assert "not for diagnosis" in page.lower()
    for name in (
        "No Finding",
        "Cardiomegaly",
        "Pleural Effusion",
        "Pneumothorax",
        "Consolidation",
        "Edema",
        "unconditional",
    ):
        assert f"{name}: generated" in page, name
    assert "Cardiomegaly: real phantoms" in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) >= 14  # grids + real examples + loss curve
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "synthetic AUC" in page and "Timings" in page
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["steps"] == 6 and summary["schedule"] == "6 fixed training steps"
    machine = json.loads((tmp_path / "run" / "training.json").read_text())["machine"]
    assert summary["machine"] == machine == machine_description(run_device()) and f"on {machine}," in page
    assert summary["timings_s"]["total"] > 0 and 0 <= summary["min_synthetic_auc"] <= 1
    assert set(summary["fidelity"]["synthetic_auc"]) >= {"Cardiomegaly", "Pleural Effusion"}
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_demo_trains_fixed_steps_unless_given_minutes(tmp_path, monkeypatch):
    from meddiff import demo
    from meddiff.cli import main

    calls = []
    record = lambda out, minutes=None, n=0, seed=0, steps=0: calls.append((minutes, steps))  # noqa: E731
    monkeypatch.setattr(demo, "run_demo", record)
    assert main(["-q", "demo", "--out", str(tmp_path / "a")]) == 0
    assert main(["-q", "demo", "--out", str(tmp_path / "b"), "--steps", "50"]) == 0
    assert main(["-q", "demo", "--out", str(tmp_path / "c"), "--minutes", "3"]) == 0
    assert calls == [(None, demo.DEMO_STEPS), (None, 50), (3.0, demo.DEMO_STEPS)]


def test_demo_config_follows_the_schedule_and_the_shipped_recipe(tmp_path):
    from pathlib import Path

    from meddiff.demo import DEMO_STEPS, demo_config
    from meddiff.training.config import load_config

    fixed, budget = demo_config(tmp_path, "phantom:x"), demo_config(tmp_path, "phantom:x", minutes=5)
    assert (fixed.max_steps, fixed.max_minutes) == (DEMO_STEPS, None)
    assert budget.max_minutes == 5 and budget.max_steps > DEMO_STEPS
    recipe = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "phantom-demo.yaml"), {}, {})
    for key in ("resolution", "batch_size", "max_steps", "learning_rate", "guidance", "sample_steps", "eval"):
        assert getattr(recipe, key) == getattr(fixed, key), key


def test_demo_3d_refuses_the_2d_steps_flag(tmp_path, capsys):
    from meddiff.cli import main

    assert main(["demo", "--3d", "--steps", "5", "--out", str(tmp_path)]) != 0
    assert "--steps is for the 2D demo" in capsys.readouterr().err
