"""The metrics behave: they separate what should be separated and flag what should be flagged."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from meddiff.data.spec import load_dataset
from meddiff.evaluation.classifier import per_label_auc, predict
from meddiff.evaluation.distribution import fid, kid, prdc
from meddiff.evaluation.diversity import mean_pairwise_similarity
from meddiff.evaluation.features import domain_classifier, embed
from meddiff.evaluation.memorization import audit


@pytest.fixture(scope="module")
def setup():
    train = load_dataset("phantom:?n=500&seed=31", 32)
    test = load_dataset("phantom:?n=1200&seed=31&split=valid", 32)  # 300 held-out
    fresh = load_dataset("phantom:?n=300&seed=77", 32)
    clf = domain_classifier(train, "phantom:?n=500&seed=31", epochs=5, progress=False)
    return train, test, fresh, clf


def feats(clf, images):
    return embed(clf, images)


@pytest.mark.slow  # trains a domain classifier on 500 phantoms (module fixture); see CONTRIBUTING.md
def test_fid_and_kid_order(setup):
    train, test, _, clf = setup
    f_test, f_train = feats(clf, test.images), feats(clf, train.images[:300])
    noise = torch.rand_like(test.images) * 2 - 1
    blurred = torch.from_numpy(ndimage.gaussian_filter(test.images.numpy(), sigma=(0, 0, 1.5, 1.5))).float()
    f_noise, f_blur = feats(clf, noise), feats(clf, blurred)
    real = fid(f_test, f_train)
    assert real < fid(f_test, f_noise) / 10 and real < fid(f_test, f_blur) / 3
    k_real, k_blur, k_noise = kid(f_test, f_train)[0], kid(f_test, f_blur)[0], kid(f_test, f_noise)[0]
    assert k_real < k_blur < k_noise
    assert fid(f_test, f_blur) < fid(f_test, f_noise)
    p = prdc(f_test, f_train)
    assert p["precision"] > 0.5 and p["recall"] > 0.5 and p["coverage"] > 0.5
    assert prdc(f_test, f_noise)["precision"] < 0.1


@pytest.mark.slow  # trains a domain classifier on 500 phantoms (module fixture); see CONTRIBUTING.md
def test_memorization_flags_copies_not_fresh_images(setup):
    train, test, fresh, clf = setup
    to01 = lambda t: (t[:, 0].numpy() + 1) / 2  # noqa: E731
    f_train, f_test = feats(clf, train.images), feats(clf, test.images)
    copies = audit(to01(train.images[:100]), to01(train.images), f_train[:100], f_train, to01(test.images), f_test)
    assert copies.flagged.mean() == 1.0 and (copies.pixel_match == np.arange(100)).all()
    new = audit(to01(fresh.images), to01(train.images), feats(clf, fresh.images), f_train, to01(test.images), f_test)
    assert new.flagged.mean() < 0.1
    # the kNN distance ratio: copies score 0 and are all flagged by it alone; new images sit near 1, rarely flagged
    assert copies.flagged_knn.all() and copies.knn_ratio.max() < 1e-6
    assert new.flagged_knn.mean() < 0.1 and 0.5 < float(np.median(new.knn_ratio)) < 3
    # lightly perturbed training images (a "near copy") score far below new images
    noisy = (train.images[:50] + 0.02 * torch.randn_like(train.images[:50])).clamp(-1, 1)
    near = audit(to01(noisy), to01(train.images), feats(clf, noisy), f_train, to01(test.images), f_test)
    assert float(np.median(near.knn_ratio)) < 0.5 * float(np.median(new.knn_ratio))
    d = new.to_dict()
    assert d["rate_knn_ratio"] == float(new.flagged_knn.mean()) and d["knn_ratio_threshold"] > 0


def test_knn_ratio_on_a_known_layout():
    from meddiff.evaluation.memorization import knn_ratio

    refs = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    ratio, match = knn_ratio(np.array([[0.1, 0.0], [11.0, 0.0], [0.0, 0.0]]), refs)
    assert match.tolist() == [0, 2, 0]
    # 0.1 from refs[0], whose own nearest neighbour is 1 away; 1 from refs[2] (neighbour 2 away); an exact copy
    assert np.allclose(ratio, [0.1, 0.5, 0.0])


@pytest.mark.slow  # trains a domain classifier on 500 phantoms (module fixture); see CONTRIBUTING.md
def test_shuffled_labels_give_chance_fidelity(setup):
    train, test, _, clf = setup
    probs = predict(clf, test.images)
    honest = per_label_auc(probs, test.labels.numpy(), test.known.numpy(), test.label_names)
    shuffled = test.labels.numpy()[np.random.default_rng(0).permutation(len(test))]
    cheat = per_label_auc(probs, shuffled, test.known.numpy(), test.label_names)
    assert honest["Cardiomegaly"] > 0.9
    assert all(abs(v - 0.5) < 0.12 for v in cheat.values() if v is not None), cheat


@pytest.mark.slow  # trains a domain classifier on 500 phantoms (module fixture); see CONTRIBUTING.md
def test_diversity_detects_collapse(setup):
    train, *_ = setup
    imgs = (train.images[:40, 0].numpy() + 1) / 2
    varied, metric = mean_pairwise_similarity(imgs)
    collapsed, _ = mean_pairwise_similarity(np.repeat(imgs[:1], 40, 0))
    assert metric == "SSIM" and collapsed > 0.99 and varied < collapsed - 0.1


def _exact(n: int, mean: np.ndarray, variances: np.ndarray, seed: int) -> np.ndarray:
    """n samples whose sample mean is `mean` and sample covariance is exactly diag(variances)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(mean)))
    x -= x.mean(0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    white = x @ np.linalg.inv(chol).T  # sample covariance exactly the identity
    return white * np.sqrt(variances) + mean


def test_fid_matches_the_closed_form_for_known_gaussians():
    from meddiff.evaluation.distribution import fid, trace_sqrt_product

    d1, d2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 1.0, 16.0])
    m1, m2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 0.0])
    a, b = _exact(500, m1, d1, 0), _exact(700, m2, d2, 1)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()  # commuting covariances
    assert abs(fid(a, b) - closed) < 1e-8 and abs(fid(a, a)) < 1e-8
    # a rotated (non-commuting) pair against the matrix square root computed another way
    rot = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))[0]
    s1, s2 = np.diag(d1), rot @ np.diag(d2) @ rot.T
    w, v = np.linalg.eig(s1 @ s2)  # real positive eigenvalues: S1 S2 is similar to an SPD matrix
    assert abs(trace_sqrt_product(s1, s2) - np.sqrt(w.real).sum()) < 1e-9


def test_fid_stays_real_and_finite_for_singular_covariances():
    """Fewer samples than dimensions: singular covariances, where sqrtm(S1 S2) goes complex. The value is real,
    finite, non-negative up to rounding, and zero for identical sets."""
    from meddiff.evaluation.distribution import fid

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.5
    value = fid(a, b)
    assert np.isfinite(value) and value > 0 and isinstance(value, float)
    assert abs(fid(a, a)) < 1e-6


def test_fid_agrees_with_monai_where_it_is_installed():
    monai_metrics = pytest.importorskip("monai.metrics")
    from meddiff.evaluation.distribution import fid

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(300, 8)) * 1.5 + 0.3
    reference = float(monai_metrics.FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert abs(fid(a, b) - reference) < 1e-4 * max(1.0, reference)
