"""Downstream utility: the same classifier recipe trained on real, on synthetic, and on real + synthetic images
(and, when asked, synthetic pretraining then real fine-tuning, class-reweighted real data, and smaller real fractions
with and without the synthetic set), each tested on the real test split; per-label AUC averaged over seeds, with a
bootstrap 95 % interval over test images (each bootstrap sample re-scores the seed-averaged AUC), and per-label
recall at probability 0.5."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.classifier import LabelClassifier, label_pos_weight, predict, train_classifier

# protocol -> what its classifier is trained on (every one: the same recipe, epochs and seeds)
PROTOCOLS = {
    "real": "the real training split",
    "synthetic": "the synthetic set only",
    "real+synthetic": "the real training split and the synthetic set pooled",
    "synthetic->real": "pretrained on the synthetic set, then fine-tuned on the real training split",
    "real-reweighted": "the real training split, each label's positives weighted by negatives / positives "
    "(the class-reweighting baseline for rare classes)",
}
DEFAULT_PROTOCOLS = ("real", "synthetic", "real+synthetic")


def combine(a: ImageLabelDataset, b: ImageLabelDataset) -> ImageLabelDataset:
    return ImageLabelDataset(
        torch.cat([a.images[:], b.images[:]]),
        torch.cat([a.labels, b.labels]),
        torch.cat([a.known, b.known]),
        list(a.label_names),
        prompts=[*a.prompts, *b.prompts],
        multiclass=a.multiclass,
    )


def real_fraction(data: ImageLabelDataset, fraction: float, seed: int = 0) -> ImageLabelDataset:
    """A stratified random `fraction` of `data`: the same share of every label combination (at least one image of
    each), so a rare class is not lost from the smaller sets."""
    groups: dict[tuple, list[int]] = {}
    present = ((data.labels > 0.5) & data.known).numpy()
    for i, row in enumerate(present):
        groups.setdefault(tuple(row.tolist()), []).append(i)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for rows in groups.values():
        take = max(1, int(round(fraction * len(rows))))
        keep.extend(rng.choice(rows, size=take, replace=False).tolist())
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    return ImageLabelDataset(
        data.images[:][idx],
        data.labels[idx],
        data.known[idx],
        list(data.label_names),
        prompts=[] if data.prompts_from_labels else [data.prompts[i] for i in idx.tolist()],
        multiclass=data.multiclass,
    )


def rank_auc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of `scores` (..., n) against binary labels `y` (..., n), from the Mann-Whitney rank sum
    (ties share their average rank): what sklearn's roc_auc_score gives for one row, for thousands of rows at once
    (the bootstrap's resamples; one sklearn call a resample took minutes per evaluation). Rows need both classes."""
    from scipy.stats import rankdata

    y = np.broadcast_to(np.asarray(y, dtype=bool), np.shape(scores))
    ranks = rankdata(scores, axis=-1)
    pos = y.sum(-1)
    neg = y.shape[-1] - pos
    return (np.where(y, ranks, 0.0).sum(-1) - pos * (pos + 1) / 2) / (pos * neg)


def bootstrap_auc(probs_per_seed: list[np.ndarray], y: np.ndarray, n_boot: int = 500, seed: int = 0):
    """(mean over seeds of AUC, lower, upper) for one label; None where a class is missing. The resamples are
    drawn one by one (the stream the percentile interval has always used) and scored a bounded chunk at a time, so
    memory stays ~32 MiB for any test-set size."""
    y = np.asarray(y)
    if not 0 < y.sum() < len(y):
        return None
    probs = np.stack([np.asarray(p, dtype=np.float64) for p in probs_per_seed])  # (seeds, n)
    if not np.isfinite(probs).all():
        raise MeddiffError("a classifier gave NaN or infinite scores (diverged training?); no AUC can be computed")
    full = float(rank_auc(y, probs).mean())
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // (len(probs) * len(y)))  # resamples held and scored at once: ~32 MiB of float64 ranks
    scored: list[np.ndarray] = []  # per chunk, (resamples,): the mean AUC over seeds
    pending: list[np.ndarray] = []

    def score() -> None:
        part = np.stack(pending)
        scored.append(rank_auc(y[part][:, None, :], probs[:, part].transpose(1, 0, 2)).mean(-1))
        pending.clear()

    for _ in range(n_boot):
        draw = rng.integers(0, len(y), len(y))
        if 0 < y[draw].sum() < len(draw):  # a resample with one class has no AUC: left out
            pending.append(draw)
            if len(pending) == chunk:
                score()
    if pending:
        score()
    if not scored:
        return full, full, full
    boots = np.concatenate(scored)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return full, float(lo), float(hi)


