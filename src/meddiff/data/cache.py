"""On-disk cache of preprocessed arrays, keyed by everything that determines them (the spec, resolution, fit,
and the size and modification time of every source file), so a second run starts at once.

Stored as .npy (uint16 images, no pickle) plus JSON; location $MEDDIFF_CACHE or ~/.cache/meddiff."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

CACHE_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("MEDDIFF_CACHE", Path.home() / ".cache" / "meddiff"))


def cache_key(parts: dict, files: list[Path]) -> str:
    h = hashlib.sha1(json.dumps({**parts, "v": CACHE_VERSION}, sort_keys=True, default=str).encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}|missing\n".encode())
    return h.hexdigest()[:20]


def load(key: str) -> dict | None:
    folder = cache_root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return {"meta": meta, **arrays}


def store(key: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    root = cache_root()
    folder, tmp = root / key, root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": list(arrays)}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def images_to_uint16(images01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(images01, 0, 1) * 65535).astype(np.uint16)


def images_from_uint16(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float32) / 65535.0
