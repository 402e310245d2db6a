"""3D metrics on tiny phantom volumes: slice FID/KID per plane, slice consistency, 3D SSIM diversity, memorization."""

from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddiff.data.phantom3d import render_brain_phantom
from meddiff.errors import MeddiffError
from meddiff.evaluation.volume_metrics import (
    PLANES,
    VolumeMemorization,
    pairwise_similarity,
    plane_slices,
    slice_consistency,
    slice_distances,
    slice_indices,
    volume_diversity,
    volume_memorization,
)

SIZE = 24


@cache
def phantoms(first_seed: int, n: int) -> np.ndarray:
    """(n, X, Y, Z) phantoms in [-1, 1] (read-only: copy before changing)."""
    out = np.stack([render_brain_phantom(first_seed + i, SIZE).image * 2 - 1 for i in range(n)])
    out.setflags(write=False)
    return out


def pooled_features(slices: torch.Tensor) -> np.ndarray:
    """A small stand-in for a feature network: pooled intensities and pooled edge strengths."""
    dy, dx = (slices.diff(dim=d).abs() for d in (-2, -1))
    return torch.cat([F.adaptive_avg_pool2d(t, 4).flatten(1) for t in (slices, dy, dx)], 1).numpy()


def test_slices_come_from_the_centre_of_each_axis():
    assert slice_indices(24, None, 0.5) == list(range(6, 18))
    assert slice_indices(24, 4, 0.5) == [6, 10, 13, 17]
    volumes = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    assert plane_slices(volumes, "axial", None, 1.0).shape == (2, 5, 1, 3, 4)
    assert plane_slices(volumes, "coronal", None, 1.0).shape == (2, 4, 1, 3, 5)
    sagittal = plane_slices(volumes, "sagittal", None, 1.0)
    assert sagittal.shape == (2, 3, 1, 4, 5) and torch.equal(sagittal[1, 2, 0], volumes[1, 0, 2])
    with pytest.raises(MeddiffError, match="plane"):
        plane_slices(volumes, "oblique")


def test_slice_fid_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = phantoms(0, 8)
    same = slice_distances(real, real.copy(), pooled_features, n_boot=20)
    assert set(same.planes) == set(PLANES) and same.feature_dim == 48
    for plane in same.planes.values():
        assert abs(plane.fid) < 1e-6 and abs(plane.kid) < 0.01
        assert plane.fid_ci95[0] == 0.0 <= plane.fid_ci95[1]  # the interval holds the estimate
        assert (plane.real_volumes, plane.synthetic_volumes) == (8, 8) and plane.real_slices == 8 * 16
    other = slice_distances(real, phantoms(100, 8), pooled_features, n_boot=20)
    shifted = slice_distances(real, np.clip(phantoms(100, 8) + 0.3, -1, 1), pooled_features, n_boot=20)
    for plane in PLANES:
        fresh, moved = other.planes[plane], shifted.planes[plane]
        assert 1e-4 < fresh.fid < moved.fid / 10 and fresh.kid < moved.kid
        assert moved.fid_ci95[0] <= moved.fid <= moved.fid_ci95[1]
    assert other.mean_fid == pytest.approx(np.mean([p.fid for p in other.planes.values()]))
    assert shifted.to_dict()["planes"]["axial"]["fid"] == shifted.planes["axial"].fid  # JSON form


def test_slice_fid_checks_its_inputs():
    real = phantoms(0, 2)
    with pytest.raises(MeddiffError, match="same grid"):
        slice_distances(real, real[:, :16], pooled_features)
    with pytest.raises(MeddiffError, match="channel"):
        slice_distances(real, real, pooled_features, channel=1)
    with pytest.raises(MeddiffError, match=r"\(N, C, X, Y, Z\)"):
        slice_distances(real[0], real, pooled_features)