def check_protocols(protocols: Sequence[str], fractions: Sequence[float]) -> None:
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise MeddiffError(f"unknown downstream protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        raise MeddiffError(f"real-data fraction {bad[0]:g} is outside (0, 1); e.g. 0.1,0.25 (100 % is 'real')")


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def downstream(
    real_train: ImageLabelDataset,
    synthetic: ImageLabelDataset,
    test: ImageLabelDataset,
    seeds: int = 3,
    epochs: int = 10,
    progress: bool = False,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
    fractions: Sequence[float] = (),
) -> dict:
    """{set name: {protocol, n_train, seeds, auc, recall, mean_auc}}; set names are the protocols, then for each
    fraction f "real f%" and "real f%+synthetic"."""
    check_protocols(protocols, fractions)
    Trainer = Callable[[int], LabelClassifier]

    def plain(data: ImageLabelDataset) -> Trainer:
        return lambda s: train_classifier(data, epochs=epochs, seed=s)

    def pretrained(s: int) -> LabelClassifier:
        first = train_classifier(synthetic, epochs=epochs, seed=s)
        return train_classifier(real_train, epochs=epochs, seed=s, init=first)

    def reweighted(s: int) -> LabelClassifier:
        return train_classifier(real_train, epochs=epochs, seed=s, pos_weight=label_pos_weight(real_train))

    def training_set(name: str) -> tuple[int, Trainer]:
        if name == "real+synthetic":
            pooled = combine(real_train, synthetic)  # only when asked for: it copies both sets
            return len(pooled), plain(pooled)
        if name == "synthetic":
            return len(synthetic), plain(synthetic)
        return len(real_train), {
            "real": plain(real_train),
            "synthetic->real": pretrained,
            "real-reweighted": reweighted,
        }[name]

    builders: dict[str, tuple[str, int, Trainer]] = {name: (PROTOCOLS[name], *training_set(name)) for name in protocols}
    for fraction in fractions:
        part = real_fraction(real_train, fraction)
        with_syn = combine(part, synthetic)
        builders[f"real {_pct(fraction)}"] = (
            f"a stratified {_pct(fraction)} of the real training split",
            len(part),
            plain(part),
        )
        builders[f"real {_pct(fraction)}+synthetic"] = (
            f"a stratified {_pct(fraction)} of the real training split and the synthetic set pooled",
            len(with_syn),
            plain(with_syn),
        )
    out: dict[str, dict] = {}
    bar = tqdm(total=len(builders) * seeds, desc="downstream classifiers", unit="model", disable=not progress)
    for name, (protocol, n_train, build) in builders.items():
        probs = []
        for s in range(seeds):
            bar.set_postfix(train_set=name, seed=s)
            p = predict(build(s), test.images)
            if not np.isfinite(p).all():  # at once, not after the other seeds and sets have trained
                raise MeddiffError(
                    f"the classifier trained on {name!r} (seed {s}) gave NaN or infinite scores (diverged training?); "
                    "no AUC can be computed"
                )
            probs.append(p)
            bar.update(1)
        out[name] = {"protocol": protocol, "n_train": n_train, "seeds": seeds, **score(probs, test)}
    bar.close()
    return out


def score(probs: list[np.ndarray], test: ImageLabelDataset) -> dict:
    """Per-label AUC with its bootstrap interval, per-label recall at 0.5 (mean over seeds) and the macro AUC."""
    auc: dict[str, dict | None] = {}
    recall: dict[str, float | None] = {}
    for k, label in enumerate(test.label_names):
        mask = test.known[:, k].numpy()
        y = test.labels[mask, k].numpy() > 0.5
        result = bootstrap_auc([p[mask, k] for p in probs], y)
        auc[label] = None if result is None else {"auc": result[0], "ci95": [result[1], result[2]]}
        recall[label] = float(np.mean([(p[mask, k][y] >= 0.5).mean() for p in probs])) if y.any() else None
    values = [v["auc"] for v in auc.values() if v is not None]
    return {"auc": auc, "recall": recall, "mean_auc": float(np.mean(values)) if values else None}
