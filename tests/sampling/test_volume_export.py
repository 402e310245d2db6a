"""Synthetic 3D volumes as NIfTI and DICOM series on the training grid, marked synthetic, listed in a manifest."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from meddiff.data.phantom3d import render_brain_phantom
from meddiff.data.volume_io import read_volume
from meddiff.errors import MeddiffError
from meddiff.sampling.volume_export import (
    SYNTHETIC_DESCRIPTION,
    VolumeExportOptions,
    export_volumes,
    generate_volumes,
    to_unit_range,
    write_volume_dicom,
    write_volume_nifti,
)

AFFINE = np.array([[2.0, 0, 0, -15], [0, 3.0, 0, 20], [0, 0, 4.0, -7], [0, 0, 0, 1]])  # anisotropic, off-centre


def phantom_volume(seed=1, shape=(16, 16, 12)) -> np.ndarray:
    """A (X, Y, Z) phantom in [-1, 1], anisotropic in shape so axis mix-ups show."""
    image = render_brain_phantom(seed, 16).image
    return image[: shape[0], : shape[1], : shape[2]] * 2 - 1


def read_manifest(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-6), ("int16", 1e-4)])
def test_nifti_round_trip_keeps_grid_and_says_synthetic(tmp_path, dtype, tolerance):
    volume01 = to_unit_range(phantom_volume())
    path = write_volume_nifti(tmp_path / "v.nii.gz", volume01, AFFINE, dtype, note="seed 7")
    image = nib.load(str(path))
    assert image.shape == volume01.shape
    np.testing.assert_allclose(image.affine, AFFINE)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert image.header.get_zooms() == (2.0, 3.0, 4.0)
    assert image.header.get_data_dtype() == np.dtype(dtype)
    description = image.header["descrip"].item().decode()
    assert description.startswith(SYNTHETIC_DESCRIPTION) and "seed 7" in description
    assert np.abs(image.get_fdata() - volume01).max() < tolerance
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]  # no temporary file left


def test_dicom_series_has_the_grid_geometry(tmp_path):
    volume01 = to_unit_range(phantom_volume())
    paths = write_volume_dicom(tmp_path / "series", volume01, AFFINE, "root", 3, {"seed": "11"}, "flair")
    assert len(paths) == volume01.shape[2]
    slices = [pydicom.dcmread(p) for p in sorted((tmp_path / "series").iterdir())]
    assert [int(ds.InstanceNumber) for ds in slices] == list(range(1, 13))
    first = slices[0]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # standard axial
    assert [float(v) for v in first.PixelSpacing] == [3.0, 2.0]  # between rows (Y), between columns (X)
    assert float(first.SliceThickness) == 4.0 and (first.Rows, first.Columns) == (16, 16)
    # slice k sits at z = -7 + 4k; its first pixel is the voxel (X-1, Y-1, k) in LPS
    for k, ds in enumerate(slices):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        assert (x, y, z) == pytest.approx((15 - 2 * 15, -(20 + 3 * 15), -7 + 4 * k))
    assert "SYNTHETIC" in first.SeriesDescription and "not for diagnosis" in first.ImageComments
    assert first.ConversionType == "SYN" and "seed=11" in first.ImageComments
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1 and len({ds.SOPInstanceUID for ds in slices}) == 12
    # the project's reader sorts the slices by position and gets the same voxels and affine back
    data, affine = read_volume(tmp_path / "series")
    np.testing.assert_allclose(affine, AFFINE)
    assert np.abs(data - volume01).max() < 1e-4
    # deterministic: the same call writes the same bytes
    again = write_volume_dicom(tmp_path / "again", volume01, AFFINE, "root", 3, {"seed": "11"}, "flair")
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_export_writes_files_and_manifest_rows(tmp_path):
    volumes = np.stack([np.stack([phantom_volume(s), -phantom_volume(s)]) for s in (1, 2)])  # (2, 2, X, Y, Z)
    labels, known = torch.tensor([[1.0, 12.5], [0.0, 0.0]]), torch.tensor([[True, True], [True, False]])
    result = export_volumes(
        volumes,
        tmp_path,
        AFFINE,
        ["flair", "t1c"],
        labels,
        known,
        ["Tumour", "Tumour volume mL"],
        [101, 102],
        VolumeExportOptions(format="both"),
        run={"model": "m", "guidance": 2.0, "steps": 5},
    )
    rows = read_manifest(result.manifest)
    assert list(rows[0])[:6] == ["path", "flair", "t1c", "dicom", "dicom_flair", "dicom_t1c"]
    assert rows[0]["path"] == "volumes/0000000_flair.nii.gz" and rows[1]["t1c"] == "volumes/0000001_t1c.nii.gz"
    assert rows[0]["dicom_t1c"] == "dicom/0000000_t1c"
    assert (rows[0]["Tumour"], rows[0]["Tumour volume mL"], rows[1]["Tumour volume mL"]) == ("1", "12.5", "")
    assert (rows[1]["seed"], rows[1]["model"], rows[1]["steps"]) == ("102", "m", "5")
    for row in rows:
        for column in ("flair", "t1c"):
            data, affine = read_volume(tmp_path / row[column])
            np.testing.assert_allclose(affine, AFFINE)
        assert len(list((tmp_path / row["dicom_t1c"]).iterdir())) == 12
    second_t1c, _ = read_volume(tmp_path / rows[1]["t1c"])
    assert np.abs(second_t1c - to_unit_range(-phantom_volume(2))).max() < 1e-6  # right volume, right channel


def test_bad_volumes_are_one_line_errors(tmp_path):
    with pytest.raises(MeddiffError, match="3D"):
        write_volume_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4)), AFFINE)
    with pytest.raises(MeddiffError, match="4x4"):
        write_volume_nifti(tmp_path / "x.nii.gz", np.zeros((4, 4, 4)), np.eye(3))
    with pytest.raises(MeddiffError, match="channels"):
        export_volumes(
            np.zeros((1, 3, 4, 4, 4)), tmp_path, AFFINE, ["a"], torch.zeros(1, 0), torch.zeros(1, 0), [], [0]
        )
    with pytest.raises(MeddiffError, match="format"):
        VolumeExportOptions(format="png")


def test_generate_is_deterministic_per_seed_and_index_and_resumes(tmp_path):
    from tests.models.test_volume import tiny_pipeline

    pipe = tiny_pipeline(size=16, channels=1, labels=["tumour"])
    pipe.grid.affine = AFFINE.tolist()
    labels, known = torch.tensor([[1.0], [0.0], [1.0]]), torch.ones(3, 1, dtype=torch.bool)
    kw = dict(seed=5, guidance=1.5, steps=1, model_id="tiny")
    full = generate_volumes(pipe, labels, known, tmp_path / "a", **kw)
    assert (full.written, full.skipped) == (3, 0)
    rows = read_manifest(full.manifest)
    assert [r["tumour"] for r in rows] == ["1", "0", "1"] and len({r["seed"] for r in rows}) == 3
    again = generate_volumes(pipe, labels, known, tmp_path / "b", **kw)  # the same run elsewhere: the same bytes
    assert all((tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes() for r in rows)
    assert again.written == 3
    data, affine = read_volume(tmp_path / "a" / rows[0]["path"])
    assert data.shape == (16, 16, 16)
    np.testing.assert_allclose(affine, AFFINE)
    # volume 1 drawn alone (a resumed run) is the volume the full run drew
    before = (tmp_path / "a" / rows[1]["path"]).read_bytes()
    (tmp_path / "a" / rows[1]["path"]).unlink()
    resumed = generate_volumes(pipe, labels, known, tmp_path / "a", **kw)
    assert (resumed.written, resumed.skipped) == (1, 2)
    assert (tmp_path / "a" / rows[1]["path"]).read_bytes() == before
    other_seed = generate_volumes(pipe, labels, known, tmp_path / "c", **{**kw, "seed": 6})
    assert read_manifest(other_seed.manifest)[1]["seed"] != rows[1]["seed"]
    assert (tmp_path / "c" / rows[1]["path"]).read_bytes() != before
    with pytest.raises(MeddiffError, match="labels"):
        generate_volumes(pipe, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), tmp_path / "d")


def test_a_manifest_reads_back_as_volumes_labelled_by_its_label_columns_only(tmp_path, monkeypatch):
    from meddiff.data.spec import load_dataset
    from meddiff.data.volume_sources import RESERVED_COLUMNS
    from meddiff.sampling.volume_export import RUN_COLUMNS
    from tests.models.test_volume import tiny_pipeline

    assert set(RUN_COLUMNS) <= RESERVED_COLUMNS  # seed, guidance, steps, model are never labels
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))
    pipe = tiny_pipeline(size=16, channels=1, labels=["tumour"])
    pipe.grid.affine = AFFINE.tolist()
    labels, known = torch.tensor([[1.0], [0.0]]), torch.ones(2, 1, dtype=torch.bool)
    written = generate_volumes(pipe, labels, known, tmp_path / "out", seed=1, guidance=1.5, steps=1, model_id="tiny")
    back = load_dataset(f"volumes:{written.manifest}?shape=16", 16)
    assert back.label_names == ["tumour"] and back.labels[:, 0].tolist() == [1.0, 0.0] and len(back) == 2


BRATS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "brats-deepmedic"


@pytest.mark.skipif(not BRATS.is_dir(), reason="real BraTS cases (../shared/data/brats-deepmedic) not present")
def test_a_real_brats_volume_keeps_its_geometry_through_nifti_and_dicom(tmp_path):
    """A scanner-space case stored LPS: read as RAS, written both ways, read back on the same voxels and mm."""
    case = sorted((BRATS / "train").iterdir())[0]
    data, affine = read_volume(case / "Flair_subtrMeanDivStd.nii.gz")
    volume = (data - data.min()) / (data.max() - data.min()) * 2 - 1
    result = export_volumes(
        volume[None, None],
        tmp_path,
        affine,
        ["flair"],
        torch.zeros(1, 0),
        torch.zeros(1, 0, dtype=torch.bool),
        [],
        [0],
        VolumeExportOptions(format="both", dtype="int16"),
    )
    row = read_manifest(result.manifest)[0]
    for column, tolerance in (("path", 1e-4), ("dicom", 2e-5)):
        back, back_affine = read_volume(tmp_path / row[column])
        np.testing.assert_allclose(back_affine, affine)
        assert np.abs(back - to_unit_range(volume)).max() < tolerance
