"""meddiff.data.decode: one image (or one NIfTI volume's slices) to the stored integers of a prepared store;
failures come back as a reason per image, never as an exception."""

import numpy as np
import pytest
from PIL import Image

from meddiff.data import decode as decode_module
from meddiff.data.decode import DecodeTask, always_8bit, decode, decode_into, tasks_for, to_stored
from meddiff.data.io import write_png


@pytest.fixture
def gradient():
    return np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))


def test_to_stored_rounds_and_clips_to_8_or_16_bits():
    image = np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]], np.float32)
    eight, sixteen = to_stored(image, 8), to_stored(image, 16)
    assert eight.dtype == np.uint8 and eight.tolist() == [[0, 0, 128, 255, 255]]
    assert sixteen.dtype == np.uint16 and sixteen.tolist() == [[0, 0, 32768, 65535, 65535]]


@pytest.mark.parametrize("bits, dtype, scale", [(8, np.uint8, 255), (16, np.uint16, 65535)])
def test_decodes_a_png_at_its_own_bit_depth(tmp_path, gradient, bits, dtype, scale):
    path = tmp_path / "g.png"
    write_png(path, gradient, bit_depth=bits)
    [(arr, problem)] = decode((DecodeTask(str(path)), 16, "crop"))
    assert problem == "" and arr.dtype == dtype and arr.shape == (16, 16)
    np.testing.assert_array_equal(arr, np.round(gradient * scale))
    [(small, _)] = decode((DecodeTask(str(path)), 8, "crop"))
    assert small.shape == (8, 8) and small[:, 0].max() < small[:, -1].min()  # resized, left-to-right ramp kept


def test_crop_and_pad_fit_a_wide_image(tmp_path):
    wide = np.zeros((8, 16), np.float32)
    wide[:, 4:12] = 1.0  # a bright centre square
    write_png(tmp_path / "w.png", wide)
    [(crop, _)] = decode((DecodeTask(str(tmp_path / "w.png")), 8, "crop"))
    [(pad, _)] = decode((DecodeTask(str(tmp_path / "w.png")), 8, "pad"))
    assert crop.min() == 255  # the centre crop is all bright
    assert pad[0].max() == 0 and pad[:, 0].max() == 0 and pad[4, 4] == 255  # padded with the minimum


def test_missing_and_unreadable_files_give_reasons(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert decode((DecodeTask(str(tmp_path / "gone.png")), 8, "crop")) == [(None, "missing")]
    [(arr, problem)] = decode((DecodeTask(str(tmp_path / "bad.png")), 8, "crop"))
    assert arr is None and problem not in ("", "missing") and "cannot identify image" in problem
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume")
    out = decode((DecodeTask(str(tmp_path / "bad.nii.gz"), (0, 1, 2)), 8, "crop"))
    assert len(out) == 3 and all(a is None and "not a readable NIfTI" in p for a, p in out)  # one reason per slice


def test_a_missing_volume_is_missing_like_a_missing_image(tmp_path):
    assert decode((DecodeTask(str(tmp_path / "gone.nii.gz"), (0, 1, 2)), 8, "crop")) == [(None, "missing")] * 3


def test_nifti_slices_decode_once_as_16_bit(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((8, 8, 4), np.float32)
    for k in range(4):
        volume[..., k] = k  # each slice one value: 0, 1/3, 2/3, 1 after normalising the volume
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    out = decode((DecodeTask(str(tmp_path / "v.nii.gz"), (1, 3, 9), axis=2), 8, "crop"))
    assert [problem for _, problem in out] == ["", "", "slice out of range"]
    assert out[0][0].dtype == np.uint16 and out[0][0].shape == (8, 8)
    assert np.all(out[0][0] == round(65535 / 3)) and np.all(out[1][0] == 65535)


def test_tasks_group_adjacent_slices_of_one_volume():
    items = [
        ("a.png", None, 2),
        ("v.nii", 0, 2),
        ("v.nii", 1, 2),
        ("v.nii", 5, 0),
        ("w.nii", 2, 2),
        ("b.png", None, 2),
        ("v.nii", 2, 2),
    ]
    tasks, members = tasks_for(items)
    assert tasks == [
        DecodeTask("a.png"),
        DecodeTask("v.nii", (0, 1), 2),
        DecodeTask("v.nii", (5,), 0),
        DecodeTask("w.nii", (2,), 2),
        DecodeTask("b.png"),
        DecodeTask("v.nii", (2,), 2),
    ]
    assert members == [[0], [1, 2], [3], [4], [5], [6]]
    assert sorted(i for m in members for i in m) == list(range(len(items)))
    assert tasks_for([]) == ([], [])


def test_only_jpeg_files_are_known_8_bit_before_decoding():
    assert always_8bit(DecodeTask("x/a.JPG")) and always_8bit(DecodeTask("a.jpeg"))
    assert not always_8bit(DecodeTask("a.png")) and not always_8bit(DecodeTask("a.dcm"))
    assert not always_8bit(DecodeTask("a.jpg", (1,)))


def test_decode_into_writes_rows_of_a_shared_shard(tmp_path, gradient, monkeypatch):
    monkeypatch.setattr(decode_module, "_open_targets", {})
    write_png(tmp_path / "a.png", gradient)
    write_png(tmp_path / "b.png", gradient, bit_depth=16)
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(tmp_path / "c.jpg", quality=100)
    shard = tmp_path / "shard.npy"
    np.save(shard, np.zeros((4, 16, 16), np.uint8))
    assert decode_into((DecodeTask(str(tmp_path / "a.png")), 16, "crop", str(shard), 1)) == [(True, "")]
    [(fallback, problem)] = decode_into((DecodeTask(str(tmp_path / "b.png")), 16, "crop", str(shard), 2))
    assert problem == "" and fallback.dtype == np.uint16  # not 8-bit: the array comes back, the row stays empty
    assert decode_into((DecodeTask(str(tmp_path / "gone.png")), 16, "crop", str(shard), 3)) == [(None, "missing")]
    assert decode_into((DecodeTask(str(tmp_path / "c.jpg")), 16, "crop", str(shard), 0)) == [(True, "")]
    decode_module._open_targets.clear()  # flush the memory map
    rows = np.load(shard)
    np.testing.assert_array_equal(rows[1], np.round(gradient * 255))
    assert abs(int(rows[0].mean()) - 7) <= 1 and not rows[2].any() and not rows[3].any()
