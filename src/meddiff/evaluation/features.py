"""Feature extractors for distribution metrics.

`domain` (always available, offline): the label classifier trained on the real training split, cached by data
spec; its penultimate features give a domain-specific FID, the way torchxrayvision features give FID_XRV.
`inception` and `xrv` need torchvision-based packages and their weights; meddiff never depends on them and says
so in one line when they are missing."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.classifier import LabelClassifier, train_classifier

FEATURES = ("domain", "inception", "xrv")


def domain_classifier(train: ImageLabelDataset, spec_key: str, epochs: int = 10, seed: int = 0,
                      progress: bool = True) -> LabelClassifier:
    """The real-trained classifier, from the cache when this spec, resolution, recipe and seed were seen before."""
    key = cache.cache_key({"classifier": spec_key, "resolution": train.resolution, "epochs": epochs, "seed": seed,
                           "labels": train.label_names, "n": len(train)}, [])
    path = cache.cache_root() / "classifiers" / f"{key}.safetensors"
    model = LabelClassifier(len(train.label_names))
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier(train, epochs=epochs, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


@torch.no_grad()
def embed(model: LabelClassifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """images (N, 1, R, R) in [-1, 1] -> features (N, D)."""
    model.eval()
    return np.concatenate([model.embed(images[i:i + batch_size]).numpy() for i in range(0, len(images), batch_size)])


def require_optional(name: str) -> None:
    """inception / xrv features: a one-line, actionable message where their packages or weights are missing."""
    if name == "domain":
        return
    if name not in FEATURES:
        raise MeddiffError(f"unknown feature extractor {name!r}; choose from {', '.join(FEATURES)}")
    package = {"inception": "torch-fidelity", "xrv": "torchxrayvision"}[name]
    raise MeddiffError(f"--features {name} needs {package} (which needs torchvision) and its weights; they are not "
                       "installed here. Use --features domain, or install them on a machine with torchvision")
