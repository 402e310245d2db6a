"""Image grids (PNG) for people to look at."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """(N, H, W) in [0, 1] -> one (rows*H, cols*W) array with padding."""
    n, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    if upscale > 1:
        grid = np.kron(grid, np.ones((upscale, upscale), np.float32))
    return grid


def grid_png_bytes(images: np.ndarray, columns: int | None = None, upscale: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(make_grid(images, columns, upscale=upscale) * 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def save_grid(path: Path, images: np.ndarray, columns: int | None = None, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png_bytes(images, columns, upscale))
    return path


def upscale_for(resolution: int) -> int:
    return max(1, 128 // resolution)
