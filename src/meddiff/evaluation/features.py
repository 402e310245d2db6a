"""Feature extractors for distribution metrics.

`domain` (always available, offline): the label classifier trained on the real training split, cached by data
spec; its penultimate features give a domain-specific FID, the way torchxrayvision features give FID_XRV.
`inception`: the TorchScript Inception-v3 of StyleGAN2-ADA / clean-fid from a local file (no torchvision needed).
`xrv` needs torchxrayvision (torchvision-based) and its weights; meddiff never depends on it and says so in one line
when it is missing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.store import MappedImages
from meddiff.devices import run_device
from meddiff.errors import MeddiffError
from meddiff.evaluation.classifier import LabelClassifier, train_classifier

FEATURES = ("domain", "inception", "xrv")
M = TypeVar("M", bound=torch.nn.Module)


def domain_classifier(
    train: ImageLabelDataset, spec_key: str, epochs: int = 10, seed: int = 0, progress: bool = True, device=None
) -> LabelClassifier:
    """The real-trained classifier, from the cache when this spec, resolution, recipe and seed were seen before."""
    import hashlib

    sample = train.images[:: max(1, len(train) // 64)].numpy().tobytes() + train.labels.numpy().tobytes()
    key = cache.cache_key(
        {
            "classifier": spec_key,
            "resolution": train.resolution,
            "epochs": epochs,
            "seed": seed,
            "labels": train.label_names,
            "n": len(train),
            "data": hashlib.sha1(sample).hexdigest(),
        },
        [],
    )
    path = cache.cache_root() / "classifiers" / f"{key}.safetensors"
    return cached_weights(
        path,
        LabelClassifier(len(train.label_names)),
        lambda: train_classifier(train, epochs=epochs, seed=seed, progress=progress, device=device),
        device,
    )


def cached_weights(path: Path, model: M, fit: Callable[[], M], device=None) -> M:
    """`model` with the weights stored at `path` (on the run's device, in eval mode), or else `fit()`'s trained
    model, whose weights are then stored at `path` (safetensors) for the next run."""
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.to(run_device(device)).eval()
    model = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


@torch.no_grad()
def embed(model: LabelClassifier, images: torch.Tensor | MappedImages, batch_size: int = 256) -> np.ndarray:
    """images (N, 1, R, R) in [-1, 1] -> features (N, D), computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    return np.concatenate(
        [
            model.embed(images[i : i + batch_size].to(device)).float().cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def require_optional(name: str, weights: str | None = None) -> None:
    """inception / xrv features: a one-line, actionable message where their packages or weights are missing."""
    if name == "domain":
        return
    if name not in FEATURES:
        raise MeddiffError(f"unknown feature extractor {name!r}; choose from {', '.join(FEATURES)}")
    if name == "inception":
        if not weights:
            raise MeddiffError(
                "--features inception needs the TorchScript Inception-v3 used by StyleGAN2-ADA and "
                "clean-fid (inception-2015-12-05.pt) on disk: pass --feature-weights PATH"
            )
        if not Path(weights).is_file():
            raise MeddiffError(f"--feature-weights {weights}: no such file")
        return
    try:
        import torchxrayvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        raise MeddiffError(
            "--features xrv needs torchxrayvision (which needs torchvision) and its weights; they are "
            "not installed here. Use --features domain or inception, or install it on a machine with "
            "torchvision"
        ) from None


class InceptionFeatures:
    """2048-d pool features of the TorchScript Inception-v3 (the FID reference network) loaded from a local file;
    no torchvision needed. Grayscale images are repeated to 3 channels and resized to 299 px, in the 0-255 range
    the network expects."""

    def __init__(self, path: str | Path, device=None):
        self.device = run_device(device)
        try:
            self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except (RuntimeError, ValueError) as exc:
            raise MeddiffError(f"{path} is not a TorchScript model: {str(exc).splitlines()[0]}") from None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor | MappedImages, batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = (images[i : i + batch_size].to(self.device).float() + 1) * 127.5
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(0, 255).repeat(1, 3, 1, 1)
            out.append(self.net(x, return_features=True).float().reshape(x.shape[0], -1).cpu().numpy())
        return np.concatenate(out)


def xrv_features(weights: str | None):
    """torchxrayvision DenseNet features (where the package is installed). `weights` is an xrv weights name
    (default densenet121-res224-all, downloaded by xrv where the network allows) or a local file: a state dict in
    safetensors, or xrv's own .pt file (a pickled model, loaded only because the user named it)."""
    import torchxrayvision as xrv

    if weights and Path(weights).is_file():
        model = xrv.models.DenseNet(weights=None)
        if str(weights).endswith(".safetensors"):
            state = load_file(str(weights))
        else:
            loaded = torch.load(str(weights), map_location="cpu", weights_only=False)
            state = loaded.state_dict() if hasattr(loaded, "state_dict") else loaded
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise MeddiffError(
                f"--feature-weights {weights} does not fit xrv's DenseNet: {str(exc).splitlines()[0]}"
            ) from None
    else:
        try:
            model = xrv.models.DenseNet(weights=weights or "densenet121-res224-all")
        except Exception as exc:  # noqa: BLE001 - unknown name, offline download: one line
            raise MeddiffError(
                f"torchxrayvision could not load weights {weights or 'densenet121-res224-all'!r} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); put the "
                f"file on disk and pass --feature-weights PATH"
            ) from None
    device = run_device()
    model = model.to(device).eval()

    @torch.no_grad()
    def extract(images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """images (N, 1, R, R) in [-1, 1] -> xrv's pooled DenseNet features; xrv wants 224 px in [-1024, 1024]."""
        out = []
        for i in range(0, len(images), batch_size):
            x = F.interpolate(images[i : i + batch_size].to(device).float(), size=(224, 224), mode="bilinear") * 1024
            if hasattr(model, "features2"):
                f = model.features2(x)
            else:  # older xrv: pool the last feature map as its classifier does
                f = F.adaptive_avg_pool2d(F.relu(model.features(x)), 1).flatten(1)
            out.append(f.float().reshape(len(x), -1).cpu().numpy())
        return np.concatenate(out)

    return extract
