"""Feature extractors for distribution metrics.

`domain` (always available, offline): the label classifier trained on the real training split, cached by data
spec; its penultimate features give a domain-specific FID, the way torchxrayvision features give FID_XRV.
`inception`: the TorchScript Inception-v3 of StyleGAN2-ADA / clean-fid from a local file (no torchvision needed).
`xrv` needs torchxrayvision (torchvision-based) and its weights; meddiff never depends on it and says so in one line
when it is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.classifier import LabelClassifier, train_classifier

FEATURES = ("domain", "inception", "xrv")


def domain_classifier(train: ImageLabelDataset, spec_key: str, epochs: int = 10, seed: int = 0,
                      progress: bool = True) -> LabelClassifier:
    """The real-trained classifier, from the cache when this spec, resolution, recipe and seed were seen before."""
    import hashlib

    sample = train.images[::max(1, len(train) // 64)].numpy().tobytes() + train.labels.numpy().tobytes()
    key = cache.cache_key({"classifier": spec_key, "resolution": train.resolution, "epochs": epochs, "seed": seed,
                           "labels": train.label_names, "n": len(train), "data": hashlib.sha1(sample).hexdigest()}, [])
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


def require_optional(name: str, weights: str | None = None) -> None:
    """inception / xrv features: a one-line, actionable message where their packages or weights are missing."""
    if name == "domain":
        return
    if name not in FEATURES:
        raise MeddiffError(f"unknown feature extractor {name!r}; choose from {', '.join(FEATURES)}")
    if name == "inception":
        if not weights:
            raise MeddiffError("--features inception needs the TorchScript Inception-v3 used by StyleGAN2-ADA and "
                               "clean-fid (inception-2015-12-05.pt) on disk: pass --feature-weights PATH")
        if not Path(weights).is_file():
            raise MeddiffError(f"--feature-weights {weights}: no such file")
        return
    try:
        import torchxrayvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        raise MeddiffError("--features xrv needs torchxrayvision (which needs torchvision) and its weights; they are "
                           "not installed here. Use --features domain or inception, or install it on a machine with "
                           "torchvision") from None


class InceptionFeatures:
    """2048-d pool features of the TorchScript Inception-v3 (the FID reference network) loaded from a local file;
    no torchvision needed. Grayscale images are repeated to 3 channels and resized to 299 px, in the 0-255 range
    the network expects."""

    def __init__(self, path: str | Path):
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise MeddiffError(f"{path} is not a TorchScript model: {str(exc).splitlines()[0]}") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = (images[i:i + batch_size].float() + 1) * 127.5
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(0, 255).repeat(1, 3, 1, 1)
            out.append(self.net(x, return_features=True).float().reshape(x.shape[0], -1).numpy())
        return np.concatenate(out)


def xrv_features(weights: str | None):
    """torchxrayvision DenseNet features (where the package and weights are installed)."""
    import torchxrayvision as xrv

    model = xrv.models.DenseNet(weights=weights or "densenet121-res224-all").eval()

    @torch.no_grad()
    def extract(images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = F.interpolate(images[i:i + batch_size].float(), size=(224, 224), mode="bilinear") * 1024
            out.append(model.features2(x).numpy())
        return np.concatenate(out)

    return extract
