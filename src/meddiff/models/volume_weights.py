"""Weights and configs of meddiff's 3D (MONAI) networks on disk: FOLDER/config.json + FOLDER/model.safetensors.

MONAI networks are plain torch modules (no diffusers `save_pretrained`), so each is saved as its safetensors state
dict next to the JSON that rebuilds it; nothing is pickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meddiff.errors import MeddiffError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def save_module(module: torch.nn.Module, folder: Path, meta: dict[str, Any]) -> Path:
    """Write `meta` (plus the format version) as config.json and the module's state dict as model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().cpu().contiguous() for name, t in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps({**meta, "meddiff_format": FORMAT_VERSION}, indent=2))
    return folder


def read_meta(folder: Path, expected_class: str) -> dict[str, Any]:
    """config.json of a saved module, checked to hold `expected_class` and to have weights next to it."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise MeddiffError(f"{folder} holds no {expected_class} (no {CONFIG_FILE})")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise MeddiffError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("class") != expected_class:
        found = meta.get("class") if isinstance(meta, dict) else None
        raise MeddiffError(f"{folder} holds a {found or 'different model'}, not a {expected_class}")
    if not (folder / WEIGHTS_FILE).is_file():
        raise MeddiffError(f"{folder} has no weights ({WEIGHTS_FILE}); the run that wrote it did not finish")
    return meta


def load_weights(module: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Fill `module` with FOLDER/model.safetensors; a file from another architecture is a one-line error."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise MeddiffError(f"could not read {path}: {str(exc).splitlines()[0]}") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MeddiffError(
            f"{path} does not fit the network its config.json describes: "
            f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
        ) from None
    return module
