"""The 3D brain phantom: determinism, ground truth, the image-only tumour measurement and the NIfTI writer."""

import csv

import numpy as np
import pytest

from meddiff.data.phantom3d import (
    ENHANCING,
    NECROTIC,
    OEDEMA,
    measure_tumour,
    phantom_affine,
    render_brain_phantom,
    tumour_from_mask,
    write_phantom_volumes,
)
from meddiff.errors import MeddiffError


def test_same_seed_same_phantom_other_seed_other_phantom():
    a, b, c = (render_brain_phantom(s, 32) for s in (5, 5, 6))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.meta == b.meta
    assert not np.allclose(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.shape == (32, 32, 32) and 0 <= a.image.min() <= a.image.max() <= 1


def test_tumour_ground_truth_matches_the_request_and_the_mask():
    left = render_brain_phantom(3, 64, tumour=True, side="left", radius_mm=15)
    right = render_brain_phantom(3, 64, tumour=True, side="right", radius_mm=15)
    none = render_brain_phantom(3, 64, tumour=False)
    assert set(np.unique(left.mask)) == {0, NECROTIC, OEDEMA, ENHANCING}
    assert not none.mask.any() and none.tumour_volume_ml == 0 and none.side == "none"
    sphere_ml = 4 / 3 * np.pi * 15**3 / 1000
    assert abs(left.tumour_volume_ml - sphere_ml) / sphere_ml < 0.15  # a slightly irregular sphere
    for ph, side in ((left, "left"), (right, "right")):
        assert ph.side == side and ph.meta["radius_mm"] == 15
        assert (ph.meta["centre_mm"][0] < 0) == (side == "left")  # RAS: the patient's left is -x
        from_mask = tumour_from_mask(ph.mask, ph.spacing, labels=(NECROTIC, ENHANCING))
        assert from_mask.side == side and abs(from_mask.volume_ml - ph.tumour_volume_ml) / ph.tumour_volume_ml < 0.05
    # the enhancing rim is the brightest tissue and the necrotic core is dark
    assert left.image[left.mask == ENHANCING].mean() > 1.5 * left.image[(left.mask == 0) & (left.image > 0.2)].mean()
    assert left.image[left.mask == NECROTIC].mean() < left.image[left.mask == ENHANCING].mean() / 3


def test_head_fills_the_volume_at_every_size():
    for size in (32, 64):
        ph = render_brain_phantom(0, size)
        head = ph.image > 0.2
        extent = [np.ptp(np.nonzero(head.any(axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
        assert min(extent) > 0.6 * size and max(extent) < size - 1
        assert ph.spacing == pytest.approx(phantom_affine(size)[0, 0])


def test_measurement_is_exact_on_presence_and_side_and_close_on_volume():
    errors = []
    for seed in range(24):  # 64^3 (3.25 mm voxels): tumour cores of 4-35 mL, noise, bias, rotation
        ph = render_brain_phantom(500 + seed, 64, tumour=seed % 2 == 0, side=("left", "right")[(seed // 2) % 2])
        m = measure_tumour(ph.image, ph.spacing)
        assert (m.present, m.side) == (ph.tumour, ph.side), (seed, m)
        if ph.tumour:
            errors.append(abs(m.volume_ml - ph.tumour_volume_ml) / ph.tumour_volume_ml)
        else:
            assert m.volume_ml == 0
    assert np.mean(errors) < 0.04 and np.max(errors) < 0.1, errors


def test_measurement_reads_torch_model_range_and_other_orientations():
    import torch

    ph = render_brain_phantom(11, 64, tumour=True, side="left")
    model_range = torch.from_numpy(ph.image * 2 - 1)[None]  # (1, X, Y, Z) in [-1, 1]
    m = measure_tumour(model_range, ph.spacing)
    assert m.present and m.side == "left"
    flipped = ph.affine.copy()
    flipped[0] *= -1  # LAS: the first axis now runs to the patient's left; the same anatomy
    flipped[0, 3] = ph.affine[0, 3] + ph.spacing * 63
    las = measure_tumour(ph.image[::-1], affine=flipped)
    assert las.side == "left" and las.volume_ml == pytest.approx(m.volume_ml, rel=0.02)


def test_written_phantoms_read_back_with_shape_spacing_orientation_and_labels(tmp_path):
    import nibabel as nib

    counts = write_phantom_volumes(tmp_path, n=5, size=32, seed=2, valid_fraction=0.2, progress=False)
    assert counts == {"train": 4, "valid": 1}
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert list(rows[0]) == ["path", "mask", "Tumour", "Tumour volume mL", "side", "patient_id"]
    assert [r["Tumour"] for r in rows] == ["1", "0", "1", "0"] and rows[0]["side"] == "left"
    assert rows[2]["side"] == "right" and rows[1]["side"] == "none" and float(rows[1]["Tumour volume mL"]) == 0
    image = nib.load(tmp_path / rows[0]["path"])
    mask = nib.load(tmp_path / rows[0]["mask"])
    assert image.shape == (32, 32, 32) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert image.header.get_zooms() == pytest.approx((6.5, 6.5, 6.5)) and image.header.get_xyzt_units()[0] == "mm"
    assert np.allclose(image.affine, phantom_affine(32)) and np.allclose(mask.affine, image.affine)
    assert b"NOT medical data" in image.header["descrip"].tobytes()
    truth = render_brain_phantom(2 * 1_000_003, 32, tumour=True, side="left")
    assert np.abs(image.get_fdata() - truth.image).max() < 1e-3  # int16 with a scale factor
    assert np.array_equal(np.asarray(mask.dataobj), truth.mask)
    assert float(rows[0]["Tumour volume mL"]) == pytest.approx(truth.tumour_volume_ml, abs=1e-3)


def test_bad_writer_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(MeddiffError, match="--size"):
        write_phantom_volumes(tmp_path, n=4, size=8)
    with pytest.raises(MeddiffError, match="--n"):
        write_phantom_volumes(tmp_path, n=1, size=32)
