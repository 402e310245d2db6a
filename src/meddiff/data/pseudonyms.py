"""Patient pseudonyms: identifiers read from files (the DICOM PatientID) become a keyed hash before they reach a
record, a split, a store or a privacy index.

A plain hash of a medical record number is not a pseudonym: MRNs are short, so every candidate can be hashed and
looked up in seconds. meddiff therefore uses HMAC-SHA256 with a secret key of this site:
- `MEDDIFF_PATIENT_KEY` (any string) when set: share it to get the same pseudonyms, hence the same patient-level
  splits, on another machine;
- otherwise a random key kept in `$XDG_CONFIG_HOME/meddiff/patient.key` (default `~/.config/meddiff/`), created
  on first use with owner-only permissions.
Losing the key changes the pseudonyms, and with them which split a patient's images fall in."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path

from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
KEY_ENV = "MEDDIFF_PATIENT_KEY"


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meddiff" / "patient.key"


@lru_cache(maxsize=4)
def _file_key(path: Path) -> bytes:
    if not path.is_file():
        _create_key(path)
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise MeddiffError(f"cannot read the patient-pseudonym key {path} ({e.strerror}); set {KEY_ENV}") from None
    if len(text) < 16:
        raise MeddiffError(
            f"the patient-pseudonym key {path} is too short (< 16 characters): delete it or set {KEY_ENV}"
        )
    return text.encode()


def _create_key(path: Path) -> None:
    """Write a random key next to `path` and link it into place: the file appears complete or not at all, and when
    several processes race (accelerate launch) the first link wins and every process reads that key."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
            logger.warning(
                "created the patient-pseudonym key %s (keep it private; set %s to the same value on another "
                "machine to get the same patient ids and splits)", path, KEY_ENV,
            )  # fmt: skip
        except FileExistsError:  # another process linked its key first: that one is the key
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise MeddiffError(
            f"cannot create the patient-pseudonym key {path} ({e.strerror}); set {KEY_ENV} to a secret string"
        ) from None


def key_fingerprint() -> str:
    """8 hex digits that identify the key without revealing it (recorded in the data notes, so that two runs can
    tell whether their patient ids, hence their splits, were made with the same key)."""
    return hmac.new(patient_key(), b"meddiff key fingerprint", hashlib.sha256).hexdigest()[:8]


def patient_key() -> bytes:
    """This site's secret: MEDDIFF_PATIENT_KEY, else the key file (created once)."""
    value = os.environ.get(KEY_ENV, "")
    if value:
        return value.encode()
    return _file_key(key_file())


def pseudonym(prefix: str, identifier: str) -> str:
    """'PREFIX-' + 16 hex digits of HMAC-SHA256(key, identifier): stable for one key, not reversible without it."""
    digest = hmac.new(patient_key(), identifier.encode(), hashlib.sha256).hexdigest()
    return f"{prefix}-{digest[:16]}"
