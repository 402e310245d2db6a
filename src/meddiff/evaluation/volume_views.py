"""Looking at 3D volumes: tri-planar montages (real next to synthetic), slice-sweep GIFs and a slice slider for the
HTML report.

Volumes are RAS-ordered arrays (X, Y, Z) or (C, X, Y, Z), in [-1, 1] by default. Slices are shown the radiological
way: axial and coronal with the patient's right on the image's left, axial with anterior at the top, coronal and
sagittal with superior at the top (sagittal: anterior on the left). Pixels are stretched to the voxel spacing, so
anisotropic grids keep their proportions."""

from __future__ import annotations

import hashlib
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from meddiff.errors import MeddiffError
from meddiff.evaluation.report import png_data_uri

PLANES = ("axial", "coronal", "sagittal")
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the array axis each plane cuts across
TITLE_HEIGHT, GAP = 14, 4


def display_volume(
    volume: np.ndarray | torch.Tensor, channel: int = 0, value_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """(X, Y, Z) or (C, X, Y, Z) -> (X, Y, Z) float32 in [0, 1] (one channel)."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().float().cpu().numpy()
    volume = np.asarray(volume, np.float32)
    if volume.ndim == 4:
        if not 0 <= channel < volume.shape[0]:
            raise MeddiffError(f"channel {channel} does not exist in a volume of {volume.shape[0]} channels")
        volume = volume[channel]
    if volume.ndim != 3:
        raise MeddiffError(f"a volume must be (X, Y, Z) or (C, X, Y, Z), got shape {tuple(volume.shape)}")
    low, high = value_range
    return np.clip((volume - low) / (high - low), 0, 1)


def _check_plane(plane: str) -> None:
    if plane not in AXIS:
        raise MeddiffError(f"plane must be one of {', '.join(PLANES)}, got {plane!r}")


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One display-oriented 2D slice (rows, columns) of an (X, Y, Z) volume."""
    _check_plane(plane)
    if plane == "axial":
        return volume[::-1, ::-1, index].T  # rows: anterior -> posterior, columns: right -> left
    if plane == "coronal":
        return volume[::-1, index, ::-1].T  # rows: superior -> inferior, columns: right -> left
    return volume[index, ::-1, ::-1].T  # rows: superior -> inferior, columns: anterior -> posterior


def pixel_size(plane: str, spacing: Sequence[float]) -> tuple[float, float]:
    """(height, width) in mm of one pixel of a slice in `plane`."""
    sx, sy, sz = (float(s) for s in spacing)
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[plane]


def slice_image(
    slice01: np.ndarray, plane: str, spacing: Sequence[float] = (1, 1, 1), scale: float = 2.0
) -> Image.Image:
    """A grayscale PIL image of a [0, 1] slice, stretched to the voxel spacing (the finest spacing = `scale` px)."""
    height_mm, width_mm = pixel_size(plane, spacing)
    finest = min(float(s) for s in spacing)
    rows, cols = slice01.shape
    size = (max(1, round(cols * width_mm / finest * scale)), max(1, round(rows * height_mm / finest * scale)))
    image = Image.fromarray(np.round(slice01 * 255).astype(np.uint8), mode="L")
    return image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)


