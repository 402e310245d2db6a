"""`meddiff data download medmnist NAME`: fetch a MedMNIST file where the network allows."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from meddiff.data.medmnist import KNOWN_LABELS
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file}?download=1"
SIZES = (28, 64, 128, 224)


def medmnist_file_name(name: str, size: int) -> str:
    name = name.lower().removesuffix(".npz")
    if name not in KNOWN_LABELS:
        raise MeddiffError(f"unknown MedMNIST dataset {name!r}; known: {', '.join(sorted(KNOWN_LABELS))}")
    if size not in SIZES:
        raise MeddiffError(f"--size must be one of {', '.join(map(str, SIZES))}")
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def download_medmnist(
    name: str, size: int, out_dir: Path, url_template: str = MEDMNIST_URL, timeout: float = 20.0
) -> Path:
    file = medmnist_file_name(name, size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / file
    if target.is_file():
        logger.info("%s already exists", target)
        return target
    url = url_template.format(file=file)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=file) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        raise MeddiffError(
            f"cannot download {file} ({reason}); offline? fetch it by hand and use medmnist:{target}"
        ) from None
    part.replace(target)
    return target
