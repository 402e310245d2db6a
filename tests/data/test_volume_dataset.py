"""`volumes:` and `phantom3d:` datasets: layouts, reorientation, resampling, normalisation, the memory-mapped
cache, masks as labels, DICOM series, bad input, and real BraTS cases (skipped when absent)."""

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff.data.phantom3d import render_brain_phantom, write_phantom_volumes
from meddiff.data.spec import load_dataset
from meddiff.data.volume_io import read_volume
from meddiff.errors import MeddiffError

BRATS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brats-deepmedic"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms3d")
    write_phantom_volumes(out, n=6, size=32, seed=4, progress=False)
    return out


def _save(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), str(path))
    return path


def _head(shape=(20, 24, 16), seed=0) -> np.ndarray:
    """A bright ellipsoid on a zero background with some texture."""
    grid = np.indices(shape).astype(np.float32)
    centre, axes = (np.asarray(shape) - 1) / 2, np.asarray(shape) * 0.35
    inside = (((grid - centre[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0) < 1
    return inside * (100 + np.random.default_rng(seed).normal(0, 5, shape)).astype(np.float32)


def test_phantom_folder_items_keep_the_written_grid_labels_and_intensities(phantoms):
    ds = load_dataset(f"phantom3d:{phantoms}", 32)
    rows = list(csv.DictReader(open(phantoms / "train.csv")))
    assert len(ds) == len(rows) == 5 and ds.label_names == ["Tumour", "Tumour volume mL"]
    item = ds[0]
    assert set(item) == {"image", "labels", "known"}
    assert item["image"].shape == (1, 32, 32, 32) and item["image"].dtype == torch.float32
    assert item["labels"].shape == item["known"].shape == (2,) and bool(item["known"].all())
    assert -1 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert ds.labels[:, 0].tolist() == [float(r["Tumour"]) for r in rows]
    assert ds.labels[:, 1].tolist() == pytest.approx([float(r["Tumour volume mL"]) for r in rows], abs=1e-3)
    assert ds.spacing == pytest.approx((6.5, 6.5, 6.5)) and nib.aff2axcodes(ds.affine) == ("R", "A", "S")
    truth = render_brain_phantom(4 * 1_000_003, 32, tumour=True, side="left").image
    assert np.abs(item["image"].numpy()[0] - (truth * 2 - 1)).max() < 0.01  # same grid: no resampling blur
    assert isinstance(ds.images, np.memmap)  # read from the map, not held in memory
    valid = load_dataset(f"phantom3d:{phantoms}?split=valid", 32)
    assert len(valid) == 1 and valid.case_ids != ds.case_ids


def test_cache_is_reused_and_keyed_by_options(phantoms):
    a = load_dataset(f"phantom3d:{phantoms}", 32)
    b = load_dataset(f"phantom3d:{phantoms}", 32)
    c = load_dataset(f"phantom3d:{phantoms}?shape=16", 32)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert c[0]["image"].shape == (1, 16, 16, 16) and c.spacing == pytest.approx((13.0,) * 3)


def test_labels_from_masks_give_tumour_presence_and_volume(phantoms):
    ds = load_dataset(f"volumes:{phantoms}/train.csv?label_from_mask=1&mask_labels=1,4&shape=32", 32)
    rows = list(csv.DictReader(open(phantoms / "train.csv")))
    assert ds.label_names == ["Tumour", "Tumour volume mL"]
    assert ds.labels[:, 0].tolist() == [float(r["Tumour"]) for r in rows]
    for got, row in zip(ds.labels[:, 1].tolist(), rows):
        want = float(row["Tumour volume mL"])
        assert got == pytest.approx(want, rel=0.1, abs=0.01)
    whole = load_dataset(f"volumes:{phantoms}/train.csv?label_from_mask=1&shape=32", 32)  # oedema included
    assert (whole.labels[:, 1] >= ds.labels[:, 1]).all() and whole.labels[0, 1] > 1.5 * ds.labels[0, 1]


def test_volumes_are_reoriented_to_ras_and_resampled_around_the_foreground(tmp_path):
    data = _head()
    data[2:5, 10:14, 6:10] = 400  # a marker at low first-axis indices
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # first axis runs to the patient's left: the marker is on the right
    _save(tmp_path / "vols" / "case_a.nii.gz", data, lps)
    ds = load_dataset(f"volumes:{tmp_path / 'vols'}?split=all&shape=16&spacing=2", 16)
    image = ds[0]["image"][0].numpy()
    assert image.shape == (16, 16, 16) and nib.aff2axcodes(ds.affine) == ("R", "A", "S")
    marker = np.argwhere(image > 0.9).mean(0)
    assert marker[0] > 10  # RAS: right = high x index
    ds3 = load_dataset(f"volumes:{tmp_path / 'vols'}?split=all&shape=16&normalize=zscore", 16)
    assert ds3.spacing[0] == ds3.spacing[2]  # automatic: isotropic, the largest foreground fits
    fg = ds3[0]["image"][0] > -1
    assert fg[0].sum() == 0 and fg[-1].sum() == 0 and fg.sum() > 0.2 * 16**3  # centred, filling the grid


def test_dicom_series_is_sorted_by_position_and_gets_a_ras_affine(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    volume = (_head((12, 14, 10)) + np.arange(10)[None, None, :] * 20).astype(np.uint16)
    series = generate_uid()
    for k in np.random.default_rng(0).permutation(10):  # files written in a shuffled order
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / "s" / f"{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = MRImageStorage, generate_uid(), series
        ds.Modality = "MR"
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # axial
        ds.ImagePositionPatient = [0, 0, 2.5 * float(k)]
        ds.PixelSpacing = [0.8, 0.9]
        ds.PixelData = np.ascontiguousarray(volume[:, :, k]).tobytes()
        (tmp_path / "s").mkdir(exist_ok=True)
        pydicom.dcmwrite(
            tmp_path / "s" / f"{k * 7 % 10:03d}.dcm", ds, enforce_file_format=True
        )  # name order != position order
    data, affine = read_volume(tmp_path / "s")
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and data.shape == (14, 12, 10)
    assert np.sqrt((affine[:3, :3] ** 2).sum(0)) == pytest.approx([0.9, 0.8, 2.5])
    # rows run posterior and columns left (LPS): RAS order swaps and flips them; slices sorted by position
    assert np.array_equal(data, np.flip(volume.transpose(1, 0, 2), (0, 1)).astype(np.float32))
    ds = load_dataset(f"volumes:{tmp_path}?split=all&shape=16", 16)
    assert len(ds) == 1 and ds[0]["image"].shape == (1, 16, 16, 16)


def test_bad_volumes_are_counted_skips_with_reasons(tmp_path, caplog):
    root = tmp_path / "cases"
    _save(root / "good" / "flair.nii.gz", _head())
    _save(root / "good" / "t1c.nii.gz", _head(seed=1))
    _save(root / "flat" / "flair.nii.gz", np.ones((20, 24)))  # a 2D image
    _save(root / "flat" / "t1c.nii.gz", np.ones((20, 24)))
    _save(root / "mismatch" / "flair.nii.gz", _head())
    _save(root / "mismatch" / "t1c.nii.gz", _head((20, 24, 12)))
    _save(root / "missing" / "flair.nii.gz", _head())
    _save(root / "zero" / "flair.nii.gz", np.zeros((20, 24, 16)))
    _save(root / "zero" / "t1c.nii.gz", _head())
    (root / "corrupt").mkdir()
    (root / "corrupt" / "flair.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 20)[:60])
    _save(root / "corrupt" / "t1c.nii.gz", _head())
    ds = load_dataset(f"volumes:{root}?split=all&modalities=flair,t1c&shape=16", 16)
    assert len(ds) == 1 and ds.case_ids == ["good"] and ds.shape == (2, 16, 16, 16)
    assert ds.skipped == 5
    reasons = " | ".join(reason for _, reason in ds.problems)
    for words in ("2D image", "modality shapes differ", "no file for 't1c'", "constant", "not a readable NIfTI"):
        assert words in reasons, (words, reasons)
    assert "skipped 5 of 6 cases" in caplog.text
    with pytest.raises(MeddiffError, match="holds no usable volumes") as err:
        load_dataset(f"volumes:{root}?split=all&modalities=flair,t1c,t2&shape=16", 16)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "query, message",
    [
        ("shape=abc", "shape="),
        ("shape=4", "shape="),
        ("normalize=max", "normalize="),
        ("spacing=-1", "spacing="),
        ("colour=red", "unknown option"),
        ("split=dev", "split="),
        ("percentiles=90,10", "percentiles="),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, query, message):
    _save(tmp_path / "a.nii.gz", _head())
    with pytest.raises(MeddiffError, match=message):
        load_dataset(f"volumes:{tmp_path}?{query}", 16)


def test_missing_paths_and_tables_are_one_line_errors(tmp_path):
    with pytest.raises(MeddiffError, match="does not exist"):
        load_dataset(f"volumes:{tmp_path / 'nope'}", 16)
    (tmp_path / "t.csv").write_text("file,Tumour\na.nii.gz,1\n")
    with pytest.raises(MeddiffError, match="'path' column"):
        load_dataset(f"volumes:{tmp_path / 't.csv'}", 16)
    with pytest.raises(MeddiffError, match="no valid.csv|no train.csv"):
        load_dataset(f"phantom3d:{tmp_path}", 16)


@pytest.mark.skipif(not BRATS.is_dir(), reason="BraTS cases not present (../shared/data/brats-deepmedic)")
def test_brats_cases_load_resampled_with_tumour_labels_from_the_mask():
    spec = f"volumes:{BRATS}?split=test&modalities=flair,t1c&label_from_mask=OTMultiClass&brainmask=brainmask&shape=32"
    ds = load_dataset(spec, 32)
    assert len(ds) == 2 and ds.channel_names == ["flair", "t1c"] and ds.skipped == 0
    assert ds[0]["image"].shape == (2, 32, 32, 32)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.2
    assert (ds.labels[:, 0] == 1).all() and (ds.labels[:, 1] > 5).all()  # BraTS tumours: tens of mL
    mask = nib.load(str(BRATS / "test" / ds.case_ids[0] / "OTMultiClass.nii.gz"))
    want = float((np.asarray(mask.dataobj) > 0).sum()) * float(np.prod(mask.header.get_zooms())) / 1000
    assert float(ds.labels[0, 1]) == pytest.approx(want, rel=1e-3)
    assert max(ds.spacing) > 4  # 240 x 240 x 155 mm brains into 32^3
    brain = images[:, 0] > -1
    assert brain.float().mean() > 0.2  # cropped around the brain (the whole 240 mm field of view: ~0.1)
