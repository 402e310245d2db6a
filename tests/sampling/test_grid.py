"""meddiff.sampling.grid: image grids for people to look at."""

import io

import numpy as np
from PIL import Image

from meddiff.sampling.grid import grid_png_bytes, make_grid, save_grid, upscale_for


def test_images_land_in_row_major_cells_with_white_padding():
    images = np.stack([np.full((3, 4), i / 10, np.float32) for i in range(5)])
    grid = make_grid(images, columns=2, pad=1)
    assert grid.shape == (3 * (3 + 1) + 1, 2 * (4 + 1) + 1)  # 3 rows of 2 columns
    for i in range(5):
        r, c = divmod(i, 2)
        top, left = 1 + r * 4, 1 + c * 5
        assert np.all(grid[top : top + 3, left : left + 4] == np.float32(i / 10)), i
    assert np.all(grid[0] == 1.0) and np.all(grid[:, 0] == 1.0)
    assert np.all(grid[9:12, 6:10] == 1.0)  # the empty sixth cell stays white


def test_default_columns_make_a_square_and_upscale_repeats_pixels():
    assert make_grid(np.zeros((9, 2, 2), np.float32), pad=0).shape == (6, 6)
    assert make_grid(np.zeros((10, 2, 2), np.float32), pad=0).shape == (6, 8)  # 4 columns, 3 rows
    big = make_grid(np.eye(2, dtype=np.float32)[None], pad=0, upscale=3)
    assert big.shape == (6, 6) and np.all(big[:3, :3] == 1) and np.all(big[:3, 3:] == 0)


def test_png_bytes_and_saved_file(tmp_path):
    images = np.stack([np.zeros((4, 4), np.float32), np.ones((4, 4), np.float32)])
    with Image.open(io.BytesIO(grid_png_bytes(images, columns=2))) as im:
        assert im.mode == "L" and im.size == (2 * 6 + 2, 6 + 2)  # (width, height), 2 px padding
        pixels = np.asarray(im)
    assert pixels[2:6, 2:6].max() == 0 and pixels[2:6, 8:12].min() == 255
    path = save_grid(tmp_path / "sub" / "g.png", images, columns=1, upscale=2)
    with Image.open(path) as im:
        assert im.size == (2 * 8, 2 * 14)


def test_upscale_for_small_images():
    assert [upscale_for(r) for r in (16, 28, 32, 64, 128, 256)] == [8, 4, 4, 2, 1, 1]
