"""Patient re-identification (issue 21): can two images be told to come from one patient?

A re-identification network is the copy descriptor's network trained on patient ids instead of image identity
(meddiff.evaluation.copy_descriptor.train_descriptor with `groups`): two different studies of one patient must lie
closer than studies of different patients. It is measured on held-out patients it never saw: every pair of their
images is scored by cosine similarity, same-patient pairs against different-patient pairs, as an AUC and as the
true-positive rate at a false-positive rate of 1e-3 (Packhaeuser et al. report AUC 0.994 on ChestX-ray14). A model
whose synthetic images match a training patient this well would leak that patient even without copying an image.
Without patient ids there is nothing to train on: the copy descriptor stands in (the gate's descriptor detector)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.evaluation.copy_descriptor import CopyDescriptorNet, DescriptorSettings, embed, train_descriptor

logger = logging.getLogger(__name__)


@dataclass
class ReidReport:
    auc: float
    tpr_at_1e3: float  # true-positive rate at a false-positive rate of 1e-3
    same_pairs: int
    different_pairs: int
    patients: int
    images: int
    negatives_sampled: bool = False  # different-patient pairs: a uniform sample of them (large held-out sets)

    def to_dict(self) -> dict:
        return asdict(self)


def repeat_patients(patients) -> np.ndarray:
    """Mask of the images whose patient has at least two images."""
    ids = np.asarray([str(p) for p in patients])
    if not len(ids):
        return np.zeros(0, bool)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    return counts[inverse] >= 2


def train_reid(images: np.ndarray, patients, settings: DescriptorSettings | None = None, progress=False):
    """A re-identification network from training images and their patient ids (patients with one image only are
    skipped); a one-line error without repeat patients."""
    keep = repeat_patients(patients)
    if keep.sum() < 4:
        raise MeddiffError("re-identification needs patient ids with at least two images per patient")
    ids = np.asarray([str(p) for p in patients])[keep]
    return train_descriptor(images[keep], settings, progress=progress, groups=ids)


def reid_metrics(
    net: CopyDescriptorNet, images: np.ndarray, patients, max_negative_pairs: int = 5_000_000, seed: int = 0
) -> ReidReport:
    """Same-patient vs different-patient pair scores of (held-out) images: AUC and TPR at FPR 1e-3.

    Every same-patient pair is scored. Different-patient pairs are all scored while there are at most
    `max_negative_pairs` of them; beyond that (about 3,000 images) a fixed-seed uniform sample of that many stands in
    for them (`negatives_sampled`), so memory stays O(images + max_negative_pairs) at any held-out size."""
    keep = repeat_patients(patients)
    names = np.asarray([str(p) for p in patients])[keep]
    if len(set(names)) < 2:
        raise MeddiffError("re-identification is measured on at least 2 patients with 2 or more images each")
    ids = np.unique(names, return_inverse=True)[1]  # integers: the pair arrays below stay small
    z = embed(net, images[keep]).astype(np.float32)
    n = len(ids)
    positives = []
    by_patient = np.argsort(ids, kind="stable")
    for rows in np.split(by_patient, np.flatnonzero(np.diff(ids[by_patient])) + 1):  # same-patient pairs, all
        block = z[rows] @ z[rows].T
        positives.append(block[np.triu_indices(len(rows), k=1)])
    pos = np.concatenate(positives)
    same_pairs = len(pos)
    different_pairs = n * (n - 1) // 2 - same_pairs
    sampled = different_pairs > max_negative_pairs
    if not sampled:
        negatives = []
        for start in range(0, n, 1024):  # row blocks of the upper triangle
            stop = min(start + 1024, n)
            block = z[start:stop] @ z.T
            i, j = np.nonzero(np.arange(start, stop)[:, None] < np.arange(n)[None, :])
            differ = ids[start + i] != ids[j]
            negatives.append(block[i[differ], j[differ]])
        neg = np.concatenate(negatives)
    else:
        rng = np.random.default_rng(seed)
        chunks, have = [], 0
        while have < max_negative_pairs:  # in chunks: memory ~ chunk x dim, not pairs x dim
            i = rng.integers(0, n, min(2 * (max_negative_pairs - have), 1 << 18))
            j = rng.integers(0, n, len(i))
            ok = ids[i] != ids[j]
            i, j = i[ok][: max_negative_pairs - have], j[ok][: max_negative_pairs - have]
            chunks.append(np.einsum("nd,nd->n", z[i], z[j]))
            have += len(i)
        neg = np.concatenate(chunks)
    order = np.sort(neg)
    # AUC by ranks (ties count half)
    below = np.searchsorted(order, pos, side="left")
    ties = np.searchsorted(order, pos, side="right") - below
    auc = float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))
    threshold = np.quantile(neg, 1 - 1e-3, method="higher")
    return ReidReport(
        auc=auc,
        tpr_at_1e3=float((pos > threshold).mean()),
        same_pairs=int(same_pairs),
        different_pairs=int(different_pairs),
        patients=len(set(names)),
        images=int(keep.sum()),
        negatives_sampled=bool(sampled),
    )
