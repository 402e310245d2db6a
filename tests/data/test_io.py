import numpy as np
import pytest
from PIL import Image

from meddiff.data.io import UnreadableImage, read_image, read_nifti_slices, resize
from tests.data.fixtures import dicom_file, nifti_volume


def test_dicom_monochrome1_is_inverted_and_rescaled(tmp_path):
    px = np.tile(np.arange(64, dtype=np.uint16) * 50, (64, 1))  # ramp, dark -> bright in stored values
    m2 = read_image(dicom_file(tmp_path / "m2.dcm", px, "MONOCHROME2", slope=2.0, intercept=-100.0))
    m1 = read_image(dicom_file(tmp_path / "m1.dcm", px, "MONOCHROME1", slope=2.0, intercept=-100.0))
    assert m2.shape == (64, 64) and m2[0, 0] == 0.0 and m2[0, -1] == 1.0
    assert np.allclose(m1, 1.0 - m2)  # MONOCHROME1: high stored values display dark
    # more distinct levels than 8 bits would keep
    assert len(np.unique(m2)) == 64


def test_dicom_window_is_applied(tmp_path):
    px = np.tile(np.arange(100, dtype=np.uint16) * 40, (8, 1))
    windowed = read_image(dicom_file(tmp_path / "w.dcm", px, window=(2000.0, 800.0)))
    # values outside the window saturate: many pixels at the extremes
    assert (windowed == 0).sum() > 8 * 30 and (windowed == 1).sum() > 8 * 30


def test_multiframe_and_corrupt_dicom_are_refused(tmp_path):
    with pytest.raises(UnreadableImage, match="multi-frame DICOM \\(3 frames\\)"):
        read_image(dicom_file(tmp_path / "mf.dcm", np.zeros((8, 8)), frames=3))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(UnreadableImage):
        read_image(bad)


def test_nifti_slices(tmp_path):
    vol = nifti_volume(tmp_path / "v.nii.gz", shape=(20, 24, 6))
    slices = read_nifti_slices(tmp_path / "v.nii.gz", axis=2)
    assert len(slices) == 6 and slices[0][1].shape == (24, 20)
    assert slices[5][1].mean() > slices[0][1].mean()  # intensity rises with the slice index in the fixture
    assert [i for i, _ in read_nifti_slices(tmp_path / "v.nii.gz", axis=0, slices=(3, 7))] == [3, 4, 5, 6]
    assert vol.shape == (20, 24, 6)


def test_rgb_rgba_and_16bit_rasters(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb).save(tmp_path / "g.png")
    assert np.allclose(read_image(tmp_path / "g.png"), 0.587, atol=1e-3)
    rgba = np.concatenate([np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 1), np.uint8)], -1)
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert np.allclose(img[:4], 1.0) and np.allclose(img[4:], 0.0)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "16.png")
    assert abs(read_image(tmp_path / "16.png")[0, 0] - 40000 / 65535) < 1e-6
    (tmp_path / "t.png").write_text("text")
    with pytest.raises(UnreadableImage):
        read_image(tmp_path / "t.png")


def test_resize_crop_or_pad():
    wide = np.ones((20, 40), np.float32)
    wide[:, :10] = 0.0
    crop = resize(wide, 10, "crop")
    pad = resize(wide, 10, "pad")
    assert crop.shape == pad.shape == (10, 10)
    assert crop.min() == 1.0  # the dark left band was cropped away
    assert pad[0].max() == 0.0 and pad[5, 0] == 0.0  # padded with the image minimum, band kept
