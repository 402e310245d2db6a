"""Memorization audit: for every synthetic image, its nearest training image by pixel-space normalised
correlation and by domain-feature cosine similarity (features centred on the training mean). A synthetic image is
flagged when it is closer to a training image than `quantile` of genuinely new real (held-out) images are, or above
the fixed thresholds.

A third signal is the kNN distance ratio in domain-feature space: the distance from a synthetic image to its
nearest training image, divided by that training image's distance to its own nearest other training image. A copy
scores ~0; an image that is merely typical lies about as far from its match as training images lie from each
other (~1). Unlike raw similarity, it does not flag images for falling in a dense region (with two classes, many
images have near-identical penultimate features). Flagged below the (1 - quantile) quantile of held-out real
images' ratios."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meddiff.evaluation.results import MemorizationSummary


def _unit(x: np.ndarray, center: bool) -> torch.Tensor:
    t = torch.from_numpy(x.reshape(len(x), -1)).double()
    if center:
        t = t - t.mean(1, keepdim=True)
    return t / t.norm(dim=1, keepdim=True).clamp(min=1e-12)


def nearest(
    queries: np.ndarray, references: np.ndarray, center: bool, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(max similarity, index of the nearest reference) per query; correlation if center else cosine."""
    q, r = _unit(queries, center), _unit(references, center)
    best, where = [], []
    for i in range(0, len(q), chunk):
        s = q[i : i + chunk] @ r.T
        v, j = s.max(1)
        best.append(v.numpy())
        where.append(j.numpy())
    return np.concatenate(best), np.concatenate(where)


def knn_ratio(queries: np.ndarray, references: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest reference / that reference's distance to its nearest other reference, index of the
    nearest reference) per query, Euclidean on flattened rows. Only the matched references' own neighbours are
    computed, so the cost is queries x references, not references squared."""
    q = torch.from_numpy(queries.reshape(len(queries), -1)).double()
    r = torch.from_numpy(references.reshape(len(references), -1)).double()
    dist, where = [], []
    for i in range(0, len(q), chunk):
        d, j = torch.cdist(q[i : i + chunk], r).min(1)
        dist.append(d)
        where.append(j)
    d, j = torch.cat(dist), torch.cat(where)
    matched = torch.unique(j)
    own = torch.cdist(r[matched], r)
    own[torch.arange(len(matched)), matched] = float("inf")  # not itself
    spacing = torch.full((len(r),), float("nan"), dtype=torch.float64)
    spacing[matched] = own.min(1).values.clamp(min=1e-12)
    return (d / spacing[j]).numpy(), j.numpy()


@dataclass
class MemorizationAudit:
    pixel_similarity: np.ndarray  # per synthetic image
    pixel_match: np.ndarray
    feature_similarity: np.ndarray
    feature_match: np.ndarray
    pixel_threshold: float
    feature_threshold: float
    knn_ratio: np.ndarray | None = None  # per synthetic image (domain features); low = suspiciously close
    knn_ratio_threshold: float = 0.0

    @property
    def flagged_knn(self) -> np.ndarray:
        if self.knn_ratio is None:
            return np.zeros(len(self.pixel_similarity), dtype=bool)
        return self.knn_ratio < self.knn_ratio_threshold

    @property
    def flagged(self) -> np.ndarray:
        return (
            (self.pixel_similarity > self.pixel_threshold)
            | (self.feature_similarity > self.feature_threshold)
            | self.flagged_knn
        )

    def top(self, n: int = 8) -> list[int]:
        return list(np.argsort(-self.pixel_similarity)[:n])

    def summary(self) -> MemorizationSummary:
        return MemorizationSummary(
            pixel_threshold=self.pixel_threshold,
            feature_threshold=self.feature_threshold,
            rate_pixel=float((self.pixel_similarity > self.pixel_threshold).mean()),
            rate_feature=float((self.feature_similarity > self.feature_threshold).mean()),
            rate_knn_ratio=float(self.flagged_knn.mean()),
            knn_ratio_threshold=self.knn_ratio_threshold,
            median_knn_ratio=None if self.knn_ratio is None else float(np.median(self.knn_ratio)),
            rate_flagged=float(self.flagged.mean()),
            max_pixel_similarity=float(self.pixel_similarity.max()),
            median_pixel_similarity=float(np.median(self.pixel_similarity)),
            rate_pixel_above_095=float((self.pixel_similarity > 0.95).mean()),
            rate_pixel_above_099=float((self.pixel_similarity > 0.99).mean()),
        )

    def to_dict(self) -> dict:
        return self.summary().to_dict()


def audit(
    synthetic: np.ndarray,
    train: np.ndarray,
    synthetic_features: np.ndarray,
    train_features: np.ndarray,
    heldout: np.ndarray | None = None,
    heldout_features: np.ndarray | None = None,
    quantile: float = 0.99,
) -> MemorizationAudit:
    """Images as (N, H, W) arrays; thresholds from held-out real images when given (else 0.95 / 0.99)."""
    ps, pm = nearest(synthetic, train, center=True)
    # features are centred on the training mean first: raw penultimate features share a large common component
    # (cosine ~1 for everything), the centred ones measure how specific a match is
    mean = train_features.mean(0, keepdims=True)
    train_features, synthetic_features = train_features - mean, synthetic_features - mean
    if heldout_features is not None:
        heldout_features = heldout_features - mean
    fs, fm = nearest(synthetic_features, train_features, center=False)
    ratio, _ = knn_ratio(synthetic_features, train_features)
    pt, ft, rt = 0.95, 0.99, 0.1  # without held-out images: fixed thresholds (a ratio of 0.1 is a near-copy)
    if heldout is not None and heldout_features is not None and len(heldout):
        pt = float(np.quantile(nearest(heldout, train, center=True)[0], quantile))
        ft = float(np.quantile(nearest(heldout_features, train_features, center=False)[0], quantile))
        rt = float(np.quantile(knn_ratio(heldout_features, train_features)[0], 1 - quantile))
    return MemorizationAudit(ps, pm, fs, fm, pt, ft, ratio, rt)
