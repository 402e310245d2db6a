"""The Spearman filter, its rules, the metrics, and that cross-validation fits the filter on training folds only."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from meddiff.errors import MeddiffError
from meddiff.survival.model import (
    SpearmanFilter,
    cross_validate,
    parse_rule,
    spearman_columns,
    survival_class,
    survival_metrics,
)


@pytest.mark.parametrize(
    "text, kind, threshold, label",
    [
        ("none", "none", 0.0, "without"),
        ("|0.10|", "abs", 0.10, ">|0.10|"),
        (">|0.08|", "abs", 0.08, ">|0.08|"),
        ("abs:0.12", "abs", 0.12, ">|0.12|"),
        ("<-0.05", "below", -0.05, "<-0.05"),
        ("lt:-0.01", "below", -0.01, "<-0.01"),
    ],
)
def test_rules(text, kind, threshold, label):
    rule = parse_rule(text)
    assert (rule.kind, rule.threshold, rule.label) == (kind, threshold, label)


def test_bad_rules_are_refused():
    for text in ("|2|", "maybe", ">0.1"):
        with pytest.raises(MeddiffError):
            parse_rule(text)


def test_spearman_matches_scipy_and_rules_select():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6))
    X[:, 5] = 1.0  # constant
    y = X[:, 0] * 2 - X[:, 1] + rng.normal(size=50) * 0.1
    rho = spearman_columns(X, y)
    for j in range(5):
        assert rho[j] == pytest.approx(spearmanr(X[:, j], y).statistic, abs=1e-12)
    assert rho[5] == 0
    assert SpearmanFilter(parse_rule("|0.3|")).fit(X, y).keep_[:2].all()
    below = SpearmanFilter(parse_rule("<-0.3|".rstrip("|"))).fit(X, y).keep_
    assert below[1] and not below[0]
    assert SpearmanFilter(parse_rule("|0.99|")).fit(X, y).transform(X).shape == (50, 1)  # nothing kept


def test_metrics_and_classes():
    assert survival_class(np.array([10, 299, 300, 450, 451])).tolist() == [0, 0, 1, 1, 2]
    m = survival_metrics(np.array([100, 400, 600, 800]), np.array([200, 350, 700, 100]))
    assert m["accuracy"] == 0.75 and m["mse"] == pytest.approx((100**2 + 50**2 + 100**2 + 700**2) / 4)
    assert m["median_se"] == pytest.approx(10000)


def test_cross_validation_does_not_leak_the_held_out_survival():
    """Pure-noise features, random survival: a filter fitted on all cases would pick the features that happen to
    correlate with the held-out survival too and score well; fitted per fold it scores at chance."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 600))
    y = rng.uniform(50, 900, size=60)
    honest = cross_validate(X, y, parse_rule("|0.30|"), "linear", folds=5, repeats=2)
    assert honest.metrics["spearman_r"] < 0.35
    leaky_keep = SpearmanFilter(parse_rule("|0.30|")).fit(X, y).keep_  # what leakage would look like
    leaky = cross_validate(X[:, leaky_keep], y, parse_rule("none"), "linear", folds=5, repeats=2)
    assert leaky.metrics["spearman_r"] > honest.metrics["spearman_r"] + 0.3


def test_filter_sees_only_training_rows(monkeypatch):
    seen = []
    original = SpearmanFilter.fit

    def spy(self, X, y):
        seen.append(set(np.round(np.asarray(y), 6).tolist()))
        return original(self, X, y)

    monkeypatch.setattr(SpearmanFilter, "fit", spy)
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(25, 4)), rng.permutation(np.arange(25.0) * 10 + 100)
    cross_validate(X, y, parse_rule("|0.1|"), "ridge", folds=5, repeats=1)
    assert len(seen) == 5 and all(len(s) == 20 for s in seen)
    assert set.union(*seen) == set(y.tolist())  # every case trains in 4 folds, is held out in 1
    for s in seen:
        assert len(set(y.tolist()) - s) == 5
