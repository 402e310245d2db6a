"""meddiff.sampling.export: synthetic images as DICOM Secondary Capture or 8/16-bit PNG, and their manifest.

Files are written directly from small arrays (no model), read back with pydicom / Pillow / the dataset readers."""

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image

from meddiff.data.chexpert_format import CHEXPERT_COLUMNS
from meddiff.data.io import read_image
from meddiff.sampling.export import (
    RUN_COLUMNS,
    SYNTHETIC_NOTE,
    image_name,
    manifest_columns,
    write_image,
    write_manifest,
)


@pytest.fixture
def ramp():
    """A 6x8 image covering [0, 1] with values that need 16 bits, plus out-of-range values to be clipped."""
    image = np.linspace(0.0, 1.0, 48, dtype=np.float32).reshape(6, 8)
    image[0, 0], image[-1, -1] = -0.5, 1.5
    return image


def test_dicom_round_trips_pixels_bit_depth_and_geometry(ramp, tmp_path):
    path = write_image(tmp_path, 3, ramp, "dicom", "model-a", {"prompt": "Edema"})
    assert path == tmp_path / "images" / "0000003.dcm"
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (6, 8)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
    assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
    expected = np.round(np.clip(ramp, 0, 1) * 65535).astype(np.uint16)
    assert ds.pixel_array.dtype == np.uint16
    np.testing.assert_array_equal(ds.pixel_array, expected)  # exact: 16 bits kept, clipped to [0, 1]
    assert ds.pixel_array.min() == 0 and ds.pixel_array.max() == 65535
    np.testing.assert_allclose(read_image(path), np.clip(ramp, 0, 1), atol=1 / 65535)  # meddiff reads it back
    assert not (tmp_path / "images" / "0000003.dcm.part").exists()  # written atomically


def test_dicom_says_it_is_synthetic_and_carries_no_patient_data(ramp, tmp_path):
    ds = pydicom.dcmread(write_image(tmp_path, 0, ramp, "dicom", "model-a", {"prompt": "Edema", "seed": "7"}))
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.Modality == "OT"
    assert str(ds.PatientName) == "SYNTHETIC^IMAGE" and ds.PatientID == "SYNTHETIC-0000000"
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.StudyDate == ""
    assert ds.ImageComments.startswith(SYNTHETIC_NOTE)
    assert "prompt=Edema" in ds.ImageComments and "seed=7" in ds.ImageComments
    assert "SYNTHETIC" in ds.SeriesDescription and ds.Manufacturer == "meddiff" and ds.BurnedInAnnotation == "NO"


def test_dicom_uids_are_deterministic_per_model_and_index(ramp, tmp_path):
    a = write_image(tmp_path / "a", 1, ramp, "dicom", "model-a", {})
    again = write_image(tmp_path / "again", 1, ramp, "dicom", "model-a", {})
    assert a.read_bytes() == again.read_bytes()  # a resumed or sharded run writes byte-identical files
    first, second = pydicom.dcmread(a), pydicom.dcmread(write_image(tmp_path / "a", 2, ramp, "dicom", "model-a", {}))
    other_model = pydicom.dcmread(write_image(tmp_path / "b", 1, ramp, "dicom", "model-b", {}))
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID == second.StudyInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    assert other_model.SOPInstanceUID != first.SOPInstanceUID
    assert other_model.StudyInstanceUID != first.StudyInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (2, 3)


@pytest.mark.parametrize("fmt, bits, scale", [("png", 8, 255), ("png16", 16, 65535)])
def test_png_bit_depth_pixels_and_synthetic_text(ramp, tmp_path, fmt, bits, scale):
    path = write_image(tmp_path, 12, ramp, fmt, "unused", {"prompt": "Cardiomegaly"})
    assert path.name == "0000012.png"
    with Image.open(path) as im:
        assert im.mode == ("L" if bits == 8 else "I;16")
        assert im.text["meddiff"] == SYNTHETIC_NOTE and im.text["prompt"] == "Cardiomegaly"
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, np.round(np.clip(ramp, 0, 1) * scale))


def test_image_names_sort_by_index():
    names = [image_name(i, "png") for i in (0, 9, 10, 1234567)]
    assert (
        names
        == sorted(names)
        == ["images/0000000.png", "images/0000009.png", "images/0000010.png", "images/1234567.png"]
    )
    assert image_name(5, "dicom").endswith(".dcm") and image_name(5, "png16").endswith(".png")
    with pytest.raises(KeyError):
        image_name(0, "jpeg")


def test_manifest_columns_and_rows(tmp_path):
    columns = manifest_columns(["Cardiomegaly", "Tumour", "Edema"])
    assert columns == [*CHEXPERT_COLUMNS, "Tumour", *RUN_COLUMNS]  # only labels CheXpert lacks are added
    rows = [
        {
            "Path": "images/0000000.png",
            "Cardiomegaly": "1.0",
            "Tumour": "0.0",
            "prompt": "p",
            "seed": 3,
            "not a column": "dropped",
        }
    ]
    path = write_manifest(tmp_path / "manifest.csv", rows, ["Cardiomegaly", "Tumour"])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        back = list(reader)
    assert reader.fieldnames == manifest_columns(["Cardiomegaly", "Tumour"])
    assert back[0]["Cardiomegaly"] == "1.0" and back[0]["Tumour"] == "0.0" and back[0]["seed"] == "3"
    assert back[0]["Edema"] == "" and "not a column" not in back[0]
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]  # no temporary file left
