import json
import shutil

import pytest

from meddiff.errors import MeddiffError
from meddiff.models.card import audit_lines, monitoring_lines, privacy_section
from meddiff.models.privacy_records import stored_audit, stored_calibration, training_privacy_checks


def test_missing_records_read_as_none_and_the_card_says_so(tmp_path):
    assert stored_audit(tmp_path) is None and stored_calibration(tmp_path) is None
    assert training_privacy_checks(tmp_path) == []
    assert "No audit of samples yet" in audit_lines(tmp_path)[0]
    assert "not monitored" in monitoring_lines(tmp_path)[0]
    assert "Not audited" in privacy_section(tmp_path).lines[0]


def test_corrupt_records_are_one_line_errors(tmp_path):
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "audit.json").write_text("{not json")
    with pytest.raises(MeddiffError, match=r"audit.json is not valid JSON; run `meddiff privacy audit"):
        stored_audit(tmp_path)
    (tmp_path / "privacy" / "calibration.json").write_text("[1, 2]")
    with pytest.raises(MeddiffError, match="does not hold a JSON object"):
        stored_calibration(tmp_path)
    (tmp_path / "training.json").write_bytes(b"\xff\xfe")
    with pytest.raises(MeddiffError, match="training.json is not valid JSON"):
        training_privacy_checks(tmp_path)


def test_the_card_and_the_export_check_read_the_same_checks(tmp_path, tiny_run):
    from meddiff.evaluation.privacy_audit import failed_audit

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert failed_audit(run) is None
    row = {"step": 50, "samples": 8, "alpha": 0.01, "copy_rate": 0.5, "copy_rate_low": 0.2, "copy_rate_high": 0.8}
    row |= {"training_images_hit": 3, "loss_gap": 0.01}
    checks = [dict(row, step=25), dict(row, warning="memorising")]
    (run / "training.json").write_text(json.dumps({"steps": 50, "checks": {"privacy": checks}}))
    assert training_privacy_checks(run) == checks
    assert "warnings at steps 50" in monitoring_lines(run)[0]
    assert "warned at its last check (step 50)" in failed_audit(run)
