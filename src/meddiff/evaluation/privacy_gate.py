"""A calibrated near-copy detector: several similarity tests fused so that the *combined* false-flag rate on new
real images is the controlled quantity, with its recall measured on known copies of training images.

Detectors (each: higher = closer to some training image):
- pixel: the largest normalised correlation with a training image (mean-centred pixels);
- tiles: the same, on the 2 x 2 tiles of the image, the smallest of the four tile correlations with the best whole-
  image match's tiles (a copy matches everywhere; an image that merely shares the overall layout does not);
- aligned: the nearest candidates (top `candidates` by pixel correlation) re-scored under small shifts and zooms
  of the query (a bank of resampled versions): shifted or cropped copies line up again;
- coarse: the pixel correlation after 2 x 2 average pooling (pixel noise averages out: noisy copies);
- feature: the largest cosine similarity of features (the domain classifier's penultimate layer when given);
- descriptor: the largest cosine similarity under a copy descriptor learned on the training images themselves
  (meddiff.evaluation.copy_descriptor: invariant to re-acquisition, discriminative between images); its nearest
  training images are also candidates of the aligned detector.

Fusion: each score is standardised by the calibration negatives' median and spread (real held-out images the model
never saw, which are by construction not copies), the fused score is the largest standardised score, and the
threshold is the (1 - alpha) quantile of the calibration negatives' fused scores. The false-flag rate is then
measured on a separate test half of the held-out images, and recall on known positives built from reserved training
images: exact copies, augmented copies (shift, rotation, gamma, noise, crop), and with a model the copies it makes
itself (a training image noised to t and denoised by the model; the autoencoder round trip of latent models).
Held-out images that duplicate a training image (a leak between the data's splits) are reported and left out of
the negatives.

Images are (N, H, W) float arrays in [0, 1]. Nearest-neighbour search is blocked matrix products over the training
set (memory ~ block x N_train)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.errors import MeddiffError
from meddiff.evaluation.copy_descriptor import (
    WEIGHTS_FILE,
    CopyDescriptorNet,
    DescriptorSettings,
    embed,
    save_descriptor,
    train_descriptor,
)
from meddiff.models.privacy_records import CALIBRATION_FILE, PRIVACY_DIR, stored_calibration

logger = logging.getLogger(__name__)
COPY_TYPES = ("exact", "shift", "rotation", "gamma", "noise", "crop")
DETECTORS = ("pixel", "tiles", "aligned", "coarse", "feature", "descriptor", "reid")
LEARNED_FUSION_NEGATIVES = 4  # x 1/alpha calibration images to learn the fusion (half fit it, half threshold it)
REID_FILE = "reid.safetensors"  # the re-identification network, next to the copy descriptor (private)
# how far the nearest training image stands out from the next nearest ones (a model's redrawing of one training image
# has one clearly nearest neighbour, a new patient several about as near): features of the learned fusion only
MARGINS = ("pixel_margin", "pixel_z", "descriptor_gap", "descriptor_margin", "descriptor_z")
DUPLICATE_CORRELATION = 0.999  # a held-out image this close to a training image is the same image (a split leak)


def _margins(name: str, nearest: torch.Tensor) -> dict[str, np.ndarray]:
    """From the similarities of the k nearest training images (descending, k >= 3): the nearest's lead over the
    second (gap), over the mean of the others (margin), and that lead in units of the others' spread (z)."""
    if nearest.shape[1] < 3:
        return {}
    first, rest = nearest[:, 0], nearest[:, 1:]
    lead = first - rest.mean(1)
    return {
        f"{name}_gap": (first - nearest[:, 1]).numpy(),
        f"{name}_margin": lead.numpy(),
        f"{name}_z": (lead / (rest.std(1) + 1e-6)).numpy(),
    }


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp(min=1e-8)


def _unit(x: np.ndarray) -> torch.Tensor:
    """Flattened, mean-centred, unit-length rows: dot products are correlations."""
    t = torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), -1))).float()
    return _normalise(t - t.mean(1, keepdim=True))


def _coarse(x: np.ndarray) -> np.ndarray:
    """2 x 2 average pooling: pixel noise averages out, anatomy stays (noisy copies line up again)."""
    return F.avg_pool2d(torch.from_numpy(np.ascontiguousarray(x)).float().unsqueeze(1), 2)[:, 0].numpy()


def _tiles(x: np.ndarray) -> list[np.ndarray]:
    h, w = x.shape[1] // 2, x.shape[2] // 2
    return [x[:, i * h : (i + 1) * h, j * w : (j + 1) * w] for i in (0, 1) for j in (0, 1)]


def alignment_bank(
    images: np.ndarray, max_shift: float = 0.125, zooms=(1.0, 1.05, 1.1, 1.15), angles=(-3.0, 0.0, 3.0)
) -> torch.Tensor:
    """(N, T, H*W) unit-normalised resampled versions of each image: shifts up to `max_shift` of the half-width
    (in steps of about a pixel) at each zoom-out factor and small rotation (degrees); grid_sample with border
    padding (no wrap-around)."""
    x = torch.from_numpy(images).float().unsqueeze(1)
    n, size = len(images), images.shape[-1]
    steps = max(1, round(max_shift * size / 2)) if max_shift > 0 else 0
    offsets = [k * 2.0 / size for k in range(-steps, steps + 1)]
    versions = []
    for angle in angles:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        for zoom in zooms:
            for dy in offsets:
                for dx in offsets:
                    if angle and (dx or dy):  # rotations only about the centre: the bank stays small
                        continue
                    theta = torch.tensor([[zoom * c, -zoom * s, dx], [zoom * s, zoom * c, dy]]).expand(n, 2, 3)
                    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
                    versions.append(F.grid_sample(x, grid, padding_mode="border", align_corners=False).flatten(1))
    bank = torch.stack(versions, 1)
    bank = bank - bank.mean(2, keepdim=True)
    return bank / bank.norm(dim=2, keepdim=True).clamp(min=1e-8)


