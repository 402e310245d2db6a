"""`generate --privacy-gate`: flagged images are drawn again with seeds that depend only on (seed, image, retry),
never written when still flagged, and the result does not depend on the batch size; `privacy calibrate` stores a
calibration the gate reads; missing calibration or a moved dataset are one-line errors."""

import csv
import json
import shutil

import numpy as np
import pytest

from meddiff.cli import main
from meddiff.conditioning.labels import LabelCodec
from meddiff.errors import MeddiffError
from meddiff.models.storage import load_pipeline
from meddiff.sampling.generate import SamplingSettings, image_seed
from meddiff.sampling.plan import make_plan
from meddiff.sampling.synthesize import generate_dataset, retry_seed


class FirstDrawFlagged:
    """A stand-in gate: flags every image of its odd-numbered checks (first draws) and none of the even ones
    (redraws); or every image always."""

    fingerprint = "test-gate"

    def __init__(self, max_retries=3, always=False):
        self.max_retries, self.always, self.calls = max_retries, always, 0

    def check(self, images):
        self.calls += 1
        flagged = np.ones(len(images), bool) if (self.always or self.calls % 2 == 1) else np.zeros(len(images), bool)
        return flagged, np.where(flagged, 9.0, 0.5)


def run(tiny_run, out, gate, batch_size=4, n=6):
    pipe = load_pipeline(tiny_run)
    plan = make_plan(LabelCodec(pipe.label_names), labels_text="Cardiomegaly", n=n)
    settings = SamplingSettings(steps=2, seed=3, batch_size=batch_size)
    return generate_dataset(pipe, tiny_run, plan, settings, out, progress=False, gate=gate)


