"""Tri-planar montages, slice-sweep GIFs and the slice slider of 3D volumes."""

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.errors import MeddiffError
from meddiff.evaluation.report import html_page
from meddiff.evaluation.volume_views import (
    GAP,
    TITLE_HEIGHT,
    montage,
    plane_slice,
    real_vs_synthetic_png,
    slice_slider_html,
    sweep_gif,
    tri_planar,
)


def marked_volume(shape=(16, 20, 12)) -> np.ndarray:
    """-1 everywhere but one bright voxel near the patient's right, anterior, superior corner."""
    volume = -np.ones(shape, np.float32)
    volume[shape[0] - 2, shape[1] - 3, shape[2] - 4] = 1.0
    return volume


def test_slices_are_oriented_the_radiological_way():
    volume = (marked_volume() + 1) / 2
    x, y, z = volume.shape[0] - 2, volume.shape[1] - 3, volume.shape[2] - 4
    axial = plane_slice(volume, "axial", z)
    assert axial.shape == (20, 16) and axial[2, 1] == 1  # anterior at the top, patient right on the left
    coronal = plane_slice(volume, "coronal", y)
    assert coronal.shape == (12, 16) and coronal[3, 1] == 1  # superior at the top
    sagittal = plane_slice(volume, "sagittal", x)
    assert sagittal.shape == (12, 20) and sagittal[3, 2] == 1  # anterior on the left
    assert all(s.max() == 1 for s in tri_planar(volume, (x, y, z)).values())
    assert all(s.max() == 0 for s in tri_planar(volume).values())  # the centre misses the marked voxel
    with pytest.raises(MeddiffError, match="not a voxel"):
        tri_planar(volume, (0, 0, 99))
    with pytest.raises(MeddiffError, match="plane"):
        plane_slice(volume, "oblique", 0)


def test_montage_puts_real_next_to_synthetic_at_the_voxel_spacing(tmp_path):
    real = [marked_volume(), torch.from_numpy(marked_volume())[None]]  # arrays and (C, X, Y, Z) tensors
    synthetic = [np.zeros((16, 20, 12), np.float32)]
    png = real_vs_synthetic_png(real, synthetic, tmp_path / "views" / "montage.png", spacing=(1, 1, 2), scale=1)
    image = Image.open(io.BytesIO(png))
    assert (tmp_path / "views" / "montage.png").read_bytes() == png
    # columns: 3 volumes of width max(X, Y) = 20 px; rows: axial 20, coronal 12 * 2 mm, sagittal 12 * 2 mm
    assert image.size == (3 * 20 + 4 * GAP, TITLE_HEIGHT + 20 + 24 + 24 + 4 * GAP)
    pixels = np.asarray(image)
    third = pixels[TITLE_HEIGHT + GAP :, 2 * (20 + GAP) + GAP :]
    assert (third[:20, :16] == 128).all()  # synthetic column: 0 -> mid grey
    with pytest.raises(MeddiffError, match="titles"):
        montage([marked_volume()], ["a", "b"])
    with pytest.raises(MeddiffError, match="no volumes"):
        montage([])


def test_sweep_gif_has_a_frame_per_slice(tmp_path):
    volume = np.linspace(-1, 1, 16 * 20 * 12, dtype=np.float32).reshape(16, 20, 12)
    path = sweep_gif(volume, tmp_path / "gifs" / "v.gif", plane="coronal", fps=5, scale=2)
    gif = Image.open(path)
    assert gif.n_frames == 20 and gif.size == (32, 24)
    assert gif.info["duration"] == 200 and gif.info["loop"] == 0
    assert Image.open(sweep_gif(volume, tmp_path / "every3.gif", plane="coronal", step=3)).n_frames == 7
    with pytest.raises(MeddiffError, match="step"):
        sweep_gif(volume, tmp_path / "bad.gif", step=0)


def test_slider_html_embeds_every_frame():
    volume = np.random.default_rng(0).uniform(-1, 1, (16, 16, 12)).astype(np.float32)
    snippet = slice_slider_html(volume, "synthetic <1>", plane="axial", scale=1)
    frames = re.findall(r'"data:image/png;base64,([^"]+)"', snippet)
    assert len(frames) == 12
    middle = np.asarray(Image.open(io.BytesIO(base64.b64decode(frames[6]))))
    np.testing.assert_array_equal(middle, np.round((volume[::-1, ::-1, 6].T + 1) / 2 * 255).astype(np.uint8))
    assert "max='11'" in snippet and "value='6'" in snippet and "synthetic &lt;1&gt;" in snippet
    assert "addEventListener('input'" in snippet
    page = html_page("volumes", [("slider", snippet)])
    assert snippet in page
    assert slice_slider_html(volume, "other", scale=1) != snippet  # a distinct element id per slider
