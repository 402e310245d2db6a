"""A small CNN trained on real images to recognise the labels. Used to measure label fidelity of generated
images (and, later, as the domain feature extractor)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.store import MappedImages
from meddiff.devices import run_device


class LabelClassifier(nn.Module):
    def __init__(self, num_labels: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
            )

        self.features = nn.Sequential(
            block(1, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, num_labels))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small shifts and intensity jitter (no flips: laterality matters in radiographs)."""
    b = x.shape[0]
    pad = max(1, x.shape[-1] // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.1 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5)
    return x * gain + bias


def train_classifier(
    dataset: ImageLabelDataset,
    epochs: int = 8,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 2e-3,
    progress: bool = False,
    device=None,
    init: LabelClassifier | None = None,
    pos_weight: torch.Tensor | None = None,
) -> LabelClassifier:
    """Trained on `device` (default: the run's device, a GPU where there is one); augmentation and batch order come
    from a CPU generator, so the result does not depend on the device's random streams. `init`: a trained classifier
    to go on training (fine-tuning; it is trained in place); `pos_weight`: per-label weight of positive examples
    (class reweighting, see `label_pos_weight`)."""
    torch.manual_seed(seed)
    device = run_device(device)
    if init is not None and init.head[-1].out_features != len(dataset.label_names):
        raise ValueError("init classifier has another number of labels than the dataset")
    model = (init if init is not None else LabelClassifier(len(dataset.label_names))).to(device)
    weight = None if pos_weight is None else pos_weight.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(dataset) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="fidelity classifier", unit="step", disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(len(dataset), generator=gen)
        for start in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
            idx = perm[start : start + batch_size]
            x = _augment(dataset.images[idx], gen).to(device, non_blocking=True)
            known = dataset.known[idx].float().to(device)
            logits = model(x)
            target = dataset.labels[idx].to(device)
            loss = classification_loss(logits, target, known, weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < steps:
                sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


def classification_loss(
    logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy per label over the known entries only; `pos_weight` scales each label's positives."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pos_weight)
    return (loss * known).sum() / known.sum().clamp(min=1)


def label_pos_weight(dataset: ImageLabelDataset, cap: float = 100.0) -> torch.Tensor:
    """Per label: negatives / positives among the images where it is known (1 where a class is missing), capped."""
    known = dataset.known.float()
    pos = ((dataset.labels > 0.5).float() * known).sum(0)
    neg = known.sum(0) - pos
    weight = torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1), torch.ones_like(pos))
    return weight.clamp(max=cap)


@torch.no_grad()
def predict(model: LabelClassifier, images: torch.Tensor | MappedImages, batch_size: int = 256) -> np.ndarray:
    """images (N, 1, R, R) in [-1, 1] -> probabilities (N, K), computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return (
        np.concatenate(
            [
                torch.sigmoid(model(images[i : i + batch_size].to(device))).float().cpu().numpy()
                for i in range(0, len(images), batch_size)
            ]
        )
        if len(images)
        else np.zeros((0, 0))
    )


def per_label_auc(
    probs: np.ndarray, labels: np.ndarray, known: np.ndarray, names: list[str]
) -> dict[str, float | None]:
    """ROC AUC per label over images where the label is known; None where only one class is present."""
    out: dict[str, float | None] = {}
    for k, name in enumerate(names):
        mask = known[:, k].astype(bool)
        y = labels[mask, k] > 0.5
        out[name] = float(roc_auc_score(y, probs[mask, k])) if 0 < y.sum() < len(y) else None
    return out
