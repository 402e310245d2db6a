"""Model ids or local paths. Everything that takes a Hugging Face id also takes a local folder, and an id that
is neither cached nor reachable fails in seconds with one actionable line (instead of minutes of retries)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from meddiff.errors import MeddiffError


@lru_cache(maxsize=4)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """loader(name_or_path, **kwargs) for a local folder; for a hub id: the local cache first, then the hub."""
    import warnings

    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # huggingface_hub's own deprecation
    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            return loader(str(path), **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise MeddiffError(f"could not load the {what} in {path}: {str(exc).splitlines()[0]}") from None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise MeddiffError(f"{what} folder {name_or_path} does not exist")
    try:
        return loader(name_or_path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise MeddiffError(
            f"{what} {name_or_path!r} is not a local folder, not in the Hugging Face cache, and the hub "
            "is unreachable; download it where there is internet and pass its local path"
        )
    try:
        return loader(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise MeddiffError(f"could not load the {what} {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def quiet_loading() -> None:
    """No per-component progress bars when loading and saving (the CLI shows its own progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
