"""Denoising animations: a GIF per image, from noise to image. For latent models each frame shows the decoded
image beside the latent itself (its channels tiled, each normalised), as the source studies show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


class DenoisingRecorder:
    """Collects every denoising step of a batch (as a `sample(..., callback=)`), then writes one GIF per image."""

    def __init__(self, pipe, display_size: int = 128):
        self.pipe = pipe
        self.display = display_size
        self.frames: dict[int, list[np.ndarray]] = {}

    @torch.no_grad()
    def __call__(self, offset: int, step: int, timestep, sample: torch.Tensor) -> None:
        images = (self.pipe.decode_latents(sample).float() / 2 + 0.5).clamp(0, 1)[:, 0].cpu().numpy()
        latents = sample.float().cpu().numpy() if self.pipe.is_latent else None
        for j in range(sample.shape[0]):
            panel = self._panel(images[j], latents[j] if latents is not None else None)
            self.frames.setdefault(offset + j, []).append(panel)

    def _panel(self, image: np.ndarray, latent: np.ndarray | None) -> np.ndarray:
        parts = [_resize(image, self.display)]
        if latent is not None:
            tiles = []
            for channel in latent:
                lo, hi = np.percentile(channel, [1, 99])
                tiles.append((channel - lo) / (hi - lo + 1e-6))
            cols = int(np.ceil(np.sqrt(len(tiles))))
            size = self.display // cols
            grid = np.zeros((self.display, self.display), np.float32)
            for k, tile in enumerate(tiles):
                r, c = divmod(k, cols)
                grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = _resize(np.clip(tile, 0, 1), size)
            parts += [np.ones((self.display, 4), np.float32), grid]
        return np.concatenate(parts, axis=1)

    def save(self, index: int, path: Path, frame_ms: int = 80, hold_ms: int = 1200) -> Path:
        frames = [Image.fromarray(np.round(f * 255).astype(np.uint8), "L") for f in self.frames[index]]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return path


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image.astype(np.float32)
    pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), "L")
    return np.asarray(pil.resize((size, size), Image.Resampling.NEAREST), np.float32) / 255
