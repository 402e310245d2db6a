"""The privacy records a run directory keeps next to (never inside) its `pipeline/`: the near-copy calibration
(`meddiff privacy calibrate`), the stored audit (`meddiff privacy audit`) and the memorisation checks made during
training (`training.json`, `--privacy.every`). Written by `meddiff.evaluation`; read here, in one place, by the
model card, the export gate and the audit."""

from __future__ import annotations

import json
from pathlib import Path

from meddiff.errors import MeddiffError

PRIVACY_DIR = "privacy"  # in the run directory, never inside pipeline/ (nothing here goes to a model card)
CALIBRATION_FILE = "calibration.json"
AUDIT_FILE = "audit.json"


def _read(path: Path, again: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MeddiffError(f"{path} is not valid JSON; {again}") from None
    if not isinstance(data, dict):
        raise MeddiffError(f"{path} does not hold a JSON object; {again}")
    return data


def stored_calibration(run: str | Path) -> dict | None:
    """RUN/privacy/calibration.json, or None when the model was never calibrated."""
    path = Path(run) / PRIVACY_DIR / CALIBRATION_FILE
    return _read(path, f"run `meddiff privacy calibrate --model {run}` again")


def stored_audit(run: str | Path) -> dict | None:
    """RUN/privacy/audit.json, or None when the model was never audited."""
    return _read(Path(run) / PRIVACY_DIR / AUDIT_FILE, f"run `meddiff privacy audit --model {run}` again")


def training_privacy_checks(run: str | Path) -> list[dict]:
    """The memorisation checks made during training, in step order ([] when none ran)."""
    data = _read(Path(run) / "training.json", "it is written at the end of training")
    checks = (data or {}).get("checks", {})
    return list(checks.get("privacy", [])) if isinstance(checks, dict) else []


def training_dp(run: str | Path) -> dict | None:
    """The differential-privacy record of a DP-SGD run (training.json), or None for a run trained without DP."""
    data = _read(Path(run) / "training.json", "it is written at the end of training")
    record = (data or {}).get("differential_privacy")
    return record if isinstance(record, dict) else None
