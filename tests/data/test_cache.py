"""meddiff.data.cache: the on-disk cache of preprocessed arrays, keyed by the spec and every source file."""

import os

import numpy as np
import pytest

from meddiff.data import cache


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_root_follows_the_environment(root, monkeypatch):
    assert cache.cache_root() == root
    monkeypatch.delenv("MEDDIFF_CACHE")
    assert cache.cache_root().parts[-2:] == (".cache", "meddiff")


def test_key_depends_on_parts_and_on_each_files_size_and_time(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    key = cache.cache_key({"spec": "folder:x", "resolution": 32}, [a, b])
    assert len(key) == 20 and key == cache.cache_key({"resolution": 32, "spec": "folder:x"}, [a, b])  # key order
    assert key != cache.cache_key({"spec": "folder:x", "resolution": 64}, [a, b])
    assert key != cache.cache_key({"spec": "folder:x", "resolution": 32}, [a])
    assert key != cache.cache_key({"spec": "folder:x", "resolution": 32}, [b, a])
    os.utime(a, ns=(0, 1_000_000_000))  # touched: a new key
    touched = cache.cache_key({"spec": "folder:x", "resolution": 32}, [a, b])
    assert touched != key
    a.write_bytes(b"12345")  # resized
    os.utime(a, ns=(0, 1_000_000_000))
    assert cache.cache_key({"spec": "folder:x", "resolution": 32}, [a, b]) != touched
    missing = cache.cache_key({}, [tmp_path / "gone.png"])  # a missing file is part of the key, not an error
    assert missing != cache.cache_key({}, [])


def test_store_then_load_round_trips(root):
    images = np.arange(2 * 3 * 3, dtype=np.uint16).reshape(2, 3, 3)
    labels = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    folder = cache.store("k1", {"images": images, "labels": labels}, {"source": "s", "n": 2})
    assert folder == root / "k1" and not list(root.glob(".tmp-*"))
    back = cache.load("k1")
    assert back["meta"] == {"source": "s", "n": 2, "arrays": ["images", "labels"]}
    assert back["images"].dtype == np.uint16 and np.array_equal(back["images"], images)
    assert np.array_equal(back["labels"], labels)
    cache.store("k1", {"images": images[:1]}, {"n": 1})  # replacing a key replaces the folder
    assert cache.load("k1")["images"].shape == (1, 3, 3) and "labels" not in cache.load("k1")


def test_missing_or_damaged_entries_load_as_none(root):
    assert cache.load("never-stored") is None
    cache.store("k2", {"images": np.zeros((1, 2, 2), np.uint16)}, {})
    (root / "k2" / "images.npy").write_bytes(b"not numpy")
    assert cache.load("k2") is None
    cache.store("k3", {"images": np.zeros((1, 2, 2), np.uint16)}, {})
    (root / "k3" / "meta.json").write_text("{")
    assert cache.load("k3") is None
    cache.store("k4", {"images": np.zeros((1, 2, 2), np.uint16)}, {})
    (root / "k4" / "images.npy").unlink()
    assert cache.load("k4") is None


def test_pickled_arrays_are_refused(root):
    cache.store("k5", {"images": np.zeros((1, 2, 2), np.uint16)}, {})
    np.save(root / "k5" / "images.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert cache.load("k5") is None


def test_uint16_conversion_is_exact_at_16_bits():
    images = np.array([-0.2, 0.0, 0.5, 1 / 65535, 1.0, 1.3], np.float32)
    stored = cache.images_to_uint16(images)
    assert stored.dtype == np.uint16 and stored.tolist() == [0, 0, 32768, 1, 65535, 65535]
    back = cache.images_from_uint16(stored)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, np.clip(images, 0, 1), atol=0.5 / 65535)
