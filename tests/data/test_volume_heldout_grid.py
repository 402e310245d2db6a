"""`volumes:` with the automatic spacing: held-out splits are resampled on the training split's grid, so models
are evaluated on volumes at the voxel size they were trained on (found on real BraTS cases, where the three
splits' own automatic spacings were 2.69, 2.57 and 2.81 mm at 64^3)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff.data.spec import load_dataset


def _head(path: Path, shape, size) -> None:
    """A bright textured ellipsoid of `size` voxels along each axis (1 mm) in a zero volume of `shape`."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape) - 1) / 2
    axes = np.asarray(size, np.float32) / 2
    inside = (((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0) < 1
    data = inside * (100 + np.random.default_rng(0).normal(0, 5, shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))


def test_heldout_splits_share_the_training_spacing(tmp_path):
    _head(tmp_path / "train" / "a.nii.gz", (40, 40, 40), (20, 24, 16))
    _head(tmp_path / "valid" / "b.nii.gz", (48, 48, 48), (36, 36, 30))  # a bigger head: its own fit is coarser
    _head(tmp_path / "test" / "c.nii.gz", (40, 40, 40), (12, 12, 12))
    spec = f"volumes:{tmp_path}?shape=16"
    train = load_dataset(spec, 16)
    assert 24 / 16 < train.spacing[0] < 28 / 16  # the training foreground (24 mm and its smoothed edge) fits the grid
    for split in ("valid", "test"):
        heldout = load_dataset(f"{spec}&split={split}", 16)
        assert heldout.spacing == train.spacing and heldout.shape == train.shape
    own = load_dataset(f"volumes:{tmp_path / 'valid'}?split=all&shape=16", 16)  # that case on its own
    assert own.spacing[0] > 1.4 * train.spacing[0]
    explicit = load_dataset(f"{spec}&split=valid&spacing=3", 16)  # a given spacing is kept
    assert explicit.spacing == pytest.approx((3.0, 3.0, 3.0))


def test_heldout_split_without_a_training_split_fits_its_own(tmp_path):
    _head(tmp_path / "test" / "c.nii.gz", (40, 40, 40), (24, 24, 24))
    ds = load_dataset(f"volumes:{tmp_path}?shape=16&split=test", 16)
    assert 24 / 16 < ds.spacing[0] < 28 / 16
