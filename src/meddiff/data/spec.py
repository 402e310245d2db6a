"""Dataset specs: one string form, `kind:path?key=value&key=value`, used by every command.

Every kind registers itself in meddiff.data.registry when imported; this module imports them all
(meddiff.data.loaders) and `load_dataset(spec, resolution)` returns an ImageLabelDataset.
"""

from __future__ import annotations

import meddiff.data.loaders  # noqa: F401  (registers the kinds)
import meddiff.data.volume_dataset  # noqa: F401  (registers volumes: and phantom3d:)
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.registry import LOADERS, DatasetSpec, Loader, check_options, load, register

__all__ = ["LOADERS", "DatasetSpec", "Loader", "check_options", "load_dataset", "parse_spec", "register"]


def load_dataset(spec: str | DatasetSpec, resolution: int) -> ImageLabelDataset:
    return load(DatasetSpec.parse(spec) if isinstance(spec, str) else spec, resolution)


def parse_spec(text: str) -> DatasetSpec:
    return DatasetSpec.parse(text)
