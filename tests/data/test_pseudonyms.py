"""Patient pseudonyms: keyed, stable for one key, different under another, key file created private once."""

import hashlib
import os
import stat

import pytest

from meddiff.data import pseudonyms
from meddiff.errors import MeddiffError


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.delenv(pseudonyms.KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    pseudonyms._file_key.cache_clear()
    yield tmp_path / "cfg" / "meddiff" / "patient.key"
    pseudonyms._file_key.cache_clear()


def test_key_file_is_created_once_owner_only_and_gives_stable_pseudonyms(fresh):
    first = pseudonyms.pseudonym("dicom", "MRN0001")
    assert fresh.is_file() and stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
    key = fresh.read_text()
    pseudonyms._file_key.cache_clear()
    assert pseudonyms.pseudonym("dicom", "MRN0001") == first and fresh.read_text() == key
    assert first.startswith("dicom-") and len(first) == len("dicom-") + 16
    assert pseudonyms.pseudonym("dicom", "MRN0002") != first


def test_pseudonym_is_not_the_plain_hash_and_depends_on_the_key(fresh, monkeypatch):
    plain = hashlib.sha1(b"MRN0001").hexdigest()[:16]
    sha256 = hashlib.sha256(b"MRN0001").hexdigest()[:16]
    from_file = pseudonyms.pseudonym("dicom", "MRN0001")
    assert from_file.split("-")[1] not in (plain, sha256)
    monkeypatch.setenv(pseudonyms.KEY_ENV, "site-a-secret")
    a = pseudonyms.pseudonym("dicom", "MRN0001")
    monkeypatch.setenv(pseudonyms.KEY_ENV, "site-b-secret")
    b = pseudonyms.pseudonym("dicom", "MRN0001")
    assert len({from_file, a, b}) == 3
    monkeypatch.setenv(pseudonyms.KEY_ENV, "site-a-secret")
    assert pseudonyms.pseudonym("dicom", "MRN0001") == a  # shared key: same ids on another machine


def test_a_short_key_file_is_one_line_error(fresh):
    fresh.parent.mkdir(parents=True)
    fresh.write_text("abc\n")
    with pytest.raises(MeddiffError, match="too short"):
        pseudonyms.pseudonym("dicom", "MRN0001")


def test_a_racing_creator_keeps_the_first_key_and_leaves_no_temporary_files(fresh):
    fresh.parent.mkdir(parents=True)
    fresh.write_text("k" * 64 + "\n")  # another process won the race
    pseudonyms._create_key(fresh)
    assert fresh.read_text() == "k" * 64 + "\n" and sorted(p.name for p in fresh.parent.iterdir()) == ["patient.key"]
    first = pseudonyms.key_fingerprint()
    assert len(first) == 8 and "k" * 8 not in first


def test_the_fingerprint_tells_keys_apart_without_revealing_them(monkeypatch):
    monkeypatch.setenv(pseudonyms.KEY_ENV, "site-a-secret")
    a = pseudonyms.key_fingerprint()
    monkeypatch.setenv(pseudonyms.KEY_ENV, "site-b-secret")
    assert a != pseudonyms.key_fingerprint() and "site" not in a
