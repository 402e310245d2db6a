"""A copy descriptor learned on the user's own training images (issue 21).

Pixel similarity misses copies that moved: a training image shifted by a few pixels, rotated a little, cropped, or
re-noised correlates with the original hardly better than another patient does. The descriptor is a small CNN
trained by instance discrimination: two random acquisition-like variants of the same training image (shift,
rotation, zoom/crop, gamma, noise, blur, all at once) must land closer to each other than to any other image of the
batch (a symmetric InfoNCE loss). Its embedding then says "same image, re-acquired" rather than "similar anatomy";
the gate uses the largest cosine with a training image as one more detector.

Trained per model on its training split (a few CPU minutes at 28-64 px); its weights are derived from patient data
and are stored privately with the calibration (RUN/privacy/), never in pipeline/ or a model card."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
WEIGHTS_FILE = "descriptor.safetensors"


@dataclass
class DescriptorSettings:
    dim: int = 128
    width: int = 32
    steps: int = 600
    batch_size: int = 256
    learning_rate: float = 2e-3
    temperature: float = 0.1
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> DescriptorSettings:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class CopyDescriptorNet(nn.Module):
    """(N, 1, H, W) in [0, 1] -> (N, dim) unit vectors. Each image is standardised first (brightness and contrast
    changes of a re-acquisition do not reach the network); spatial layout is kept by a 4 x 4 pooled grid."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        widths = (width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        channels = 1
        for k, w in enumerate(widths):
            layers += [
                nn.Conv2d(channels, w, 3, stride=1 if k == 0 else 2, padding=1),
                nn.GroupNorm(8, w),
                nn.SiLU(),
            ]
            channels = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(channels * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = x / x.flatten(1).std(1).clamp(min=1e-4)[:, None, None, None]
        return F.normalize(self.head(self.features(x).flatten(1)), dim=1)


def acquisition_views(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random re-acquisition of each image of (N, 1, H, W) in [0, 1]: shift up to 1/10 of the size, rotation up to
    8 degrees, zoom 0.84-1.04 (crops and small zoom-outs), gamma 0.7-1.4, Gaussian noise up to 0.05, and a light
    blur for a quarter of the images. Broader than the known copies the gate is measured on."""
    n = len(x)

    def uniform(lo: float, hi: float, shape=(n,)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    angle = uniform(-8.0, 8.0) * math.pi / 180
    zoom = uniform(0.84, 1.04)
    shift = uniform(-0.2, 0.2, (n, 2))  # grid units: 0.2 of the half-size = 1/10 of the size
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    blur = torch.rand(n, generator=generator) < 0.25
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3)
        out[blur] = F.conv2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), kernel)
    gamma = torch.exp(uniform(math.log(0.7), math.log(1.4))).view(n, 1, 1, 1)
    out = out.clamp(1e-6, 1) ** gamma
    sigma = uniform(0.0, 0.05).view(n, 1, 1, 1)
    out = out + sigma * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)


def train_descriptor(
    images: np.ndarray,
    settings: DescriptorSettings | None = None,
    progress: bool = False,
    partners: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> CopyDescriptorNet:
    """Instance discrimination on (N, H, W) images in [0, 1]: symmetric InfoNCE between two random re-acquisitions
    of each image in a batch. `partners` (N, H, W), optional: another version of each image that must count as the
    same image (the audited model's own near-copy of it: noised to some t and denoised); for half of a batch the
    second view is made from the partner. `groups` (N,), optional: a group id per image (a patient): then the pairs are
    two different images of one group and a batch holds one pair per group (a re-identification network: it learns
    what makes two studies the same patient). Deterministic for a seed (CPU)."""
    settings = settings or DescriptorSettings()
    if partners is not None and partners.shape != images.shape:
        raise MeddiffError(f"partners must match the images' shape {images.shape}, got {partners.shape}")
    if images.ndim != 3 or len(images) < 2:
        raise MeddiffError("the copy descriptor needs at least 2 training images, as an (N, H, W) stack")
    if min(images.shape[1:]) < 16:
        raise MeddiffError(f"images of {images.shape[1]}x{images.shape[2]} are too small for the copy descriptor")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    net = CopyDescriptorNet(settings.width, settings.dim)
    optimiser = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.learning_rate, total_steps=settings.steps, pct_start=0.1
    )
    data = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    other = None if partners is None else torch.from_numpy(np.ascontiguousarray(partners)).float().unsqueeze(1)
    batch = min(settings.batch_size, len(data))
    targets = torch.arange(batch)
    members = None
    if groups is not None:
        if len(groups) != len(images):
            raise MeddiffError(f"groups must give one id per image ({len(images)}), got {len(groups)}")
        _, inverse = np.unique(groups, return_inverse=True)
        members = [torch.from_numpy(np.flatnonzero(inverse == g)) for g in range(inverse.max() + 1)]
        members = [m for m in members if len(m) >= 2]
        if len(members) < 2:
            raise MeddiffError("re-identification needs at least 2 patients with 2 or more images each")
        batch = min(batch, len(members))
        targets = torch.arange(batch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=settings.steps, desc="re-identification" if groups is not None else "copy descriptor", unit="step"
        )
    start = time.perf_counter()
    net.train()
    loss_value = float("nan")
    for step in range(settings.steps):
        if members is not None:  # one patient per row: two of its images
            pairs = [
                members[int(g)][torch.randperm(len(members[int(g)]), generator=generator)[:2]]
                for g in torch.randperm(len(members), generator=generator)[:batch]
            ]
            x, y = data[torch.stack([p[0] for p in pairs])], data[torch.stack([p[1] for p in pairs])]
        else:
            chosen = torch.randperm(len(data), generator=generator)[:batch]
            x = y = data[chosen]
            if other is not None:  # half the pairs: the image and the model's near-copy of it
                pick = (torch.rand(len(x), generator=generator) < 0.5).view(-1, 1, 1, 1)
                y = torch.where(pick, other[chosen], x)
        a, b = net(acquisition_views(x, generator)), net(acquisition_views(y, generator))
        logits = a @ b.T / settings.temperature
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        loss_value = loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
        elif step % max(1, settings.steps // 5) == 0:
            logger.info("copy descriptor: step %d/%d, loss %.3f", step, settings.steps, loss_value)
    if bar is not None:
        bar.close()
    logger.info(
        "copy descriptor: %d steps on %d images in %.1f s, final loss %.3f",
        settings.steps, len(data), time.perf_counter() - start, loss_value,
    )  # fmt: skip
    return net.eval()


@torch.no_grad()
def embed(net: CopyDescriptorNet, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """(N, H, W) in [0, 1] -> (N, dim) float32 unit vectors."""
    net.eval()
    parts = [
        net(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).float().unsqueeze(1))
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy().astype(np.float32)


def save_descriptor(
    net: CopyDescriptorNet, settings: DescriptorSettings, folder: str | Path, filename: str = WEIGHTS_FILE
) -> dict:
    """Weights (safetensors) into `folder`/`filename`; returns the settings to store next to them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / filename))
    return asdict(settings)


def load_descriptor(folder: str | Path, settings: dict, filename: str = WEIGHTS_FILE) -> CopyDescriptorNet:
    from safetensors.torch import load_file

    path = Path(folder) / filename
    if not path.is_file():
        raise MeddiffError(f"{path} is missing; run `meddiff privacy calibrate` again")
    parsed = DescriptorSettings.from_dict(settings)
    net = CopyDescriptorNet(parsed.width, parsed.dim)
    try:
        net.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as exc:
        raise MeddiffError(f"{path} is not a copy descriptor of this kind ({str(exc).splitlines()[0]})") from None
    return net.eval()
