"""Re-identification: a network trained on the training patients' repeat studies tells held-out patients' studies
apart (same patient vs different patients) far better than one trained on image identity; bad input is one line."""

import numpy as np
import pytest

from meddiff.errors import MeddiffError
from meddiff.evaluation.copy_descriptor import DescriptorSettings, train_descriptor
from meddiff.evaluation.reidentification import reid_metrics, repeat_patients, train_reid

SETTINGS = DescriptorSettings(steps=150, batch_size=64, width=16, dim=64)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from meddiff.data.phantom_dataset import write_phantom_folder
    from meddiff.data.spec import load_dataset

    root = tmp_path_factory.mktemp("studies")
    write_phantom_folder(root, n=480, size=32, seed=4, studies=4, progress=False)
    to01 = lambda d: ((d.images[:].numpy()[:, 0] + 1) / 2).astype(np.float32)  # noqa: E731
    train, held = load_dataset(f"phantom:{root}", 32), load_dataset(f"phantom:{root}?split=valid", 32)
    return to01(train), list(train.patients), to01(held), list(held.patients)


def test_a_reid_network_recognises_held_out_patients(studies):
    train, train_ids, held, held_ids = studies
    assert not set(train_ids) & set(held_ids) and repeat_patients(held_ids).all()
    reid = reid_metrics(train_reid(train, train_ids, SETTINGS), held, held_ids)
    identity = reid_metrics(train_descriptor(train, SETTINGS), held, held_ids)
    assert reid.auc > 0.9 and reid.auc > identity.auc + 0.05, (reid, identity)
    assert reid.same_pairs == reid.patients * 6 and 0 <= reid.tpr_at_1e3 <= 1  # 4 studies: 6 pairs each


def test_bad_input_is_one_line(studies):
    train, train_ids, held, _ = studies
    with pytest.raises(MeddiffError, match="at least two images per patient"):
        train_reid(train[:10], [str(i) for i in range(10)], SETTINGS)
    with pytest.raises(MeddiffError, match="at least 2 patients"):
        reid_metrics(train_descriptor(train[:20], DescriptorSettings(steps=2)), held[:4], ["a"] * 4)
    with pytest.raises(MeddiffError, match="one id per image"):
        train_descriptor(train[:20], SETTINGS, groups=np.zeros(3))


def test_pair_scores_are_exact_in_blocks_and_sampled_beyond_the_cap(studies):
    """Blocked scoring equals scoring every pair at once; a sample of the different-patient pairs (large held-out
    sets) gives nearly the same AUC."""
    from sklearn.metrics import roc_auc_score

    from meddiff.evaluation.copy_descriptor import embed

    train, _, held, held_ids = studies
    net = train_descriptor(train[:64], DescriptorSettings(steps=3, batch_size=16, width=8, dim=16))
    exact = reid_metrics(net, held, held_ids)
    z = embed(net, held)
    upper = np.triu_indices(len(held), k=1)
    ids = np.asarray(held_ids)
    same = ids[upper[0]] == ids[upper[1]]
    assert not exact.negatives_sampled and exact.different_pairs == int((~same).sum())
    assert exact.auc == pytest.approx(roc_auc_score(same, (z @ z.T)[upper]), abs=1e-6)
    sampled = reid_metrics(net, held, held_ids, max_negative_pairs=3000)
    assert sampled.negatives_sampled and sampled.different_pairs == exact.different_pairs
    assert sampled.same_pairs == exact.same_pairs and abs(sampled.auc - exact.auc) < 0.03


def test_held_back_studies_take_one_study_of_repeat_patients_only():
    from meddiff.evaluation.privacy_gate import held_back_studies

    patients = ["a", "a", "a", "b", "c", "c", "d"]
    back = held_back_studies(patients, 10, seed=1)
    assert sorted(patients[i] for i in back) == ["a", "c"] and len(set(back)) == 2
    assert len(held_back_studies(patients, 1, seed=1)) == 1 and len(held_back_studies(["x", "y"], 5)) == 0


