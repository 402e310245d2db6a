"""`volumes:` and `phantom3d:` datasets: 3D volumes on one grid, as (C, X, Y, Z) float32 in [-1, 1] per item.

    volumes:DIR_OR_CSV?modalities=flair,t1c&label_from_mask=OTMultiClass&shape=64&split=train
    phantom3d:DIR                 a folder written by write_phantom_volumes (or `?n=32&seed=0`: rendered once)

Cases come from meddiff.data.volume_sources, each is decoded once (meddiff.data.volume_prepare) into one
memory-mapped float16 array per dataset in the cache ($MEDDIFF_CACHE/volumes-KEY/images.npy, keyed by the
options and the size and time of every source file), and items are read from the map: memory grows with the
batch, not the dataset. A case that cannot be used (a 2D file, a corrupt or constant volume, mismatched or
missing modalities) is skipped, counted and logged; a dataset with no usable case is a one-line error.
Array axes follow RAS (X to the patient's right, Y anterior, Z superior) and `affine` maps them to mm. Without
spacing=, the spacing is fitted to the largest foreground of the training split, and the held-out splits (valid,
test) are resampled at that same spacing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data.cache import cache_key, cache_root
from meddiff.data.registry import DatasetSpec, register
from meddiff.data.volume_io import VolumeError
from meddiff.data.volume_prepare import (
    GRID_OPTIONS,
    MASK_LABELS,
    GridOptions,
    decode_case,
    foreground_extent,
    output_affine,
)
from meddiff.data.volume_sources import VolumeCase, find_cases, read_case_table
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
VOLUME_OPTIONS = ("split", "modalities", "label_from_mask", "brainmask", "labels", "valid_fraction", "seed")
CACHE_FORMAT = 1


@dataclass
class VolumeDataset(torch.utils.data.Dataset):
    images: np.ndarray  # (N, C, X, Y, Z) float16 in [-1, 1], memory-mapped
    labels: torch.Tensor  # float32 (N, K); "Tumour volume mL" and other CSV numbers kept as they are
    known: torch.Tensor  # bool (N, K)
    label_names: list[str]
    affine: np.ndarray  # 4x4 RAS mm of the output grid, centred on the origin
    channel_names: list[str] = field(default_factory=list)
    case_ids: list[str] = field(default_factory=list)
    case_affines: np.ndarray | None = None  # (N, 4, 4): each case's grid in its own scanner space
    source: str = ""
    skipped: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    key: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(np.asarray(self.images[index], dtype=np.float32))
        return {"image": image, "labels": self.labels[index], "known": self.known[index]}

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.abs(self.affine[:3, :3]).max(0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        """(C, X, Y, Z) of one item."""
        return tuple(int(v) for v in self.images.shape[1:])

    def fingerprint(self) -> str:
        return self.key

    def label_counts(self) -> dict[str, int]:
        positive = ((self.labels > 0.5) & self.known).sum(0)
        return {name: int(c) for name, c in zip(self.label_names, positive)}

    def summary(self) -> str:
        size = "x".join(str(v) for v in self.shape[1:])
        mm = "x".join(f"{v:g}" for v in self.spacing)
        skip = f", {self.skipped} cases skipped" if self.skipped else ""
        return (
            f"{len(self)} volumes of {size} at {mm} mm, channels {', '.join(self.channel_names)} from "
            f"{self.source} (labels: {', '.join(self.label_names) or 'none'}{skip})"
        )


def _auto_spacing(cases: list[VolumeCase], opts: GridOptions, problems: list) -> tuple[float, float, float]:
    """Isotropic spacing at which the largest foreground of the dataset fits the shape (a first, reading pass)."""
    extents, kept = [], []
    for case in cases:
        try:
            extents.append(foreground_extent(case))
            kept.append(case)
        except VolumeError as err:
            problems.append((str(case.channels[0]), str(err)))
    cases[:] = kept
    if not extents:
        return (1.0, 1.0, 1.0)
    ratio = float(np.max(np.asarray(extents) / np.asarray(opts.shape)))
    return (round(ratio * 1.02, 3),) * 3


def _write(
    folder: Path, cases: list[VolumeCase], names: list[str], opts: GridOptions, channels: list[str], progress: bool
) -> None:
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    problems = [(c.case_id, c.problem) for c in cases if c.problem]
    usable = [c for c in cases if not c.problem]
    spacing = opts.spacing or _auto_spacing(usable, opts, problems)
    n_channels = len(usable[0].channels) if usable else 1
    images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.float16, (len(usable), n_channels, *opts.shape))
    labels = np.zeros((len(usable), len(names)), np.float32)
    known = np.zeros_like(labels, dtype=bool)
    ids, affines, row = [], [], 0
    for case in tqdm(usable, desc="volumes", unit="vol", disable=not progress):
        try:
            image, affine, from_mask = decode_case(case, opts, spacing)
        except VolumeError as err:
            problems.append((str(case.channels[0]), str(err)))
            continue
        images[row] = image
        values = {**case.values, **from_mask}
        for k, name in enumerate(names):
            value = values.get(name)
            known[row, k] = value is not None and value == value
            labels[row, k] = value if known[row, k] else 0.0
        ids.append(case.case_id)
        affines.append(affine)
        row += 1
    images.flush()
    del images
    if row < len(usable):  # skipped cases: keep the written rows only
        full = np.load(tmp / "images.npy", mmap_mode="r")
        kept = np.lib.format.open_memmap(tmp / "rows.npy", "w+", np.float16, (row, *full.shape[1:]))
        for i in range(row):
            kept[i] = full[i]
        kept.flush()
        del full, kept
        (tmp / "rows.npy").replace(tmp / "images.npy")
    np.save(tmp / "labels.npy", labels[:row])
    np.save(tmp / "known.npy", known[:row])
    np.save(tmp / "affines.npy", np.asarray(affines, np.float64).reshape(row, 4, 4))
    meta = {
        "format": CACHE_FORMAT,
        "label_names": names,
        "channels": channels,
        "case_ids": ids,
        "spacing": list(spacing),
        "shape": list(opts.shape),
        "problems": problems,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def build_volume_dataset(
    cases: list[VolumeCase],
    csv_labels: list[str],
    opts: GridOptions,
    channels: list[str],
    source: str,
    mask_labels: bool,
    progress: bool = True,
) -> VolumeDataset:
    """Decode the cases once into the cache (unless there already) and map them."""
    names = list(csv_labels) + [n for n in MASK_LABELS if mask_labels and n not in csv_labels]
    if not mask_labels:  # a mask column alone does not replace the table's labels
        cases = [replace(c, mask=None) for c in cases]
    files = sorted({str(p) for c in cases for p in [*c.channels, c.mask, c.brainmask] if p is not None})
    parts = {
        "format": CACHE_FORMAT,
        "grid": opts.key(),
        "labels": names,
        "channels": channels,
        "cases": [
            (c.case_id, [str(p) for p in c.channels], str(c.mask), str(c.brainmask), c.values, c.problem) for c in cases
        ],
    }
    key = cache_key(parts, [Path(f) for f in files])
    folder = cache_root() / f"volumes-{key}"
    if not (folder / "meta.json").is_file():
        _write(folder, cases, names, opts, channels, progress)
    meta = json.loads((folder / "meta.json").read_text())
    problems = [tuple(p) for p in meta["problems"]]
    if problems:
        logger.warning("%s: skipped %d of %d cases; first: %s (%s)", source, len(problems), len(cases), *problems[0])
    if not meta["case_ids"]:
        first = f"; first: {problems[0][0]}: {problems[0][1]}" if problems else ""
        raise MeddiffError(f"{source} holds no usable volumes ({len(problems)} skipped{first})")
    images = np.load(folder / "images.npy", mmap_mode="r")
    return VolumeDataset(
        images,
        torch.from_numpy(np.load(folder / "labels.npy")),
        torch.from_numpy(np.load(folder / "known.npy")),
        list(meta["label_names"]),
        output_affine(meta["shape"], meta["spacing"], (0.0, 0.0, 0.0)),
        list(meta["channels"]),
        list(meta["case_ids"]),
        np.load(folder / "affines.npy"),
        source,
        len(problems),
        problems,
        key,
    )


def _channel_names(options: dict[str, str]) -> list[str]:
    names = [m.split("=")[0].strip() for m in options.get("modalities", "").split(",") if m.strip()]
    return names or ["image"]


def _training_spacing(spec: DatasetSpec, resolution: int) -> tuple[float, float, float] | None:
    """The automatic spacing of the spec's training split (None where it has none), so that held-out splits are
    resampled on the grid the models were trained on rather than on one fitted to their own foregrounds."""
    try:
        return load_volumes(spec.with_options(split="train"), resolution).spacing
    except MeddiffError:
        return None


@register("volumes", heldout_split="valid", options=VOLUME_OPTIONS + GRID_OPTIONS)
def load_volumes(spec: DatasetSpec, resolution: int) -> VolumeDataset:
    opts = GridOptions.from_options(spec.options, resolution)
    if opts.spacing is None and spec.options.get("split", "train") not in ("train", "all"):
        opts = replace(opts, spacing=_training_spacing(spec, resolution))
    try:
        cases, csv_labels = find_cases(Path(spec.path).expanduser(), spec.options)
    except ValueError as err:
        raise MeddiffError(f"{spec}: {err}") from None
    if not cases:
        raise MeddiffError(f"{spec} holds no cases for split={spec.options.get('split', 'train')}")
    return build_volume_dataset(
        cases,
        csv_labels,
        opts,
        _channel_names(spec.options),
        str(spec),
        mask_labels=bool(spec.options.get("label_from_mask")),
    )


def _phantom_folder(spec: DatasetSpec, size: int) -> Path:
    from meddiff.data.phantom3d import write_phantom_volumes

    if spec.path:
        return Path(spec.path).expanduser()
    try:
        n, seed = int(spec.options.get("n", "32")), int(spec.options.get("seed", "0"))
        size = int(spec.options.get("size", str(size)))
    except ValueError:
        raise MeddiffError(f"{spec}: n, seed and size must be integers") from None
    folder = cache_root() / f"phantom3d-n{n}-seed{seed}-size{size}"
    if not (folder / "valid.csv").is_file():
        write_phantom_volumes(folder, n, size, seed, progress=False)
    return folder


@register("phantom3d", heldout_split="valid", options=("split", "n", "seed", "size", "labels") + GRID_OPTIONS)
def load_phantom3d(spec: DatasetSpec, resolution: int) -> VolumeDataset:
    """3D phantoms on their own grid (the whole 208 mm field of view, intensities kept: normalize=range)."""
    from meddiff.data.phantom3d import FIELD_OF_VIEW_MM, MAX_SIZE, MIN_SIZE

    shape = GridOptions.from_options(spec.options, resolution).shape
    folder = _phantom_folder(spec, min(max(max(shape), MIN_SIZE), MAX_SIZE))
    split = spec.options.get("split", "train")
    table = folder / {"train": "train.csv", "valid": "valid.csv"}.get(split, f"{split}.csv")
    if not table.is_file():
        raise MeddiffError(
            f"{folder} has no {table.name}; write phantoms with write_phantom_volumes or use "
            "phantom3d:?n=32 (split must be train or valid)"
        )
    defaults = {"spacing": f"{FIELD_OF_VIEW_MM / max(shape):g}", "centre": "volume", "normalize": "range"}
    options = {**defaults, **spec.options}
    opts = GridOptions.from_options(options, resolution)
    cases, csv_labels = read_case_table(table, options)
    return build_volume_dataset(cases, csv_labels, opts, ["image"], str(spec), mask_labels=False)