def test_slice_consistency_sees_volumes_stacked_from_unrelated_slices():
    real, heldout = phantoms(0, 8), phantoms(100, 8)
    # every axial slice is a real one, but neighbouring slices come from different volumes: a 2D model's stack
    stacked = heldout.copy()
    rng = np.random.default_rng(0)
    for z in range(SIZE):
        stacked[..., z] = heldout[rng.permutation(8), :, :, z]
    honest = slice_consistency(slice_distances(real, heldout, pooled_features, n_boot=0), real, heldout)
    distances = slice_distances(real, stacked, pooled_features, n_boot=0)
    broken = slice_consistency(distances, real, stacked)
    assert broken.fid["axial"] == pytest.approx(honest.fid["axial"])  # the same axial slices
    assert broken.orthogonal_ratio > 1.5 * honest.orthogonal_ratio and broken.orthogonal_ratio > 1
    expected = (distances.planes["coronal"].fid + distances.planes["sagittal"].fid) / 2 / distances.planes["axial"].fid
    assert broken.orthogonal_ratio == pytest.approx(expected)
    assert broken.adjacent_synthetic["axial"] < honest.adjacent_synthetic["axial"]
    same = slice_consistency(slice_distances(real, real, pooled_features, n_boot=0), real, real)
    assert same.orthogonal_ratio is None  # FID 0 in the acquisition plane: no ratio
    with pytest.raises(MeddiffError, match="acquisition plane"):
        slice_consistency(slice_distances(real, real, pooled_features, planes=["axial"], n_boot=0), real, real)


def test_diversity_of_identical_copies_is_one():
    real = phantoms(0, 4)
    copies = np.stack([real[0]] * 3)
    result = volume_diversity(real, copies)
    assert result.metric == "SSIM" and result.synthetic == pytest.approx(1.0, abs=1e-5)
    assert (result.real_pairs, result.synthetic_pairs) == (6, 3)
    assert 0 < result.real < 0.95
    assert pairwise_similarity(real[:1]) == (None, "n/a", 0)
    value, _, pairs = pairwise_similarity(real, max_pairs=2)
    assert pairs == 2 and 0 < value < 1
    two_channels = torch.from_numpy(np.stack([copies, -copies], 1))  # (N, C, X, Y, Z)
    assert pairwise_similarity(two_channels)[0] == pytest.approx(1.0, abs=1e-5)


def test_memorization_flags_copies_and_partial_copies_not_fresh_volumes():
    train, heldout = phantoms(0, 8), phantoms(100, 10)
    fresh = phantoms(200, 2)
    partial = phantoms(300, 1)[0].copy()
    partial[:, :, 9:15] = train[3][:, :, 9:15]  # six axial slices of a training volume
    synthetic = np.stack([fresh[0], fresh[1], train[5], partial])
    audit = volume_memorization(synthetic, train, heldout)
    assert isinstance(audit, VolumeMemorization) and audit.thresholds_from == "held-out"
    # thresholds are quantiles of held-out real volumes: a fresh volume is flagged about as often as one of them
    assert audit.flagged == [False, False, True, True]
    assert audit.volume_match[2] == 5 and audit.volume_similarity[2] == pytest.approx(1.0)
    assert audit.knn_ratio[2] == pytest.approx(0.0, abs=1e-6) and audit.slice_match[2] == 5
    assert audit.volume_similarity[3] < audit.volume_threshold  # the whole volume does not look copied...
    assert audit.slice_similarity[3] == pytest.approx(1.0) and audit.slice_match[3] == 3  # ...its slices do
    assert audit.rate_flagged == 0.5 and audit.max_slice_similarity == pytest.approx(1.0)
    saved = audit.to_dict(saved_only=True)
    assert "volume_similarity" not in saved and saved["rate_slice"] == 0.5
    fixed = volume_memorization(synthetic[2:3], train)
    assert fixed.thresholds_from == "fixed" and fixed.flagged == [True]
    with pytest.raises(MeddiffError, match="differ in shape"):
        volume_memorization(synthetic[:, :16], train)
    with pytest.raises(MeddiffError, match="at least 2 training"):
        volume_memorization(synthetic, train[:1])