def test_the_reid_network_is_stored_with_the_calibration_and_checked_when_loaded(studies, tmp_path):
    """The default lane's check of the storage path the extended gate test covers with a fully trained network."""
    import hashlib

    from meddiff.evaluation.copy_descriptor import embed, save_descriptor
    from meddiff.evaluation.privacy_gate import PRIVACY_DIR, REID_FILE, _stored_network

    train, train_ids, held, _ = studies
    first = sorted(set(train_ids))[:12]
    pick = [i for i, p in enumerate(train_ids) if p in first]
    settings = DescriptorSettings(steps=3, batch_size=16, width=8, dim=16)
    net = train_reid(train[pick], [train_ids[i] for i in pick], settings)
    folder = tmp_path / PRIVACY_DIR
    note = {"reid_network": save_descriptor(net, settings, folder, REID_FILE)}
    note["reid_sha1"] = hashlib.sha1((folder / REID_FILE).read_bytes()).hexdigest()[:16]
    again = _stored_network(tmp_path, note, "reid_network", "reid_sha1", REID_FILE)
    assert again is not None and np.allclose(embed(again, held[:8]), embed(net, held[:8]), atol=1e-5)
    assert _stored_network(tmp_path, {}, "reid_network", "reid_sha1", REID_FILE) is None  # calibrated without ids
    with pytest.raises(MeddiffError, match="not the network this calibration was made with"):
        _stored_network(tmp_path, {**note, "reid_sha1": "0" * 16}, "reid_network", "reid_sha1", REID_FILE)
    (folder / REID_FILE).unlink()
    with pytest.raises(MeddiffError, match="is missing; run `meddiff privacy calibrate` again"):
        _stored_network(tmp_path, note, "reid_network", "reid_sha1", REID_FILE)


@pytest.mark.extended  # trains the copy descriptor and the re-ID network: about 5 minutes on a slow CPU
@pytest.mark.slow
def test_the_gate_scores_training_patients_with_the_reid_network(studies, tmp_path):
    """With patient ids the gate gains a re-identification detector; another study of a training patient (held back
    from the reference set) is measured as "same patient" and lies nearer its patient under the re-ID network than
    under pixels; the network is stored with the calibration and checked when loaded."""
    import hashlib

    from sklearn.metrics import roc_auc_score

    from meddiff.evaluation.copy_descriptor import DescriptorSettings, save_descriptor
    from meddiff.evaluation.privacy_gate import (
        REID_FILE,
        ReferenceIndex,
        _stored_network,
        audit_detector,
        held_back_studies,
    )

    train, train_ids, held, held_ids = studies
    audit = audit_detector(
        train, held, held_ids, alpha=0.05, positives=40, descriptor_steps=100, train_patients=train_ids,
        fusion_sources=60,
    )  # fmt: skip
    assert audit.reid is not None and "reid" in audit.calibration.detectors
    assert audit.report.n_positives["same patient"] == 40
    assert len(audit.index.images) == len(train)  # the gate that runs, and its threshold, hold every training image
    back = held_back_studies(train_ids, 80, 0)
    reduced = ReferenceIndex(np.delete(train, back, axis=0), reid=audit.reid)  # what the studies were measured on
    studies_back = train[back[40:]]  # the measured half
    pos, neg = reduced.scores(studies_back), reduced.scores(held)
    y = np.r_[np.zeros(len(held)), np.ones(len(studies_back))]
    auc = {d: roc_auc_score(y, np.r_[neg[d], pos[d]]) for d in ("pixel", "reid")}
    assert auc["reid"] > 0.65 and auc["reid"] > auc["pixel"] + 0.05, auc
    settings = DescriptorSettings(steps=100)
    folder = tmp_path / "privacy"
    note = {"reid_network": save_descriptor(audit.reid, settings, folder, REID_FILE)}
    note["reid_sha1"] = hashlib.sha1((folder / REID_FILE).read_bytes()).hexdigest()[:16]
    again = _stored_network(tmp_path, note, "reid_network", "reid_sha1", REID_FILE)
    from meddiff.evaluation.copy_descriptor import embed

    assert np.allclose(embed(again, held[:8]), embed(audit.reid, held[:8]), atol=1e-5)
    with pytest.raises(MeddiffError, match="not the network this calibration was made with"):
        _stored_network(tmp_path, {**note, "reid_sha1": "0" * 16}, "reid_network", "reid_sha1", REID_FILE)
