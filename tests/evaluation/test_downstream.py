"""meddiff.evaluation.downstream: the bootstrap AUC interval and the real + synthetic training set."""

import numpy as np
import pytest
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.evaluation.downstream import bootstrap_auc, combine


def test_perfect_scores_give_auc_one_with_a_degenerate_interval():
    y = np.array([0, 0, 0, 1, 1, 1], bool)
    probs = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert bootstrap_auc([probs], y, n_boot=50) == (1.0, 1.0, 1.0)
    assert bootstrap_auc([1 - probs], y, n_boot=50) == (0.0, 0.0, 0.0)


def test_auc_is_averaged_over_seeds_and_the_interval_brackets_it():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.4
    noisy = [y + rng.normal(0, s, 200) for s in (0.6, 1.2)]
    full, lo, hi = bootstrap_auc(noisy, y, n_boot=200)
    from sklearn.metrics import roc_auc_score

    assert full == pytest.approx(np.mean([roc_auc_score(y, p) for p in noisy]))
    assert lo < full < hi and 0.5 < lo and hi < 1.0 and hi - lo < 0.2
    assert bootstrap_auc(noisy, y, n_boot=200, seed=0) == (full, lo, hi)  # seeded


def test_a_missing_class_gives_none():
    assert bootstrap_auc([np.array([0.2, 0.4])], np.array([True, True])) is None
    assert bootstrap_auc([np.array([0.2, 0.4])], np.array([False, False])) is None


def test_combine_concatenates_images_labels_and_prompts():
    def data(n, value, prompt):
        return ImageLabelDataset(
            torch.full((n, 1, 4, 4), value),
            torch.full((n, 2), value),
            torch.ones(n, 2, dtype=bool),
            ["A", "B"],
            prompts=[prompt] * n,
        )

    both = combine(data(3, 1.0, "real"), data(2, 0.0, "synthetic"))
    assert len(both) == 5 and both.label_names == ["A", "B"]
    assert both.labels[:, 0].tolist() == [1, 1, 1, 0, 0] and both.images[3:].abs().sum() == 0
    assert list(both.prompts) == ["real"] * 3 + ["synthetic"] * 2
