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
import torch

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


def reid_metrics(net: CopyDescriptorNet, images: np.ndarray, patients) -> ReidReport:
    """Same-patient vs different-patient pair scores of (held-out) images: AUC and TPR at FPR 1e-3."""
    keep = repeat_patients(patients)
    names = np.asarray([str(p) for p in patients])[keep]
    if len(set(names)) < 2:
        raise MeddiffError("re-identification is measured on at least 2 patients with 2 or more images each")
    ids = np.unique(names, return_inverse=True)[1]  # integers: the pair arrays below stay small
    z = torch.from_numpy(embed(net, images[keep]))
    similarity = (z @ z.T).numpy()
    upper = np.triu_indices(len(ids), k=1)
    scores = similarity[upper]
    same = ids[upper[0]] == ids[upper[1]]
    positives, negatives = scores[same], scores[~same]
    order = np.sort(negatives)
    # AUC by ranks (ties count half)
    below = np.searchsorted(order, positives, side="left")
    ties = np.searchsorted(order, positives, side="right") - below
    auc = float((below + 0.5 * ties).sum() / (len(positives) * len(negatives)))
    threshold = np.quantile(negatives, 1 - 1e-3, method="higher")
    return ReidReport(
        auc=auc,
        tpr_at_1e3=float((positives > threshold).mean()),
        same_pairs=int(same.sum()),
        different_pairs=int((~same).sum()),
        patients=len(set(names)),
        images=int(keep.sum()),
    )
