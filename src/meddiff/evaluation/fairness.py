"""Fairness table: label fidelity and FID per demographic subgroup (sex, age bin, view).

For models conditioned on demographics (meddiff.data.demographics), the generated images of each subgroup (those
generated for women, for 60-79-year-olds, for AP views, ...) are scored for the findings with the real-trained
classifier, next to the same classifier on the real held-out images of that subgroup, and compared with them by
FID on the classifier's features. A generator that is faithful on average but not for one subgroup shows here."""

from __future__ import annotations

import numpy as np

from meddiff.data.demographics import ALL_LABELS, SEX_LABEL
from meddiff.evaluation.classifier import per_label_auc
from meddiff.evaluation.distribution import fid

MIN_FOR_FID = 10  # images per side below which a subgroup's FID is not reported


def subgroups(names: list[str]) -> dict[str, tuple[int, float]]:
    """Subgroup name -> (label column, value that defines it): 'female', 'male', 'Age 60-79', 'View AP', ..."""
    out: dict[str, tuple[int, float]] = {}
    for k, name in enumerate(names):
        if name == SEX_LABEL:
            out["female"], out["male"] = (k, 1.0), (k, 0.0)
        elif name in ALL_LABELS:
            out[name] = (k, 1.0)
    return out


def _members(labels: np.ndarray, known: np.ndarray, column: int, value: float) -> np.ndarray:
    return known[:, column] & ((labels[:, column] > 0.5) == (value > 0.5))


def fairness_table(
    names: list[str],
    real: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    synthetic: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, dict] | None:
    """real / synthetic: (classifier probabilities (N, K), labels (N, K), known (N, K), features (N, D)).
    Per subgroup: image counts, the findings' AUCs (per finding and mean) on real held-out and generated images,
    and FID between them. None when the labels hold no demographic group."""
    groups = subgroups(names)
    if not groups:
        return None
    findings = [k for k, n in enumerate(names) if n not in ALL_LABELS]
    finding_names = [names[k] for k in findings]
    table: dict[str, dict] = {}
    for group, (column, value) in groups.items():
        entry: dict = {}
        for side, (probs, labels, known, features) in (("real", real), ("synthetic", synthetic)):
            rows = _members(labels, known, column, value)
            auc = per_label_auc(
                probs[rows][:, findings], labels[rows][:, findings], known[rows][:, findings], finding_names
            )
            values = [v for v in auc.values() if v is not None]
            entry[f"n_{side}"] = int(rows.sum())
            entry[f"{side}_auc"] = auc
            entry[f"mean_{side}_auc"] = float(np.mean(values)) if values else None
            entry[f"_features_{side}"] = features[rows]
        a, b = entry.pop("_features_real"), entry.pop("_features_synthetic")
        entry["fid"] = fid(a, b) if min(len(a), len(b)) >= MIN_FOR_FID else None
        table[group] = entry
    return table


def fairness_lines(table: dict[str, dict]) -> list[str]:
    """Markdown rows for the model card."""
    lines = [
        "| subgroup | n real | n generated | mean finding AUC, real | mean finding AUC, generated | FID |",
        "|---|---|---|---|---|---|",
    ]

    def f(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    for group, e in table.items():
        lines.append(
            f"| {group} | {e['n_real']} | {e['n_synthetic']} | {f(e['mean_real_auc'])} | "
            f"{f(e['mean_synthetic_auc'])} | {f(e['fid'], 2)} |"
        )
    return lines
