"""Spearman-correlation feature filter, survival regressors, cross-validation and the BraTS survival metrics.

The filter is a scikit-learn transformer inside the model pipeline (impute -> filter -> scale -> regressor), so
cross-validation fits it on the training folds only: the held-out fold's survival never chooses features."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata, spearmanr
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from meddiff.errors import MeddiffError

# BraTS survival classes: short < 10 months, mid 10-15 months, long > 15 months, in days as the challenge counts them
SHORT_DAYS, LONG_DAYS = 300.0, 450.0
DEFAULT_RULES = ("none", "|0.08|", "|0.10|", "|0.12|", "<-0.01", "<-0.05", "<-0.10")
MODELS = ("linear", "ridge", "forest", "gbm")


@dataclass(frozen=True)
class FilterRule:
    """Keep features whose Spearman rho with survival satisfies the rule: none, |rho| > t, or rho < t."""

    kind: str  # "none", "abs" or "below"
    threshold: float = 0.0

    @property
    def label(self) -> str:
        return {"none": "without", "abs": f">|{self.threshold:.2f}|", "below": f"<{self.threshold:.2f}"}[self.kind]

    def keep(self, rho: np.ndarray) -> np.ndarray:
        rho = np.nan_to_num(rho, nan=0.0)
        if self.kind == "none":
            return np.ones(rho.shape, bool)
        return np.abs(rho) > self.threshold if self.kind == "abs" else rho < self.threshold


def parse_rule(text: str) -> FilterRule:
    """'none' / 'without'; '|0.1|', '>|0.1|' or 'abs:0.1'; '<-0.05' or 'lt:-0.05'."""
    t = text.strip().lower().replace(" ", "")
    if t in ("none", "without", "all"):
        return FilterRule("none")
    m = re.fullmatch(r">?\|(-?\d*\.?\d+)\||abs:(-?\d*\.?\d+)", t)
    if m:
        value = float(m.group(1) or m.group(2))
        if not 0 <= value < 1:
            raise MeddiffError(f"filter threshold {text!r}: |rho| must be from 0 to 1")
        return FilterRule("abs", value)
    m = re.fullmatch(r"<(-?\d*\.?\d+)|lt:(-?\d*\.?\d+)", t)
    if m:
        value = float(m.group(1) or m.group(2))
        if not -1 < value <= 1:
            raise MeddiffError(f"filter threshold {text!r}: rho must be from -1 to 1")
        return FilterRule("below", value)
    raise MeddiffError(
        f"cannot read filter threshold {text!r}; use none, |0.10| (keep |rho| > 0.10) or <-0.05 (keep rho < -0.05)"
    )


def spearman_columns(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of every column of X with y (ties averaged); 0 for constant columns."""
    rx = rankdata(X, axis=0)
    ry = rankdata(y)
    rx = rx - rx.mean(axis=0)
    ry = ry - ry.mean()
    denom = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry[:, None]).sum(axis=0) / denom
    return np.where(denom > 0, rho, 0.0)


class SpearmanFilter(TransformerMixin, BaseEstimator):
    """Keeps the columns whose Spearman rho with y (computed in fit, on the rows fit sees) passes the rule. When
    nothing passes it outputs one constant column, so the regressor predicts the training mean."""

    def __init__(self, rule: FilterRule = FilterRule("none")):
        self.rule = rule

    def fit(self, X, y):
        self.rho_ = spearman_columns(np.asarray(X, float), np.asarray(y, float))
        self.keep_ = self.rule.keep(self.rho_)
        self.n_rows_seen_ = len(y)
        return self

    def transform(self, X):
        X = np.asarray(X, float)
        return X[:, self.keep_] if self.keep_.any() else np.zeros((X.shape[0], 1))


def make_regressor(name: str, seed: int = 0, trees: int = 300):
    if name == "linear":
        return LinearRegression()
    if name == "ridge":
        return Ridge(alpha=10.0)
    if name == "forest":
        return RandomForestRegressor(
            n_estimators=trees, min_samples_leaf=3, max_features=0.33, random_state=seed, n_jobs=1
        )
    if name == "gbm":
        return GradientBoostingRegressor(
            n_estimators=200, max_depth=2, learning_rate=0.05, subsample=0.8, random_state=seed
        )
    raise MeddiffError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_pipeline(rule: FilterRule, model: str, seed: int = 0, trees: int = 300) -> Pipeline:
    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("filter", SpearmanFilter(rule)),
            ("scale", StandardScaler()),
            ("model", make_regressor(model, seed, trees)),
        ]
    )


def survival_class(days: np.ndarray) -> np.ndarray:
    """0 short (< 300 days), 1 mid (300-450), 2 long (> 450)."""
    days = np.asarray(days, float)
    return np.where(days < SHORT_DAYS, 0, np.where(days <= LONG_DAYS, 1, 2))


def survival_metrics(true_days: np.ndarray, predicted_days: np.ndarray) -> dict[str, float]:
    """The BraTS overall-survival metrics: 3-class accuracy, MSE, median SE, std SE, Spearman R."""
    true_days, predicted_days = np.asarray(true_days, float), np.asarray(predicted_days, float)
    se = (true_days - predicted_days) ** 2
    rho = spearmanr(true_days, predicted_days).statistic if np.ptp(predicted_days) > 0 else 0.0
    return {
        "accuracy": float(np.mean(survival_class(true_days) == survival_class(predicted_days))),
        "mse": float(se.mean()),
        "median_se": float(np.median(se)),
        "std_se": float(se.std()),
        "spearman_r": float(np.nan_to_num(rho)),
    }


@dataclass
class CVResult:
    rule: str
    model: str
    metrics: dict[str, float]  # mean over repeats (each repeat: out-of-fold predictions of every case)
    accuracy_std: float  # across repeats
    features_kept: float  # mean number kept per fold
    predictions: np.ndarray  # first repeat's out-of-fold predictions
    folds: int
    repeats: int


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    rule: FilterRule,
    model: str,
    folds: int = 5,
    repeats: int = 3,
    seed: int = 0,
    trees: int = 300,
) -> CVResult:
    """Repeated k-fold: every fit (imputer, filter, scaler, regressor) sees the training folds only. `trees`: the
    random forest's size."""
    n = len(y)
    if n < max(folds, 4):
        raise MeddiffError(f"{n} usable cases are too few for {folds}-fold cross-validation")
    per_repeat, kept, first = [], [], None
    for r in range(repeats):
        predictions = np.zeros(n)
        for train_idx, test_idx in KFold(folds, shuffle=True, random_state=seed + r).split(X):
            pipe = clone(make_pipeline(rule, model, seed + r, trees)).fit(X[train_idx], y[train_idx])
            predictions[test_idx] = pipe.predict(X[test_idx])
            kept.append(int(pipe.named_steps["filter"].keep_.sum()))
        per_repeat.append(survival_metrics(y, predictions))
        first = predictions if first is None else first
    metrics = {k: float(np.mean([m[k] for m in per_repeat])) for k in per_repeat[0]}
    assert first is not None  # set by the first repeat
    return CVResult(
        rule.label,
        model,
        metrics,
        float(np.std([m["accuracy"] for m in per_repeat])),
        float(np.mean(kept)),
        first,
        folds,
        repeats,
    )