def test_flagged_images_are_redrawn_with_retry_seeds(tmp_path, tiny_run):
    result = run(tiny_run, tmp_path / "a", FirstDrawFlagged())
    assert result.redrawn == 6 and result.rejected == 0 and result.written == 6
    rows = list(csv.DictReader(open(tmp_path / "a" / "manifest.csv")))
    assert [r["privacy_retries"] for r in rows] == ["1"] * 6 and rows[0]["privacy_score"] == "0.5"
    assert [int(r["seed"]) for r in rows] == [image_seed(retry_seed(3, 1), i) for i in range(6)]
    state = json.loads((tmp_path / "a" / "generation.json").read_text())
    assert state["privacy_gate"] == {"calibration": "test-gate", "max_retries": 3}
    # the same images with another batch size (redraw seeds depend on the image, not the batch)
    run(tiny_run, tmp_path / "b", FirstDrawFlagged(), batch_size=5)
    for i in range(6):
        a, b = (tmp_path / d / rows[i]["Path"] for d in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()


def test_images_flagged_on_every_retry_are_never_written(tmp_path, tiny_run):
    result = run(tiny_run, tmp_path / "r", FirstDrawFlagged(max_retries=2, always=True), n=3)
    assert result.rejected == 3 and result.written == 0
    assert not list((tmp_path / "r").glob("*.png"))
    rows = list(csv.DictReader(open(tmp_path / "r" / "manifest.csv")))
    assert rows == []  # complete: every image was decided, none exported
    log = [json.loads(line) for line in (tmp_path / "r" / "privacy_gate.jsonl").read_text().splitlines()]
    assert [e["rejected"] for e in log] == [True] * 3 and all(e["retries"] == 2 for e in log)
    again = run(tiny_run, tmp_path / "r", FirstDrawFlagged(max_retries=2, always=True), n=3)
    assert again.written == 0 and again.skipped == 3  # a rerun does not try the rejected images again


def test_a_gated_folder_is_not_resumed_without_the_gate(tmp_path, tiny_run, capsys):
    run(tiny_run, tmp_path / "g", FirstDrawFlagged(), n=2)

    with pytest.raises(MeddiffError, match="other settings|other privacy_gate|holds a generation"):
        run(tiny_run, tmp_path / "g", None, n=2)


def test_calibrate_then_generate_through_the_cli(tmp_path, tiny_run, capsys):
    data = "phantom:?n=160&seed=3"
    assert (
        main(["generate", "--model", str(tiny_run), "--unconditional", "--privacy-gate", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "no privacy calibration; run `meddiff privacy calibrate" in capsys.readouterr().err
    cal = ["privacy", "calibrate", "--model", str(tiny_run), "--data", data, "--alpha", "0.05", "--positives", "20"]
    with pytest.raises(SystemExit):  # argparse: usage and a one-line reason
        main([*cal, "--model-strengths", "0.1,2"])
    assert "strengths are fractions of the schedule" in capsys.readouterr().err
    assert main([*cal, "--fusion-sources", "-1"]) == 2
    assert "--fusion-sources must be 0 or more" in capsys.readouterr().err
    assert main([*cal, "--descriptor-steps", "20", "--model-strengths", "0.1,0.3"]) == 0
    printed = capsys.readouterr().out
    assert "false-flag rate on 20 held-out images" in printed and "exact 1.000" in printed
    note = json.loads((tiny_run / "privacy" / "calibration.json").read_text())
    assert note["data"] == data and note["calibration"]["alpha"] == 0.05 and len(json.dumps(note)) < 6000  # no images
    assert "descriptor" in note["calibration"]["detectors"] and note["descriptor"]["steps"] == 20
    assert set(note["measured"]["recall"]) == {"exact", "shift", "rotation", "gamma", "noise", "crop", "model t=0.1",
                                               "model t=0.3"}  # fmt: skip
    assert note["heldout_duplicates"] == 0
    assert "calibration images, fewer than the 200 that alpha 0.05 needs" in note["warnings"][0]  # 10 / alpha
    assert (tiny_run / "privacy" / "descriptor.safetensors").is_file()
    assert not (tiny_run / "pipeline" / "privacy").exists()  # never inside the shared pipeline folder
    out = tmp_path / "gated"
    args = ["generate", "--model", str(tiny_run), "--unconditional", "--n", "4", "--steps", "2"]
    assert main([*args, "--privacy-gate", "--out", str(out)]) == 0
    assert "privacy gate:" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert all(r["privacy_score"] != "" for r in rows)
    # the gate catches a copy of a training image
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.privacy_gate import load_gate

    gate = load_gate(tiny_run)
    train = ((load_dataset(data, 32).images[:8].numpy()[:, 0] + 1) / 2).astype(np.float32)
    flagged, _ = gate.check(train)
    assert flagged.all()
    assert gate.index.descriptor is not None and "descriptor" in gate.index.scores(train[:2])
    (tiny_run / "privacy" / "descriptor.safetensors").write_bytes(b"changed")
    with pytest.raises(MeddiffError, match="descriptor.safetensors is not the network this calibration was made with"):
        load_gate(tiny_run)
    shutil.rmtree(tiny_run / "privacy")  # the shared fixture stays as it was


def test_audit_verdict_and_the_failed_audit_override(tmp_path, tiny_run, capsys, monkeypatch):
    """`privacy audit` passes a model that draws new images and fails one that returns training images; a failed
    audit (or a memorisation warning at the last training check) blocks `generate` unless --allow-failed-audit,
    which is then stamped into every file."""
    from PIL import Image

    import meddiff.sampling.generate as generate
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.privacy_audit import failed_audit
    from meddiff.models.card import privacy_section

    data = "phantom:?n=160&seed=3"
    cal = ["privacy", "calibrate", "--model", str(tiny_run), "--data", data, "--alpha", "0.05", "--positives", "20"]
    training_json = (tiny_run / "training.json").read_text()
    try:
        assert main(["privacy", "audit", "--model", str(tiny_run), "--n", "8"]) == 2  # not calibrated yet
        assert "no privacy calibration" in capsys.readouterr().err
        assert main([*cal, "--descriptor-steps", "0", "--model-strengths", "none"]) == 0
        assert main(["privacy", "audit", "--model", str(tiny_run), "--n", "16", "--steps", "2"]) == 0
        assert "privacy audit PASS" in capsys.readouterr().out and failed_audit(tiny_run) is None
        assert "Verdict: **PASS**" in "\n".join(privacy_section(tiny_run).lines)
        train = ((load_dataset(data, 32).images[:16].numpy()[:, 0] + 1) / 2).astype(np.float32)
        monkeypatch.setattr(generate, "sample", lambda *a, **k: train)  # a model that returns its training images
        assert main(["privacy", "audit", "--model", str(tiny_run), "--n", "16"]) == 0
        assert "privacy audit FAIL: 16 of 16" in capsys.readouterr().out
        monkeypatch.undo()
        assert "its privacy audit failed: 16 of 16 samples" in failed_audit(tiny_run)
        args = ["generate", "--model", str(tiny_run), "--unconditional", "--n", "2", "--steps", "2"]
        assert main([*args, "--out", str(tmp_path / "blocked")]) == 2
        assert "not exported without --allow-failed-audit" in capsys.readouterr().err
        assert main([*args, "--allow-failed-audit", "--out", str(tmp_path / "stamped")]) == 0
        for png in (tmp_path / "stamped" / "images").glob("*.png"):
            assert "PRIVACY AUDIT FAILED" in Image.open(png).text["privacy"]
        state = json.loads((tmp_path / "stamped" / "generation.json").read_text())
        assert "PRIVACY AUDIT FAILED" in state["stamp"]["privacy"]
        # an audit of other weights (retrained since) no longer counts; a corrupt one is a one-line error
        audit = json.loads((tiny_run / "privacy" / "audit.json").read_text())
        (tiny_run / "privacy" / "audit.json").write_text(json.dumps({**audit, "model_fingerprint": "other weights"}))
        assert failed_audit(tiny_run) is None
        (tiny_run / "privacy" / "audit.json").write_text("{not json")
        with pytest.raises(MeddiffError, match="is not valid JSON"):
            failed_audit(tiny_run)
        # the memorisation check during training counts too
        (tiny_run / "privacy" / "audit.json").unlink()
        rows = [{"step": 2}, {"step": 4, "warning": "memorising"}]
        (tiny_run / "training.json").write_text(json.dumps({**json.loads(training_json), "checks": {"privacy": rows}}))
        assert "warned at its last check (step 4)" in failed_audit(tiny_run)
    finally:
        (tiny_run / "training.json").write_text(training_json)
        shutil.rmtree(tiny_run / "privacy", ignore_errors=True)


class KilledOnCheck(FirstDrawFlagged):
    """The stand-in gate, interrupted (as by a kill) at its `kill_at`-th check."""

    def __init__(self, kill_at):
        super().__init__()
        self.kill_at = kill_at

    def check(self, images):
        if self.calls + 1 == self.kill_at:
            raise KeyboardInterrupt
        return super().check(images)


def test_a_gated_export_killed_and_resumed_is_byte_identical(tmp_path, tiny_run):
    run(tiny_run, tmp_path / "straight", FirstDrawFlagged(), batch_size=2, n=6)
    with pytest.raises(KeyboardInterrupt):  # killed in the third batch's first check
        run(tiny_run, tmp_path / "resumed", KilledOnCheck(kill_at=5), batch_size=2, n=6)
    assert len(list((tmp_path / "resumed" / "images").glob("*.png"))) == 4
    run(tiny_run, tmp_path / "resumed", FirstDrawFlagged(), batch_size=3, n=6)  # resumed with another batch size
    straight = sorted((tmp_path / "straight" / "images").glob("*.png"))
    assert len(straight) == 6
    for a in straight:
        assert a.read_bytes() == (tmp_path / "resumed" / "images" / a.name).read_bytes()
    rows = list(csv.DictReader(open(tmp_path / "resumed" / "manifest.csv")))
    assert [r["privacy_retries"] for r in rows] == ["1"] * 6