@dataclass
class ReferenceIndex:
    """The training images (and optional features) queries are compared with. Derived from patient data: keep it
    out of anything shared (never inside pipeline/ or a model card)."""

    images: np.ndarray  # (N, H, W) in [0, 1]
    features: np.ndarray | None = None  # (N, D)
    descriptor: CopyDescriptorNet | None = None  # a learned copy descriptor (meddiff.evaluation.copy_descriptor)
    reid: CopyDescriptorNet | None = None  # a re-identification network (meddiff.evaluation.reidentification)
    block: int = 1024
    candidates: int = 8  # nearest training images re-scored by the aligned detector
    _pixels: torch.Tensor = field(init=False, repr=False)
    _tiles: list[torch.Tensor] = field(init=False, repr=False)
    _coarse: torch.Tensor = field(init=False, repr=False)
    _features: torch.Tensor | None = field(init=False, repr=False)
    _feature_mean: torch.Tensor | None = field(init=False, repr=False)
    _descriptors: torch.Tensor | None = field(init=False, repr=False)
    _reid: torch.Tensor | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or not len(self.images):
            raise MeddiffError("the reference set must be a non-empty stack of 2D images")
        self._pixels = _unit(self.images)
        self._tiles = [_unit(t) for t in _tiles(self.images)]
        self._coarse = _unit(_coarse(self.images))
        self._features = self._feature_mean = None
        if self.features is not None:
            f = torch.from_numpy(self.features).float()
            self._feature_mean = f.mean(0, keepdim=True)
            self._features = _normalise(f - self._feature_mean)
        self._descriptors = None
        if self.descriptor is not None:
            self._descriptors = torch.from_numpy(embed(self.descriptor, self.images))
        self._reid = torch.from_numpy(embed(self.reid, self.images)) if self.reid is not None else None

    def duplicates(self, images: np.ndarray, correlation: float = DUPLICATE_CORRELATION) -> np.ndarray:
        """Which images are (near-)exact duplicates of a training image (pixel correlation >= `correlation`): a
        held-out image that duplicates a training image is a leak between the splits, not a negative."""
        return self._nearest(_unit(images), self._pixels)[0][:, 0].numpy() >= correlation

    def _nearest(self, q: torch.Tensor, reference: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(similarities, indices) of the k most similar references per query, in blocks of queries."""
        parts = [(q[i : i + self.block] @ reference.T).topk(k, dim=1) for i in range(0, len(q), self.block)]
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])

    def scores(self, queries: np.ndarray, features: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{detector: (N,) score} and 'match' (index of the nearest training image by pixels)."""
        if queries.shape[1:] != self.images.shape[1:]:
            raise MeddiffError(
                f"images are {queries.shape[1]}x{queries.shape[2]} but the reference set is "
                f"{self.images.shape[1]}x{self.images.shape[2]}; compare at one resolution"
            )
        q = _unit(queries)
        k = min(self.candidates, len(self._pixels))
        similarity, top = self._nearest(q, self._pixels, k)
        match = top[:, 0]
        out: dict[str, np.ndarray] = {}
        if self.descriptor is not None and self._descriptors is not None:
            # the descriptor also proposes candidates: a moved copy's original is often not among the nearest by
            # pixels, but it is by descriptor, and the aligned detector then lines it up again
            d = torch.from_numpy(embed(self.descriptor, queries))
            nearest, by_descriptor = self._nearest(d, self._descriptors, k)
            out["descriptor"] = nearest[:, 0].numpy()
            out.update(_margins("descriptor", nearest))
            top = torch.cat([top, by_descriptor], 1)
        if self.reid is not None and self._reid is not None:  # the most similar training patient's image
            out["reid"] = self._nearest(torch.from_numpy(embed(self.reid, queries)), self._reid)[0][:, 0].numpy()
        qt = [_unit(t) for t in _tiles(queries)]
        tiles = torch.stack([(qt[k] * self._tiles[k][match]).sum(1) for k in range(4)], 1).min(1).values
        out.update(pixel=similarity[:, 0].numpy(), tiles=tiles.numpy(), aligned=self._aligned(queries, q, top))
        out.update(_margins("pixel", similarity))
        out["coarse"] = self._nearest(_unit(_coarse(queries)), self._coarse)[0][:, 0].numpy()
        if self._features is not None and self._feature_mean is not None:
            if features is None:
                raise MeddiffError("the reference set has features: give the queries' features too")
            f = _normalise(torch.from_numpy(features).float() - self._feature_mean)
            out["feature"] = self._nearest(f, self._features)[0][:, 0].numpy()
        out["match"] = match.numpy()
        return out

    def _aligned_block(self, queries: np.ndarray, q: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """The best correlation of the query's shifted / zoomed / rotated versions with its `top` candidates, and
        of the query with the candidates zoomed in (a cropped copy)."""
        bank = alignment_bank(queries)  # (B, T, P)
        candidates = self._pixels[top]  # (B, k, P)
        aligned = torch.einsum("btp,bkp->btk", bank, candidates).flatten(1).max(1).values
        # a cropped copy is a zoomed-in original: zoom the candidates in (their full content, no padded border)
        b, k, size = len(queries), top.shape[1], self.images.shape[-1]
        originals = self.images[top.flatten().numpy()]  # (B*k, H, W)
        zoomed = alignment_bank(originals, max_shift=0.0, zooms=(0.86, 0.9, 0.94), angles=(0.0,))
        zoomed = zoomed.view(b, k * zoomed.shape[1], size * size)
        cropped = torch.einsum("bp,bzp->bz", q, zoomed).max(1).values
        return torch.maximum(aligned, cropped)

    def _aligned(self, queries: np.ndarray, q: torch.Tensor, top: torch.Tensor) -> np.ndarray:
        step = max(1, self.block // 16)  # the bank is ~75 versions per query
        return torch.cat(
            [
                self._aligned_block(queries[i : i + step], q[i : i + step], top[i : i + step])
                for i in range(0, len(q), step)
            ]
        ).numpy()


def augmented_copies(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Known positives: copies of `images` ((N, H, W) in [0, 1]) changed as acquisition would change them."""
    if kind not in COPY_TYPES:
        raise MeddiffError(f"unknown copy type {kind!r}; choose from {', '.join(COPY_TYPES)}")
    rng = np.random.default_rng([seed, COPY_TYPES.index(kind)])
    x = torch.from_numpy(images).float().unsqueeze(1)
    n, size = len(images), images.shape[-1]
    if kind == "exact":
        out = x
    elif kind in ("shift", "rotation", "crop"):
        angle, scale, shift = torch.zeros(n), torch.ones(n), torch.zeros(n, 2)
        if kind == "shift":  # whole pixels, up to 1/16 of the size, edges repeated (as a repositioned patient)
            d = max(1, size // 16)
            shift = torch.from_numpy(rng.integers(-d, d + 1, size=(n, 2)) * 2.0 / size).float()
        elif kind == "rotation":
            angle = torch.from_numpy(rng.uniform(-5, 5, n) * math.pi / 180).float()
        else:  # crop 5-12 % and resize back
            scale = torch.from_numpy(rng.uniform(0.88, 0.95, n)).float()
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    elif kind == "gamma":
        out = x.clamp(1e-6, 1) ** torch.from_numpy(rng.uniform(0.8, 1.25, (n, 1, 1, 1))).float()
    else:  # noise
        out = (x + torch.from_numpy(rng.normal(0, 0.03, x.shape)).float()).clamp(0, 1)
    return out[:, 0].numpy()


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Calibration:
    """What the gate needs (no images): per score the calibration negatives' median and spread (scaled median
    absolute deviation), the fusion (the largest standardised detector score, or learned non-negative weights over
    the standardised detector and margin scores) and the threshold on the fused score."""

    alpha: float
    detectors: list[str]
    centre: dict[str, float]  # median score of the calibration negatives
    spread: dict[str, float]  # 1.4826 x their median absolute deviation
    threshold: float  # on the fused score
    n_calibration: int  # the negatives the threshold was read from
    weights: dict[str, float] | None = None  # learned fusion (fit_fusion); None: the largest standardised score
    bias: float = 0.0
    combined_centre: float = 0.0  # (combination - centre) / spread: on the largest detector score's scale
    combined_spread: float = 1.0
    n_fit: dict[str, int] | None = None  # learned fusion: negatives and known copies it was fitted on

    def standardised(self, scores: dict[str, np.ndarray], name: str) -> np.ndarray:
        return (scores[name] - self.centre[name]) / self.spread[name]

    def largest(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The largest standardised detector score."""
        return np.max([self.standardised(scores, d) for d in self.detectors], axis=0)

    def combined(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The learned combination: the weighted sum of the standardised scores (the log-odds of "copy")."""
        assert self.weights is not None
        terms = [w * self.standardised(scores, d) for d, w in self.weights.items()]
        return self.bias + np.sum(terms, axis=0) if terms else np.full(len(scores["pixel"]), self.bias)

    def fused(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The largest standardised score over the detectors, (score - median) / spread, and with a learned fusion
        over them and the learned combination (on the same scale): a copy that one detector sees plainly
        stays flagged, and one that several see a little is flagged by the combination. Unbounded above and never
        decreasing when any score rises, so a copy beyond every negative keeps its distance."""
        largest = self.largest(scores)
        if self.weights is None:
            return largest
        combined = (self.combined(scores) - self.combined_centre) / self.combined_spread
        return np.maximum(largest, combined)

    def flags(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return self.fused(scores) > self.threshold

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "detectors": self.detectors,
            "centre": self.centre,
            "spread": self.spread,
            "threshold": self.threshold,
            "n_calibration": self.n_calibration,
            "fusion": "learned" if self.weights is not None else "max",
            "weights": self.weights,
            "bias": self.bias,
            "combined_centre": self.combined_centre,
            "combined_spread": self.combined_spread,
            "n_fit": self.n_fit,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(
            float(d["alpha"]),
            list(d["detectors"]),
            {k: float(v) for k, v in d["centre"].items()},
            {k: float(v) for k, v in d["spread"].items()},
            float(d["threshold"]),
            int(d["n_calibration"]),
            {k: float(v) for k, v in d["weights"].items()} if d.get("weights") else None,
            float(d.get("bias", 0.0)),
            float(d.get("combined_centre", 0.0)),
            float(d.get("combined_spread", 1.0)),
            d.get("n_fit"),
        )


def calibrate(
    index: ReferenceIndex,
    negatives: np.ndarray,
    alpha: float = 0.01,
    features: np.ndarray | None = None,
    positives: dict[str, np.ndarray] | None = None,
    positive_features: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    fusion: Calibration | None = None,
) -> Calibration:
    """Threshold the fused score at the (1 - alpha) quantile of `negatives` (real images that are not in the
    reference set: the calibration half of a patient-disjoint held-out split), so that the combined false-flag rate
    of new images is alpha.

    With `positives` (known copies of training images, {type: (N, H, W)}; never the ones recall is measured on) and
    at least LEARNED_FUSION_NEGATIVES / alpha negatives (so that the threshold half still holds 2 / alpha: a
    threshold read from fewer sits too high and costs recall), the fusion also learns a combination: non-negative
    logistic weights over the standardised detector and margin scores, fitted on half of the negatives against the
    positives (each copy type weighing the same). The fused score is then the largest of the standardised detector
    scores and the combination (on their scale), and the threshold is read from the other half (a fitted score is
    optimistic on the negatives it saw). Otherwise the fused score is the largest standardised detector score.
    `fusion`: take the learned weights of that calibration instead of fitting (the same reference set grown by
    images held back while measuring)."""
    if not 0 < alpha < 0.5:
        raise MeddiffError(f"alpha must be in (0, 0.5), got {alpha:g}")
    if len(negatives) < math.ceil(1 / alpha):
        raise MeddiffError(f"{len(negatives)} calibration images cannot resolve alpha {alpha:g}; give more")
    scores = index.scores(negatives, features)
    detectors: list[str] = [d for d in DETECTORS if d in scores]
    names = detectors + [m for m in MARGINS if m in scores]
    learned = fusion is not None and fusion.weights is not None
    learn = (bool(positives) or learned) and fusion_learnable(len(negatives), alpha)
    fit = rows = np.arange(len(negatives))
    if learn:  # standardised and fitted on one half, thresholded on the other
        order = np.random.default_rng([seed, 29]).permutation(len(negatives))
        fit, rows = order[: len(order) // 2], order[len(order) // 2 :]
    centre = {d: float(np.median(scores[d][fit])) for d in names}
    # a stable scale (median absolute deviation): only the threshold below is a tail estimate
    spread = {d: _mad(scores[d][fit], centre[d]) for d in names}
    calibration = Calibration(alpha, detectors, centre, spread, 0.0, len(rows))
    if learn:
        if fusion is not None and fusion.weights is not None:  # the weights of an earlier fit, re-standardised here
            calibration.weights, calibration.bias, calibration.n_fit = dict(fusion.weights), fusion.bias, fusion.n_fit
        else:
            known = [index.scores(x, (positive_features or {}).get(kind)) for kind, x in (positives or {}).items()]
            x_neg = np.stack([calibration.standardised(scores, d)[fit] for d in names], 1)
            x_pos = [np.stack([calibration.standardised(k, d) for d in names], 1) for k in known]
            weights, calibration.bias = fit_fusion(x_neg, x_pos)
            kept = {d: float(w) for d, w in zip(names, weights) if w > 0}
            calibration.weights = kept or None  # all zero: the largest standardised score alone
            calibration.n_fit = {"negatives": len(fit), "copies": sum(len(x) for x in x_pos)} if kept else None
        if calibration.weights is not None:
            # put the combination on the largest detector score's scale: the same median and the same upper
            # quantile on the fit half, so that neither term of the fused maximum dominates its tail
            on_fit = {k: v[fit] for k, v in scores.items()}
            combined, largest = calibration.combined(on_fit), calibration.largest(on_fit)
            level = max(0.5, 1 - 5 * alpha)
            c_mid, c_top = float(np.median(combined)), float(np.quantile(combined, level))
            l_mid, l_top = float(np.median(largest)), float(np.quantile(largest, level))
            scale = (c_top - c_mid) / (l_top - l_mid) if c_top > c_mid and l_top > l_mid else 1.0
            calibration.combined_spread = scale
            calibration.combined_centre = c_mid - l_mid * scale
    fused = calibration.fused({k: v[rows] for k, v in scores.items()})
    calibration.threshold = float(np.quantile(fused, 1 - alpha, method="higher"))
    return calibration


def fusion_learnable(n_negatives: int, alpha: float) -> bool:
    """Whether `n_negatives` calibration images are enough to learn the fusion at alpha (LEARNED_FUSION_NEGATIVES /
    alpha); says so when they are not."""
    need = math.ceil(LEARNED_FUSION_NEGATIVES / alpha)
    if n_negatives < need:
        logger.warning(
            "privacy calibrate: %d calibration images are too few to learn the fusion at alpha %g (needs %d); the "
            "largest standardised score is used", n_negatives, alpha, need,
        )  # fmt: skip
    return n_negatives >= need


def _mad(values: np.ndarray, centre: float) -> float:
    return max(1.4826 * float(np.median(np.abs(values - centre))), 1e-6)


def fit_fusion(
    negatives: np.ndarray, positives: np.ndarray | list[np.ndarray], l2: float = 1e-2
) -> tuple[np.ndarray, float]:
    """Class-balanced logistic regression with non-negative weights (a copy that is more similar by every score never
    scores lower) on (N, F) standardised scores: (weights, bias). `positives` may be a list of groups (copy types),
    each then weighs the same, however many copies it has."""
    from scipy.optimize import minimize
    from scipy.special import expit

    groups = [positives] if isinstance(positives, np.ndarray) else [g for g in positives if len(g)]
    x = np.concatenate([negatives, *groups]).astype(np.float64)
    y = np.r_[np.zeros(len(negatives)), np.ones(sum(len(g) for g in groups))]
    share = np.concatenate(
        [np.full(len(negatives), 0.5 / len(negatives)), *(np.full(len(g), 0.5 / len(groups) / len(g)) for g in groups)]
    )
    f = x.shape[1]

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:f], params[f]
        z = x @ w + b
        residual = share * (expit(z) - y)
        value = float(np.sum(share * (np.logaddexp(0, z) - y * z)) + l2 * w @ w)
        return value, np.r_[x.T @ residual + 2 * l2 * w, residual.sum()]

    bounds = [(0.0, None)] * f + [(None, None)]
    result = minimize(loss, np.zeros(f + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return result.x[:f], float(result.x[f])


@dataclass
class GateReport:
    alpha: float
    false_flag_rate: float  # on the test negatives
    false_flag_interval: tuple[float, float]
    n_test_negatives: int
    recall: dict[str, float]
    recall_interval: dict[str, tuple[float, float]]
    n_positives: dict[str, int]

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "false_flag_rate": self.false_flag_rate,
            "false_flag_interval": list(self.false_flag_interval),
            "n_test_negatives": self.n_test_negatives,
            "recall": self.recall,
            "recall_interval": {k: list(v) for k, v in self.recall_interval.items()},
            "n_positives": self.n_positives,
        }


def measure(
    calibration: Calibration,
    index: ReferenceIndex,
    test_negatives: np.ndarray,
    positives: dict[str, np.ndarray],
    negative_features: np.ndarray | None = None,
    positive_features: dict[str, np.ndarray] | None = None,
) -> GateReport:
    """False-flag rate on test negatives and recall per copy type, each with a 95 % Wilson interval."""
    flagged = calibration.flags(index.scores(test_negatives, negative_features))
    recall, interval, counts = {}, {}, {}
    for kind, images in positives.items():
        hits = calibration.flags(index.scores(images, (positive_features or {}).get(kind)))
        recall[kind] = float(hits.mean())
        interval[kind] = wilson_interval(int(hits.sum()), len(hits))
        counts[kind] = len(hits)
    return GateReport(
        calibration.alpha,
        float(flagged.mean()),
        wilson_interval(int(flagged.sum()), len(flagged)),
        len(flagged),
        recall,
        interval,
        counts,
    )


# ------------------------------------------------------------------------------------ stored with a model, export gate


def split_parts(patients: list[str], n: int, seed: int = 0, fraction: float = 0.5) -> tuple[np.ndarray, str]:
    """(mask of the first part, how it was split): a random `fraction` (rounded down) of the patients where ids
    exist (no patient in both parts; the calibration half of the gate), else of the n images."""
    rng = np.random.default_rng(seed)
    if patients and len(set(patients)) >= 2:
        ids = sorted(set(patients))
        chosen = set(rng.permutation(len(ids))[: int(fraction * len(ids))].tolist())
        lookup = {p: k in chosen for k, p in enumerate(ids)}
        return np.array([lookup[p] for p in patients]), f"by patient ({len(ids)} patients)"
    first = np.zeros(n, bool)
    first[rng.permutation(n)[: int(fraction * n)]] = True
    return first, "by image (the data carry no patient ids)"


MODEL_STRENGTHS = (0.1, 0.3, 0.5)  # model-made near-copies: noised this far into the schedule, then denoised


def model_copies(
    pipe,
    guidance: float,
    images: np.ndarray,
    conditions: torch.Tensor | None,
    strengths: tuple[float, ...] = MODEL_STRENGTHS,
    seed: int = 0,
    steps: int = 20,
    autoencoder: bool = True,
) -> dict[str, np.ndarray]:
    """Known positives the audited model makes itself: each training image noised to t = strength of the schedule
    and denoised by the model (`pipe`, loaded once by the caller) with its own conditions (DPM-Solver++, `steps`
    spacing, the run's `guidance`), plus the autoencoder round trip for latent models. {copy type: (N, H, W) in
    [0, 1]}."""
    from meddiff.sampling.generate import SamplingSettings, sample

    if conditions is None or not pipe.supports_labels:
        conditions = torch.zeros(len(images), 2 * len(pipe.label_names))
    settings = SamplingSettings(steps=steps, guidance=guidance, seed=seed, batch_size=64)
    out = {}
    for strength in strengths:
        out[f"model t={strength:g}"] = sample(
            pipe, conditions, settings, progress=False, init_images=images, strength=strength
        )
    if pipe.is_latent and autoencoder:
        with torch.no_grad():
            parts = []
            for i in range(0, len(images), 64):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + 64])).float().unsqueeze(1)
                decoded = pipe.decode_latents(pipe.encode_images(x)).float() / 2 + 0.5
                parts.append(decoded.clamp(0, 1)[:, 0].cpu().numpy())
        out["autoencoder"] = np.concatenate(parts)
    return out


VIEW_STRENGTHS = (0.1, 0.2, 0.3, 0.4)  # model-made near-copies the descriptor learns to match (issue: up to t = 0.3)


def model_partners(
    pipe,
    guidance: float,
    train: np.ndarray,
    conditions: Callable[[np.ndarray], torch.Tensor | None] | None,
    limit: int,
    seed: int,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """A partner for each training image: for up to `limit` of them (at random, never one in `exclude`: the sources
    of the measured near-copies, so that their recall is out of sample) the model's near-copy at a strength from
    VIEW_STRENGTHS (in turn), for the rest the image itself."""
    rng = np.random.default_rng([seed, 17])
    allowed = np.setdiff1d(np.arange(len(train)), exclude if exclude is not None else [])
    chosen = np.sort(rng.choice(allowed, min(limit, len(allowed)), replace=False))
    partners = train.copy()
    logger.info(
        "privacy calibrate: the model's near-copies of %d training images (t = %s) for the copy descriptor",
        len(chosen), ", ".join(f"{s:g}" for s in VIEW_STRENGTHS),
    )  # fmt: skip
    for k, strength in enumerate(VIEW_STRENGTHS):
        group = chosen[k :: len(VIEW_STRENGTHS)]
        if len(group):
            cond = conditions(group) if conditions else None
            made = model_copies(pipe, guidance, train[group], cond, (strength,), seed, autoencoder=False)
            partners[group] = made[f"model t={strength:g}"]
    return partners


@dataclass
class DetectorAudit:
    """A detector built for one training set, calibrated and measured (audit_detector)."""

    calibration: Calibration
    report: GateReport
    index: ReferenceIndex
    halves: str
    heldout_duplicates: int
    descriptor_settings: DescriptorSettings | None
    seconds: dict[str, float]
    reid: CopyDescriptorNet | None = None  # the re-identification detector's network (train_patients given)


def audit_detector(
    train: np.ndarray,
    held: np.ndarray,
    patients: list[str] | None = None,
    alpha: float = 0.01,
    positives: int = 500,
    seed: int = 0,
    descriptor_steps: int = 600,
    model_dir: str | Path | None = None,
    conditions: Callable[[np.ndarray], torch.Tensor | None] | None = None,
    model_strengths: tuple[float, ...] = MODEL_STRENGTHS,
    progress: bool = False,
    model_views: int = 4096,
    fusion_sources: int = 250,
    train_patients: list[str] | None = None,
) -> DetectorAudit:
    """Build the detector for `train` ((N, H, W) in [0, 1]): the copy descriptor (`descriptor_steps` > 0), the
    reference index, the threshold from one half of `held` (by patient where `patients` are given) and the false-flag
    rate on the other half, with held-out duplicates of training images left out; recall on `positives` known
    copies of each type (augmented copies; with `model_dir` the model's own near-copies at `model_strengths`, their
    conditions from `conditions(chosen training indices)`, and the autoencoder round trip of latent models). With a
    model, the descriptor also learns that the model's own near-copies of up to `model_views` training images (t in
    VIEW_STRENGTHS, other seeds than the measured ones) are the same image. The fusion is learned (calibrate) from
    known copies of `fusion_sources` further training images (0: no learned fusion): neither the measured sources nor
    the descriptor's partners, so that the measured recall stays out of sample.

    With `train_patients` (a patient id per training image) where patients have several images, a re-identification
    network trained on them is a detector too (`reid`: the nearest training image under it). To measure it, one
    study of each of up to 2 x `positives` repeat patients is held back from the reference set (held_back_studies):
    half of them fit the fusion, half are the "same patient" positives (another study of a patient the reference
    set holds)."""
    clock, seconds = time.perf_counter(), {}
    rng = np.random.default_rng(seed)
    studies: dict[str, np.ndarray] = {}
    full_train = train
    if train_patients is not None and descriptor_steps > 0:
        from meddiff.evaluation.reidentification import repeat_patients

        back = held_back_studies(train_patients, 2 * positives, seed)
        keep = np.setdiff1d(np.arange(len(train)), back)
        # the reference set is the rest (indices below are into it), where a re-ID network can still be trained
        if len(back) >= 4 and repeat_patients([train_patients[i] for i in keep]).sum() >= 4:
            studies = {"fit": train[back[: len(back) // 2]], "measure": train[back[len(back) // 2 :]]}
            train, train_patients = train[keep], [train_patients[i] for i in keep]
            if conditions is not None:
                conditions = _reindexed(conditions, keep)
            logger.info(
                "privacy calibrate: one study each of %d repeat patients held back as same-patient positives",
                len(back),
            )  # fmt: skip
    first, halves = split_parts(list(patients or []), len(held), seed)
    logger.info(
        "privacy calibrate: %d training images; %d held-out images split into calibration and test halves (%s)",
        len(train), len(held), halves,
    )  # fmt: skip
    chosen = rng.choice(len(train), min(positives, len(train)), replace=False)  # the sources of the known copies
    rest = np.setdiff1d(np.arange(len(train)), chosen)
    fusion_pool = rng.choice(rest, min(fusion_sources, len(rest)), replace=False)  # the learned fusion's copies
    pipe, guidance = None, 0.0
    if model_dir is not None:  # loaded once for all the model's near-copies
        from meddiff.models.storage import load_pipeline, model_guidance, run_directory

        pipe, guidance = load_pipeline(model_dir), model_guidance(run_directory(model_dir))
    descriptor, settings = None, None
    if descriptor_steps > 0:
        partners = None
        if pipe is not None and model_views:
            t = time.perf_counter()
            partners = model_partners(
                pipe, guidance, train, conditions, model_views, seed + 1, exclude=np.r_[chosen, fusion_pool]
            )
            seconds["model views"] = time.perf_counter() - t
        settings = DescriptorSettings(steps=descriptor_steps, seed=seed)
        logger.info("privacy calibrate: training the copy descriptor (%d steps)", descriptor_steps)
        t = time.perf_counter()
        descriptor = train_descriptor(train, settings, progress=progress, partners=partners)
        seconds["descriptor"] = time.perf_counter() - t
    reid = None
    if studies and train_patients is not None:
        from meddiff.evaluation.reidentification import train_reid

        logger.info("privacy calibrate: training the re-identification network (%d steps)", descriptor_steps)
        t = time.perf_counter()
        reid = train_reid(train, train_patients, DescriptorSettings(steps=descriptor_steps, seed=seed), progress)
        seconds["reid"] = time.perf_counter() - t
    index = ReferenceIndex(train, descriptor=descriptor, reid=reid)
    # the gate that runs holds every training image (the held-back studies too)
    full_index = ReferenceIndex(full_train, descriptor=descriptor, reid=reid) if studies else index
    leaked = full_index.duplicates(held)
    if leaked.any():  # the same image on both sides of the split: not a negative; reported
        logger.warning(
            "privacy calibrate: %d held-out image(s) duplicate a training image (pixel correlation >= %g); they are "
            "left out of the negatives (a leak between the data's splits)", int(leaked.sum()), DUPLICATE_CORRELATION,
        )  # fmt: skip
    cal, test = held[first & ~leaked], held[~first & ~leaked]
    fusion_copies = None
    if len(fusion_pool) and fusion_learnable(len(cal), alpha):  # copies only where calibrate can learn from them
        t = time.perf_counter()
        fusion_copies = known_copies_of(train, fusion_pool, seed + 101, pipe, guidance, conditions, model_strengths)
        seconds["fusion copies"] = time.perf_counter() - t
        if reid is not None:
            fusion_copies["same patient"] = studies["fit"]
    calibration = calibrate(index, cal, alpha, positives=fusion_copies, seed=seed)
    if pipe is not None and model_strengths:
        logger.info(
            "privacy calibrate: model-made near-copies of %d training images at t = %s",
            len(chosen), ", ".join(f"{s:g}" for s in model_strengths),
        )  # fmt: skip
    t = time.perf_counter()
    known_copies = known_copies_of(train, chosen, seed, pipe, guidance, conditions, model_strengths)
    seconds["known copies"] = time.perf_counter() - t
    if reid is not None:
        known_copies["same patient"] = studies["measure"]
    logger.info("privacy calibrate: %d known copies of each type: %s", len(chosen), ", ".join(known_copies))
    report = measure(calibration, index, test, known_copies)
    if studies:  # standardise and threshold again on every training image, with the weights learned above
        index = full_index
        calibration = calibrate(index, cal, alpha, seed=seed, fusion=calibration)
        full = measure(calibration, index, test, {})
        report.false_flag_rate, report.false_flag_interval = full.false_flag_rate, full.false_flag_interval
    seconds["total"] = time.perf_counter() - clock
    return DetectorAudit(calibration, report, index, halves, int(leaked.sum()), settings, seconds, reid)


def held_back_studies(patients: list[str], limit: int, seed: int = 0) -> np.ndarray:
    """Rows of one random study each of up to `limit` random patients with two or more (the others stay)."""
    rng = np.random.default_rng([seed, 31])
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        rows.setdefault(str(p), []).append(i)
    repeat = sorted(p for p, r in rows.items() if len(r) >= 2)
    picked = rng.permutation(len(repeat))[:limit]
    return np.array([rows[repeat[k]][rng.integers(len(rows[repeat[k]]))] for k in picked], dtype=int)


def _reindexed(conditions: Callable[[np.ndarray], torch.Tensor | None], keep: np.ndarray):
    """conditions(rows of the full training set) -> the same for rows of the subset `keep`."""
    return lambda rows: conditions(keep[np.asarray(rows)])


def known_copies_of(
    train: np.ndarray,
    rows: np.ndarray,
    seed: int,
    pipe=None,
    guidance: float = 0.0,
    conditions: Callable[[np.ndarray], torch.Tensor | None] | None = None,
    model_strengths: tuple[float, ...] = MODEL_STRENGTHS,
) -> dict[str, np.ndarray]:
    """Every known copy type of the training images `rows`: augmented copies, and with a model its own near-copies
    (and autoencoder round trips)."""
    copies = {kind: augmented_copies(train[rows], kind, seed) for kind in COPY_TYPES}
    if pipe is not None and model_strengths:
        cond = conditions(rows) if conditions else None
        copies.update(model_copies(pipe, guidance, train[rows], cond, model_strengths, seed))
    return copies


def reidentification(
    train: np.ndarray,
    patients: list,
    held: np.ndarray,
    held_patients: list,
    steps: int,
    seed: int,
    progress=False,
    net: CopyDescriptorNet | None = None,
) -> dict:
    """Where both splits have patients with several images ((N, H, W) images in [0, 1] and a patient id each): a
    re-identification network trained on the training patients (or `net`, already trained: the gate's detector)
    and measured on the held-out ones (meddiff.evaluation.reidentification); else why not."""
    from meddiff.evaluation.reidentification import reid_metrics, repeat_patients, train_reid

    train_repeats = int(repeat_patients(patients).sum())
    held_repeats = int(repeat_patients(held_patients).sum())
    if steps <= 0 or train_repeats < 4 or held_repeats < 4:
        return {"measured": False, "why": "no patients with several images in both splits (or no descriptor "
                "steps): the copy descriptor stands in"}  # fmt: skip
    if net is None:
        logger.info(
            "privacy calibrate: re-identification network on %d training images of repeat patients", train_repeats
        )
        net = train_reid(train, patients, DescriptorSettings(steps=steps, seed=seed), progress)
    return {"measured": True, **reid_metrics(net, held, held_patients).to_dict()}


def label_conditions(dataset, names: list[str], rows) -> torch.Tensor:
    """(len(rows), 2K) condition vectors, for a model with label `names`, of those training images' own labels;
    zeros (unconditional) where the model does not take this dataset's labels."""
    from meddiff.conditioning.labels import LabelCodec

    rows = torch.as_tensor(rows)
    if not names or list(dataset.label_names) != list(names):
        return torch.zeros(len(rows), 2 * len(names))
    return LabelCodec(names).encode(dataset.labels[rows], dataset.known[rows])


def own_labels(dataset, model_dir: str | Path) -> Callable[[np.ndarray], torch.Tensor]:
    """conditions(chosen indices): label_conditions for the model in `model_dir`."""
    from meddiff.models.storage import load_pipeline

    names = list(load_pipeline(model_dir).label_names)
    return lambda chosen: label_conditions(dataset, names, chosen)


@dataclass
class CopyCount:
    """How many of a set of generated images the calibrated detector flags as near-copies of training images."""

    copies: int
    n: int
    interval: tuple[float, float]  # 95 % Wilson interval of the copy rate
    training_images_hit: int  # distinct nearest training images (by pixels) of the flagged ones
    max_score: float
    alpha: float
    threshold: float

    @property
    def rate(self) -> float:
        return self.copies / self.n

    @property
    def above_alpha(self) -> bool:
        """Significantly more copies than the detector's false-flag rate (the interval's lower bound above it)."""
        return self.interval[0] > self.alpha


def count_copies(calibration: Calibration, index: ReferenceIndex, images: np.ndarray) -> CopyCount:
    """The audit's and the training-time check's count on (N, H, W) images in [0, 1]."""
    scores = index.scores(images)
    fused = calibration.fused(scores)
    flags = fused > calibration.threshold
    hits = int(flags.sum())
    return CopyCount(
        copies=hits,
        n=len(flags),
        interval=wilson_interval(hits, len(flags)),
        training_images_hit=len(set(scores["match"][flags].tolist())),
        max_score=float(fused.max()),
        alpha=calibration.alpha,
        threshold=calibration.threshold,
    )


def calibrate_model(
    model_dir: str | Path,
    data: str,
    resolution: int,
    alpha: float = 0.01,
    positives: int = 500,
    seed: int = 0,
    descriptor_steps: int = 600,
    model_strengths: tuple[float, ...] = MODEL_STRENGTHS,
    progress: bool = False,
    fusion_sources: int = 250,
) -> dict:
    """`meddiff privacy calibrate`: audit_detector on the model's training data and its held-out split, with the
    model's own near-copies (conditioned on the training images' labels). Writes RUN/privacy/calibration.json
    (numbers and the data spec only: no images) and the descriptor's weights next to it; returns the note."""
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.evaluation.suite import to01

    spec = parse_spec(data)
    heldout = load_dataset(spec.heldout(), resolution)
    dataset = load_dataset(spec, resolution)
    train, held = to01(dataset.images), to01(heldout.images)
    audit = audit_detector(
        train,
        held,
        list(heldout.patients),
        alpha,
        positives,
        seed,
        descriptor_steps,
        model_dir,
        own_labels(dataset, model_dir),
        model_strengths,
        progress,
        train_patients=list(dataset.patients),
        fusion_sources=fusion_sources,
    )
    from meddiff.models.storage import run_directory

    folder = run_directory(model_dir) / PRIVACY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    reid = reidentification(
        train, list(dataset.patients), held, list(heldout.patients), descriptor_steps, seed, progress, audit.reid
    )
    note = {
        "data": str(spec),
        "halves": audit.halves,
        "resolution": resolution,
        "n_training_images": len(dataset),
        "heldout_duplicates": audit.heldout_duplicates,
        "calibration": audit.calibration.to_dict(),
        "measured": audit.report.to_dict(),
        "descriptor": None,
        "reidentification": reid,
        "seconds": {k: round(v, 1) for k, v in audit.seconds.items()},
    }
    if audit.index.descriptor is not None and audit.descriptor_settings is not None:
        note["descriptor"] = save_descriptor(audit.index.descriptor, audit.descriptor_settings, folder)
        note["descriptor_sha1"] = hashlib.sha1((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
    note["reid_network"] = None
    (folder / REID_FILE).unlink(missing_ok=True)
    if audit.reid is not None and audit.descriptor_settings is not None:
        note["reid_network"] = save_descriptor(audit.reid, audit.descriptor_settings, folder, REID_FILE)
        note["reid_sha1"] = hashlib.sha1((folder / REID_FILE).read_bytes()).hexdigest()[:16]
    warnings = calibration_warnings(audit.calibration, audit.report)
    note["warnings"] = warnings
    for warning in warnings:
        logger.warning("privacy calibrate: %s", warning)
    note["fingerprint"] = hashlib.sha1(
        json.dumps({k: v for k, v in note.items() if k != "seconds"}, sort_keys=True).encode()
    ).hexdigest()[:16]
    (folder / CALIBRATION_FILE).write_text(json.dumps(note, indent=2))
    return note


STURDY_NEGATIVES = 10  # calibration negatives per 1/alpha for a threshold that holds alpha without luck


def calibration_warnings(calibration: Calibration, report: GateReport) -> list[str]:
    """What makes a calibration's promise (false flags at alpha) shaky: a threshold set from fewer than
    STURDY_NEGATIVES / alpha held-out images (the (1 - alpha) quantile then rests on a handful of them), and a
    false-flag rate on the test half significantly above alpha (its 95 % interval entirely above)."""
    alpha, warnings = calibration.alpha, []
    need = math.ceil(STURDY_NEGATIVES / alpha)
    if calibration.n_calibration < need:
        warnings.append(
            f"the threshold rests on {calibration.n_calibration} calibration images, fewer than the {need} that "
            f"alpha {alpha:g} needs to be set reliably: give more held-out images or a larger alpha"
        )
    lo, hi = report.false_flag_interval
    if lo > alpha:
        warnings.append(
            f"on new real images the detector flags {report.false_flag_rate:.2%} (95 % interval {lo:.2%}-{hi:.2%}), "
            f"significantly above alpha {alpha:g}: the gate will redraw more genuine images than promised"
        )
    return warnings


@dataclass
class ExportGate:
    """What `generate --privacy-gate` checks each image with: the stored calibration and the training images it
    was made for (read again from the data spec; they are never stored with the model)."""

    calibration: Calibration
    index: ReferenceIndex
    fingerprint: str
    max_retries: int = 8
    dataset: Any = None  # the training ImageLabelDataset the index was built from (its labels: the audit's label mix)

    def check(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flagged, fused score) for (N, H, W) images in [0, 1]."""
        fused = self.calibration.fused(self.index.scores(images))
        return fused > self.calibration.threshold, fused


def load_gate(model_dir: str | Path, max_retries: int = 8) -> ExportGate:
    from meddiff.models.storage import run_directory

    path = run_directory(model_dir)
    note = stored_calibration(path)
    if note is None:
        raise MeddiffError(
            f"{path} has no privacy calibration; run `meddiff privacy calibrate --model {path} --data SPEC` first"
        )
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.suite import to01

    descriptor = _stored_network(path, note, "descriptor", "descriptor_sha1", WEIGHTS_FILE)
    reid = _stored_network(path, note, "reid_network", "reid_sha1", REID_FILE)
    dataset = load_dataset(note["data"], int(note["resolution"]))
    train = to01(dataset.images)
    if len(train) != note["n_training_images"]:
        raise MeddiffError(
            f"{note['data']} now holds {len(train)} training images, the calibration was made with "
            f"{note['n_training_images']}; calibrate again"
        )
    return ExportGate(
        Calibration.from_dict(note["calibration"]),
        ReferenceIndex(train, descriptor=descriptor, reid=reid),
        note["fingerprint"],
        max_retries,
        dataset,
    )


def _stored_network(run: Path, note: dict, key: str, sha_key: str, filename: str) -> CopyDescriptorNet | None:
    """The copy descriptor or re-identification network a calibration was made with (checked by its sha1)."""
    if not note.get(key):
        return None
    from meddiff.evaluation.copy_descriptor import load_descriptor

    weights = run / PRIVACY_DIR / filename
    if weights.is_file() and hashlib.sha1(weights.read_bytes()).hexdigest()[:16] != note.get(sha_key):
        raise MeddiffError(f"{weights} is not the network this calibration was made with; calibrate again")
    return load_descriptor(run / PRIVACY_DIR, note[key], filename)
