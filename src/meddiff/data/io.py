"""Reading image files as float arrays in [0, 1], keeping 16-bit precision until normalised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


class UnreadableImage(Exception):
    """A file that is not a readable image (counted and reported by the caller)."""


def read_image(path: Path) -> np.ndarray:
    """Grayscale float32 (H, W) in [0, 1]. 8-bit and 16-bit files keep their full precision; RGB is
    converted to luminance explicitly."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                return (arr / peak).astype(np.float32)
            if im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                return (arr - lo) / max(hi - lo, 1e-12)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a float image to size x size (centre square crop first if not square), in float precision."""
    h, w = image.shape
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    if image.shape[0] == size:
        return image.astype(np.float32)
    resample = Image.Resampling.BOX if image.shape[0] > size else Image.Resampling.BICUBIC
    out = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), resample))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_png(path: Path, image01: np.ndarray, bit_depth: int = 8, text: dict[str, str] | None = None) -> None:
    """Write a [0, 1] float image as an 8- or 16-bit grayscale PNG, atomically, with optional text chunks."""
    from PIL import PngImagePlugin

    image01 = np.clip(image01, 0.0, 1.0)
    if bit_depth == 16:
        im = Image.fromarray(np.round(image01 * 65535).astype(np.uint16))
    elif bit_depth == 8:
        im = Image.fromarray(np.round(image01 * 255).astype(np.uint8), mode="L")
    else:
        raise ValueError("bit_depth must be 8 or 16")
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    im.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
