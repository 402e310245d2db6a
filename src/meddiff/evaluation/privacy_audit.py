"""`meddiff privacy audit`: does a trained model copy its training images? (issue 21)

The model draws `n` images (fixed seeds; labels drawn from its training labels, so the audit sees what an export
would), the calibrated detector of `meddiff privacy calibrate` checks each against the training images, and the audit
records the copy rate with its 95 % Wilson interval, how many distinct training images were hit, and the largest
score. A detector calibrated at alpha flags about alpha of any model's images, so the audit FAILS when the copy rate
is significantly above alpha (the interval's lower bound above it). RUN/privacy/audit.json holds numbers only.

A model whose audit failed, or whose memorisation check during training warned at its last check, is refused by
`meddiff generate` unless `--allow-failed-audit` is given; the override is then stamped into every exported file
(PNG text chunk / DICOM ImageComments) and generation.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.models.factory import SamplerName
from meddiff.models.privacy_records import AUDIT_FILE, PRIVACY_DIR, stored_audit, training_privacy_checks

logger = logging.getLogger(__name__)


def audit_model(
    model_dir: str | Path, n: int = 512, steps: int = 20, seed: int = 12345, scheduler: SamplerName | None = None
) -> dict:
    """Sample, check, write RUN/privacy/audit.json and return it (needs `meddiff privacy calibrate` first). DDIM by
    default: its clipped clean-image estimate lets a memorising model show its copies, where DPM-Solver++ can
    diverge into noise (meddiff.evaluation.privacy_monitor)."""
    from meddiff.evaluation.privacy_gate import count_copies, label_conditions, load_gate
    from meddiff.evaluation.privacy_monitor import revealing_sampler
    from meddiff.models.storage import load_pipeline, model_guidance, run_directory
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.sampling.synthesize import model_fingerprint

    if n < 1:
        raise MeddiffError(f"--n must be at least 1, got {n}")
    run = run_directory(model_dir)
    gate = load_gate(run)  # a one-line error without a calibration
    pipe = load_pipeline(run)
    data = gate.dataset  # the training label mix
    rows = np.random.default_rng(seed).choice(len(data), n, replace=len(data) < n)
    conditions = label_conditions(data, list(pipe.label_names), rows)
    scheduler = scheduler or revealing_sampler(pipe)
    settings = SamplingSettings(steps=steps, guidance=model_guidance(run), seed=seed, scheduler=scheduler)
    logger.info("privacy audit: %d images from %s (%d steps)", n, run, steps)
    images = sample(pipe, conditions, settings, progress=True)
    count = count_copies(gate.calibration, gate.index, images)
    audit = {
        "n": n,
        "copies": count.copies,
        "copy_rate": count.rate,
        "copy_rate_interval": list(count.interval),
        "training_images_hit": count.training_images_hit,
        "share_of_training_images_hit": count.training_images_hit / len(gate.index.images),
        "max_score": count.max_score,
        "threshold": count.threshold,
        "alpha": count.alpha,
        "calibration": gate.fingerprint,
        "model_fingerprint": model_fingerprint(run),
        "sampling": {"steps": steps, "guidance": settings.guidance, "seed": seed, "scheduler": scheduler},
        "verdict": "fail" if count.above_alpha else "pass",
    }
    folder = run / PRIVACY_DIR
    (folder / AUDIT_FILE).write_text(json.dumps(audit, indent=2))
    return audit


def failed_audit(model_dir: str | Path) -> str | None:
    """Why this model must not be exported without an override (its audit failed, or the memorisation check during
    training warned at its last check), or None."""
    from meddiff.models.storage import run_directory
    from meddiff.sampling.synthesize import model_fingerprint

    run = run_directory(model_dir)
    audit = stored_audit(run)
    if audit is not None:
        stale = audit.get("model_fingerprint") not in (None, model_fingerprint(run))  # the weights changed since
        if audit.get("verdict") == "fail" and not stale:
            lo, hi = audit["copy_rate_interval"]
            return (
                f"its privacy audit failed: {audit['copies']} of {audit['n']} samples are near-copies of training "
                f"images (copy rate {audit['copy_rate']:.1%}, 95 % interval {lo:.1%}-{hi:.1%}, above alpha "
                f"{audit['alpha']:g})"
            )
    rows = training_privacy_checks(run)
    if rows and rows[-1].get("warning"):
        return f"the memorisation check during training warned at its last check (step {rows[-1]['step']})"
    return None