def tri_planar(volume: np.ndarray, point: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The axial, coronal and sagittal slices through `point` (voxel indices x, y, z; default the centre)."""
    point = [s // 2 for s in volume.shape] if point is None else [int(p) for p in point]
    if len(point) != 3 or any(not 0 <= p < s for p, s in zip(point, volume.shape)):
        raise MeddiffError(f"point {list(point)} is not a voxel of a volume of shape {volume.shape}")
    return {plane: plane_slice(volume, plane, point[AXIS[plane]]) for plane in PLANES}


def montage(
    volumes: Sequence[np.ndarray | torch.Tensor],
    titles: Sequence[str] | None = None,
    point: Sequence[int] | None = None,
    spacing: Sequence[float] = (1, 1, 1),
    scale: float = 2.0,
    channel: int = 0,
) -> Image.Image:
    """One column per volume (titled), one row per plane (axial, coronal, sagittal), on a black background."""
    if not volumes:
        raise MeddiffError("no volumes to show")
    titles = list(titles) if titles is not None else [str(i) for i in range(len(volumes))]
    if len(titles) != len(volumes):
        raise MeddiffError(f"{len(titles)} titles for {len(volumes)} volumes")
    cells = [
        {p: slice_image(s, p, spacing, scale) for p, s in tri_planar(display_volume(v, channel), point).items()}
        for v in volumes
    ]
    widths = [max(c[p].width for p in PLANES) for c in cells]
    heights = [max(c[p].height for c in cells) for p in PLANES]
    canvas = Image.new("L", (sum(widths) + GAP * (len(cells) + 1), TITLE_HEIGHT + sum(heights) + GAP * 4), 0)
    draw = ImageDraw.Draw(canvas)
    x = GAP
    for cell, width, title in zip(cells, widths, titles):
        draw.text((x, 1), title[: max(1, width // 6)], fill=255)
        y = TITLE_HEIGHT + GAP
        for plane, height in zip(PLANES, heights):
            canvas.paste(cell[plane], (x, y))
            y += height + GAP
        x += width + GAP
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def montage_png(
    volumes: Sequence[np.ndarray | torch.Tensor],
    titles: Sequence[str] | None = None,
    path: Path | None = None,
    **kwargs,
) -> bytes:
    """The montage as PNG bytes (also written to `path` when given); kwargs as for `montage`."""
    png = png_bytes(montage(volumes, titles, **kwargs))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)
    return png


def real_vs_synthetic_png(
    real: Sequence[np.ndarray | torch.Tensor],
    synthetic: Sequence[np.ndarray | torch.Tensor],
    path: Path | None = None,
    **kwargs,
) -> bytes:
    """Real volumes on the left, synthetic ones on the right, in one tri-planar montage."""
    titles = [f"real {i + 1}" for i in range(len(real))] + [f"synthetic {i + 1}" for i in range(len(synthetic))]
    return montage_png([*real, *synthetic], titles, path, **kwargs)


def sweep_frames(
    volume: np.ndarray | torch.Tensor,
    plane: str = "axial",
    spacing: Sequence[float] = (1, 1, 1),
    scale: float = 2.0,
    channel: int = 0,
    step: int = 1,
) -> list[Image.Image]:
    """Every `step`-th slice of `plane`, in order (axial: inferior to superior), as display images."""
    _check_plane(plane)
    if step < 1:
        raise MeddiffError(f"step must be at least 1, got {step}")
    data = display_volume(volume, channel)
    count = data.shape[AXIS[plane]]
    return [slice_image(plane_slice(data, plane, k), plane, spacing, scale) for k in range(0, count, step)]


def sweep_gif(volume: np.ndarray | torch.Tensor, path: Path, plane: str = "axial", fps: float = 10.0, **kwargs) -> Path:
    """A looping GIF sweeping through the slices of one volume; kwargs as for `sweep_frames`."""
    frames = sweep_frames(volume, plane, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0, optimize=False)
    return path


def slice_slider_html(
    volume: np.ndarray | torch.Tensor, caption: str, plane: str = "axial", start: int | None = None, **kwargs
) -> str:
    """An HTML figure with a range input that steps through the slices (PNG frames embedded, plain JS); kwargs as
    for `sweep_frames`. Self-contained: paste it into any report section."""
    frames = [png_data_uri(png_bytes(f)) for f in sweep_frames(volume, plane, **kwargs)]
    start = len(frames) // 2 if start is None else max(0, min(int(start), len(frames) - 1))
    uid = "slider-" + hashlib.sha1("".join(frames).encode() + caption.encode()).hexdigest()[:10]
    data = ",".join(f'"{f}"' for f in frames)
    return (
        f"<figure id='{uid}'><figcaption>{html.escape(caption)} ({plane}, "
        f"<span class='slice'>{start + 1}</span> / {len(frames)})</figcaption>"
        f"<img src='{frames[start]}'><br>"
        f"<input type='range' min='0' max='{len(frames) - 1}' value='{start}' style='width:100%'>"
        f"<script>(function(){{var f=[{data}];var r=document.getElementById('{uid}');"
        "var i=r.querySelector('img'),s=r.querySelector('input'),n=r.querySelector('.slice');"
        "s.addEventListener('input',function(){i.src=f[s.value];n.textContent=Number(s.value)+1;});})();"
        "</script></figure>"
    )
