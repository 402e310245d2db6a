"""`meddiff survival`: cases -> radiomic features -> Spearman filter + regressor in cross-validation -> tables.

Two tables, as in the study this follows: one row per filter threshold (all chosen modalities), and one row per
input modality (each modality's intensity and texture features alone, then all of them; shape, location and age
are in every row since they come from the segmentation and the clinical table, not from a modality)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.survival.cases import MODALITIES, discover_cases
from meddiff.survival.features import REGION_NAMES, REGIONS, FeatureSettings, extract_all
from meddiff.survival.model import (
    DEFAULT_RULES,
    LONG_DAYS,
    MODELS,
    SHORT_DAYS,
    SpearmanFilter,
    cross_validate,
    parse_rule,
    survival_class,
)
from meddiff.survival.report import write_markdown

logger = logging.getLogger(__name__)


@dataclass
class SurvivalConfig:
    data: str
    out: str
    modalities: tuple[str, ...] = MODALITIES
    rules: tuple[str, ...] = DEFAULT_RULES
    models: tuple[str, ...] = ("linear", "forest")
    modality_rule: str = "|0.10|"  # the filter used for the per-modality table
    feature_classes: tuple[str, ...] = ("firstorder", "shape", "glcm")
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    workers: int = 1
    forest_trees: int = 300  # the random forest's size (fewer: quicker, noisier)
    resection: str = "all"  # "all", or e.g. "GTR" to keep only gross-total resections (the challenge's subset)
    extra: dict = field(default_factory=dict)


def modality_columns(names: list[str], modality: str | None) -> np.ndarray:
    """Columns for one modality's row: age, shape and location, and that modality's intensity/texture features
    (modality None: every column)."""
    if modality is None:
        return np.ones(len(names), bool)
    keep = []
    for name in names:
        parts = name.split("_")
        intensity = len(parts) >= 3 and parts[1] in MODALITIES
        keep.append(not intensity or parts[1] == modality)
    return np.array(keep)


def run_survival(config: SurvivalConfig, progress: bool = True) -> dict:
    for model in config.models:
        if model not in MODELS:
            raise MeddiffError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    rules = [parse_rule(r) for r in config.rules]
    modality_rule = parse_rule(config.modality_rule)
    if config.folds < 2 or config.repeats < 1:
        raise MeddiffError("--folds must be at least 2 and --repeats at least 1")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    table = discover_cases(config.data, tuple(config.modalities))
    cases = table.cases
    skipped = dict(table.skipped)
    if config.resection != "all":
        for case in cases:
            if case.resection.upper() != config.resection.upper():
                skipped[case.case_id] = f"resection {case.resection or 'unknown'} (kept: {config.resection})"
        cases = [c for c in cases if c.case_id not in skipped]
    if not cases:
        raise MeddiffError(
            f"no usable case in {config.data} ({len(skipped)} skipped: "
            f"{', '.join(sorted(set(skipped.values())))[:200]})"
        )
    settings = FeatureSettings(modalities=tuple(config.modalities), classes=tuple(config.feature_classes))
    ids, names, X, failed = extract_all(
        cases, settings, cache=out / "features", workers=config.workers, progress=progress
    )
    skipped.update(failed)
    by_id = {c.case_id: c for c in cases}
    y = np.array([by_id[i].survival_days for i in ids], dtype=np.float64)
    if progress:
        logger.info(
            "%d cases, %d features; %d cases left out (%s)",
            len(ids),
            len(names),
            len(skipped),
            ", ".join(f"{k}: {v}" for k, v in _summary(skipped).items()),
        )
    _write_features(out / "features.csv", ids, y, names, X)

    threshold_rows = []
    for rule in rules:
        for model in config.models:
            threshold_rows.append(
                _row(
                    cross_validate(X, y, rule, model, config.folds, config.repeats, config.seed, config.forest_trees),
                    "+".join(config.modalities),
                )
            )
    modality_rows = []
    for modality in [*config.modalities, None] if len(config.modalities) > 1 else [None]:
        cols = modality_columns(names, modality)
        for model in config.models:
            result = cross_validate(
                X[:, cols], y, modality_rule, model, config.folds, config.repeats, config.seed, config.forest_trees
            )
            modality_rows.append(
                _row(
                    result, modality.upper() if modality else "all: " + ", ".join(m.upper() for m in config.modalities)
                )
            )

    # features the filter keeps when fitted on every case (for reading; cross-validation refits it per fold)
    kept = []
    for rule in rules:
        if rule.kind == "none":
            continue
        filt = SpearmanFilter(rule).fit(_impute(X), y)
        order = np.argsort(-np.abs(filt.rho_))
        kept.append(
            {
                "rule": rule.label,
                "count": int(filt.keep_.sum()),
                "features": [{"name": names[j], "rho": round(float(filt.rho_[j]), 4)} for j in order if filt.keep_[j]],
            }
        )
    classes = np.bincount(survival_class(y), minlength=3)
    report = {
        "data": str(config.data),
        "cases_used": len(ids),
        "cases_skipped": skipped,
        "skip_summary": _summary(skipped),
        "features": {
            "count": len(names),
            "classes": list(settings.classes),
            "regions": {k: f"{REGION_NAMES[k]} (labels {', '.join(map(str, v))})" for k, v in REGIONS.items()},
            "modalities": list(config.modalities),
            "bin_width": settings.bin_width,
            "normalisation": f"z-score inside the brain mask x {settings.scale:g}",
            "location": "tumour centroid distance and x/y/z offset from the brain centre (mm), extent",
            "clinical": ["age"],
        },
        "survival_classes": {
            "cutoffs_days": [SHORT_DAYS, LONG_DAYS],
            "definition": f"short < {SHORT_DAYS:g} days (10 months), mid {SHORT_DAYS:g}-"
            f"{LONG_DAYS:g} days, long > {LONG_DAYS:g} days (15 months)",
            "counts": {"short": int(classes[0]), "mid": int(classes[1]), "long": int(classes[2])},
            "chance_accuracy": float(classes.max() / classes.sum()),
        },
        "validation": {
            "folds": config.folds,
            "repeats": config.repeats,
            "seed": config.seed,
            "note": "imputer, Spearman filter, scaler and regressor are fitted on the training folds only",
        },
        "threshold_table": threshold_rows,
        "modality_table": modality_rows,
        "modality_table_rule": modality_rule.label,
        "kept_features": kept,
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
    }
    (out / "survival.json").write_text(json.dumps(report, indent=2))
    write_markdown(out / "survival.md", report)
    return report


def _impute(X: np.ndarray) -> np.ndarray:
    from sklearn.impute import SimpleImputer

    return SimpleImputer(strategy="median", keep_empty_features=True).fit_transform(X)


def _summary(skipped: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in skipped.values():
        key = reason.split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _row(result, inputs: str) -> dict:
    return {
        "filter": result.rule,
        "model": result.model,
        "inputs": inputs,
        **{k: round(v, 4) for k, v in result.metrics.items()},
        "accuracy_std": round(result.accuracy_std, 4),
        "features_kept": round(result.features_kept, 1),
    }


def _write_features(path: Path, ids: list[str], y: np.ndarray, names: list[str], X: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "survival_days", *names])
        for case_id, days, row in zip(ids, y, X):
            writer.writerow([case_id, f"{days:g}", *("" if np.isnan(v) else f"{v:.6g}" for v in row)])
