"""The real-trained 3D classifier and slice feature net: they learn a 3D finding, score fidelity, give FID/KID."""

import numpy as np
import pytest
import torch

from meddiff.errors import MeddiffError
from meddiff.evaluation.volume_classifier import (
    VolumeClassifier,
    binary_columns,
    slice_feature_net,
    train_volume_classifier,
    volume_classifier_scores,
    volume_outputs,
)
from meddiff.evaluation.volume_metrics import slice_distances


def blob_volumes(n: int, seed: int, size: int = 16):
    """Noisy volumes; label 0: a bright 4-voxel cube somewhere in the left half; label 1: a size value (not binary)."""
    g = torch.Generator().manual_seed(seed)
    v = -0.5 + 0.1 * torch.randn(n, 1, size, size, size, generator=g)
    labels = torch.zeros(n, 2)
    for i in range(n):
        if i % 2 == 0:
            x, y, z = (int(c) for c in torch.randint(2, size // 2 - 4, (3,), generator=g))
            v[i, 0, x : x + 4, y : y + 4, z : z + 4] = 0.8
            labels[i, 0] = 1
        labels[i, 1] = 3.5 * i
    return v.clamp(-1, 1), labels, torch.ones(n, 2, dtype=torch.bool)


def test_binary_columns_skips_values_and_single_class_labels():
    labels = torch.tensor([[1.0, 2.5, 1.0], [0.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    known = torch.ones_like(labels, dtype=torch.bool)
    assert binary_columns(labels, known) == [0]
    known[1, 0] = False  # only the 1s are known now: one class
    assert binary_columns(labels, known) == []


def test_the_3d_classifier_learns_a_finding_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path))
    train, labels, known = blob_volumes(24, seed=0)
    test, test_labels, _ = blob_volumes(12, seed=1)
    model = train_volume_classifier(train, labels[:, :1], known[:, :1], epochs=15, seed=0)
    features, probs = volume_outputs(model, test)
    assert features.shape == (12, 128) and probs.shape == (12, 1)
    assert probs[test_labels[:, 0] == 1].min() > probs[test_labels[:, 0] == 0].max()  # separates unseen volumes
    again = train_volume_classifier(train, labels[:, :1], known[:, :1], epochs=15, seed=0)  # from the cache
    assert len(list((tmp_path / "classifiers").glob("volume-*.safetensors"))) == 1
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())


def test_scores_give_real_level_fidelity_to_real_volumes_and_flag_wrong_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path))
    train, labels, known = blob_volumes(24, seed=0)
    held, held_labels, held_known = blob_volumes(12, seed=1)
    names = ["Blob", "Size mL"]
    # "synthetic" volumes that are real and carry their true labels score like the held-out set ...
    good = volume_classifier_scores(
        train, labels, known, names, held, held_labels, held_known, held, held_labels, held_known, epochs=15
    )
    assert good.labels == ["Blob"]  # the value label is not a classification target
    assert good.synthetic_auc["Blob"] == good.real_auc["Blob"] == 1.0
    assert good.fid == pytest.approx(good.real_fid) and good.n_synthetic == good.n_heldout == 12
    # ... while volumes generated against their labels (every blob labelled absent and vice versa) score AUC 0
    wrong = volume_classifier_scores(train, labels, known, names, held, 1 - held_labels, held_known, epochs=15)
    assert wrong.synthetic_auc["Blob"] == 0.0 and wrong.real_fid is None
    # and volumes from another distribution sit far from the training features
    flat = torch.full_like(held, -0.2)
    far = volume_classifier_scores(train, labels, known, names, flat, held_labels, held_known, epochs=15)
    assert far.fid > 10 * max(good.fid, 1e-6)


def test_the_classifier_needs_a_binary_label():
    train, labels, known = blob_volumes(4, seed=0)
    with pytest.raises(MeddiffError, match="binary label"):
        volume_classifier_scores(train, labels[:, 1:], known[:, 1:], ["Size mL"], train, labels[:, 1:], known[:, 1:])


def test_the_slice_feature_net_tells_real_from_altered_slices(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path))
    train, labels, known = blob_volumes(16, seed=0)
    held, _, _ = blob_volumes(16, seed=1)
    features, described = slice_feature_net(train, labels, known, ["Blob", "Size mL"], size=16, epochs=3)
    assert "Blob" in described and "Size" not in described
    assert features(train[:2, :, :, :, 0]).shape == (2, 128)
    near = slice_distances(train, held, features, per_volume=4, n_boot=0)
    far = slice_distances(train, torch.flip(held, dims=(2,)) * 0.3, features, per_volume=4, n_boot=0)
    assert np.isfinite(near.mean_fid) and far.mean_fid > 2 * near.mean_fid


def test_the_classifier_keeps_every_tensor_on_the_given_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path))
    train, labels, known = blob_volumes(4, seed=0)
    model = train_volume_classifier(train, labels[:, :1], known[:, :1], epochs=1, device="cpu")
    assert isinstance(model, VolumeClassifier)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
