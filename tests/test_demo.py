"""The demo end to end on a tiny budget (the real demo trains for 8 minutes; here the plumbing is checked)."""

import json
import re

import pytest

from meddiff.demo import run_demo


@pytest.mark.slow
def test_demo_writes_a_self_contained_report(tmp_path):
    report = run_demo(tmp_path, minutes=0.2, n=160, progress=False)
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
    assert summary["steps"] > 0 and summary["timings_s"]["total"] > 0
    assert set(summary["fidelity"]["synthetic_auc"]) >= {"Cardiomegaly", "Pleural Effusion"}
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
