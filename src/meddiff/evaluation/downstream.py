"""Downstream utility: the same classifier recipe trained on real, on synthetic, and on real + synthetic images,
each tested on the real test split; per-label AUC averaged over seeds, with a bootstrap 95 % interval over test
images (each bootstrap sample re-scores the seed-averaged AUC)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from meddiff.data.dataset import ImageLabelDataset
from meddiff.evaluation.classifier import predict, train_classifier


def combine(a: ImageLabelDataset, b: ImageLabelDataset) -> ImageLabelDataset:
    return ImageLabelDataset(
        torch.cat([a.images[:], b.images[:]]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.known, b.known]),
        list(a.label_names),
        prompts=[*a.prompts, *b.prompts],
    )


def bootstrap_auc(probs_per_seed: list[np.ndarray], y: np.ndarray, n_boot: int = 500, seed: int = 0):
    """(mean over seeds of AUC, lower, upper) for one label; None where a class is missing."""
    if not 0 < y.sum() < len(y):
        return None

    def score(idx):
        return float(np.mean([roc_auc_score(y[idx], p[idx]) for p in probs_per_seed]))

    rng = np.random.default_rng(seed)
    full = score(np.arange(len(y)))
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            boots.append(score(idx))
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (full, full)
    return full, float(lo), float(hi)


def downstream(
    real_train: ImageLabelDataset,
    synthetic: ImageLabelDataset,
    test: ImageLabelDataset,
    seeds: int = 3,
    epochs: int = 10,
    progress: bool = False,
) -> dict:
    sets = {"real": real_train, "synthetic": synthetic, "real+synthetic": combine(real_train, synthetic)}
    out: dict[str, dict] = {}
    bar = tqdm(total=len(sets) * seeds, desc="downstream classifiers", unit="model", disable=not progress)
    for name, data in sets.items():
        probs = []
        for s in range(seeds):
            bar.set_postfix(train_set=name, seed=s)
            probs.append(predict(train_classifier(data, epochs=epochs, seed=s), test.images))
            bar.update(1)
        per_label = {}
        for k, label in enumerate(test.label_names):
            mask = test.known[:, k].numpy()
            result = bootstrap_auc([p[mask, k] for p in probs], test.labels[mask, k].numpy() > 0.5)
            per_label[label] = None if result is None else {"auc": result[0], "ci95": [result[1], result[2]]}
        out[name] = {"n_train": len(data), "seeds": seeds, "auc": per_label}
    bar.close()
    return out
