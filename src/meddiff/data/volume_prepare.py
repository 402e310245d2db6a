"""Turning one case (channel files, optional masks) into a fixed grid: RAS, target spacing and shape, centred on
the foreground (or the volume), intensities normalised per channel into [-1, 1].

Options (the `volumes:` spec's query): shape=64 or 64,64,48 (default: the resolution), spacing=MM or X,Y,Z
(default auto: the largest foreground of the dataset fits), centre=foreground|volume,
normalize=percentile|zscore|range, percentiles=0.5,99.5, range=LO,HI (fixed window, e.g. -1000,1000 for CT),
zclip=3 (z-scores mapped to [-1, 1]), mask_labels=1,4 (mask values that count as tumour; default all)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from meddiff.data.volume_io import VolumeError, read_nifti, read_volume
from meddiff.data.volume_measure import tumour_from_mask
from meddiff.data.volume_sources import VolumeCase
from meddiff.errors import MeddiffError

GRID_OPTIONS = ("shape", "spacing", "centre", "normalize", "percentiles", "range", "zclip", "mask_labels")
NORMALIZERS = ("percentile", "zscore", "range")
MASK_LABELS = ("Tumour", "Tumour volume mL")


def _numbers(text: str, what: str, count: int | None = None, cast=float) -> tuple:
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MeddiffError(f"{what}= must be comma-separated numbers, got {text!r}") from None
    if not values or (count is not None and len(values) != count):
        raise MeddiffError(f"{what}= needs {count or 'one or more'} number(s), got {text!r}")
    return values


@dataclass(frozen=True)
class GridOptions:
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None  # None: auto from the dataset's foregrounds
    centre: str = "foreground"
    normalize: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    value_range: tuple[float, float] = (0.0, 1.0)
    zclip: float = 3.0
    mask_labels: tuple[int, ...] = ()

    @classmethod
    def from_options(cls, options: dict[str, str], resolution: int) -> GridOptions:
        shape = _numbers(options.get("shape", str(resolution)), "shape", cast=int)
        shape = shape * 3 if len(shape) == 1 else shape
        if len(shape) != 3 or min(shape) < 8 or max(shape) > 512:
            raise MeddiffError(f"shape= must be one size or X,Y,Z between 8 and 512, got {options.get('shape')}")
        spacing = None
        if options.get("spacing", "auto") != "auto":
            spacing = _numbers(options["spacing"], "spacing")
            spacing = spacing * 3 if len(spacing) == 1 else spacing
            if len(spacing) != 3 or min(spacing) <= 0:
                raise MeddiffError("spacing= must be one positive size in mm or X,Y,Z")
        centre, normalize = options.get("centre", "foreground"), options.get("normalize", "percentile")
        if centre not in ("foreground", "volume"):
            raise MeddiffError(f"centre= must be foreground or volume, got {centre!r}")
        if normalize not in NORMALIZERS:
            raise MeddiffError(f"normalize= must be one of {', '.join(NORMALIZERS)}, got {normalize!r}")
        lo_hi = _numbers(options.get("percentiles", "0.5,99.5"), "percentiles", 2)
        window = _numbers(options.get("range", "0,1"), "range", 2)
        if not 0 <= lo_hi[0] < lo_hi[1] <= 100 or window[0] >= window[1]:
            raise MeddiffError("percentiles= needs 0 <= LO < HI <= 100 and range= LO < HI")
        zclip = _numbers(options.get("zclip", "3"), "zclip", 1)[0]
        labels = _numbers(options["mask_labels"], "mask_labels", cast=int) if options.get("mask_labels") else ()
        return cls(shape, spacing, centre, normalize, lo_hi, window, zclip, labels)

    def key(self) -> dict:
        return asdict(self)


def _background(data: np.ndarray) -> float:
    faces = np.concatenate([data[[0, -1]].ravel(), data[:, [0, -1]].ravel(), data[:, :, [0, -1]].ravel()])
    return float(np.median(faces))


def foreground(data: np.ndarray, brainmask: np.ndarray | None = None) -> np.ndarray:
    """The head/body: a given mask, or voxels clearly above the background after light smoothing."""
    if brainmask is not None:
        return brainmask > 0.5
    above = data - _background(data)
    top = float(np.percentile(above, 99.5))
    return ndimage.gaussian_filter(above, 1.0) > 0.1 * top if top > 0 else np.zeros(data.shape, bool)


def _read_channels(case: VolumeCase) -> tuple[list[np.ndarray], np.ndarray]:
    channels: list[np.ndarray] = []
    affine = None
    for source in case.channels:
        data, aff = read_volume(source)
        if channels and data.shape != channels[0].shape:
            raise VolumeError(
                f"modality shapes differ within the case: {case.channels[0].name} "
                f"{channels[0].shape} vs {source.name} {data.shape}"
            )
        channels.append(data)
        affine = aff if affine is None else affine
    assert affine is not None
    return channels, affine


def _brainmask(case: VolumeCase, shape) -> np.ndarray | None:
    if case.brainmask is None:
        return None
    mask, _ = read_nifti(case.brainmask)
    if mask.shape != tuple(shape):
        raise VolumeError(f"brain mask {case.brainmask.name} is {mask.shape}, the image {tuple(shape)}")
    return mask


def _world_box(fg: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low corner, high corner) in RAS mm of the foreground's bounding box."""
    idx = np.argwhere(fg)
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    world = corners @ affine.T
    return world[:, :3].min(0), world[:, :3].max(0)


def foreground_extent(case: VolumeCase) -> np.ndarray:
    """The foreground's extent in mm along x, y, z (the first channel; for the automatic spacing)."""
    data, affine = read_volume(case.channels[0])
    fg = foreground(data, _brainmask(case, data.shape))
    if not fg.any():
        raise VolumeError(f"{case.channels[0].name} has no foreground above its background")
    lo, hi = _world_box(fg, affine)
    return hi - lo


def output_affine(shape, spacing, centre_mm) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = np.asarray(centre_mm) - np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    return affine


def _resample(data: np.ndarray, source: np.ndarray, target: np.ndarray, shape, order: int, cval: float):
    matrix = np.linalg.inv(source) @ target  # output voxel -> source voxel
    step = np.abs(matrix[:3, :3]).max(1)  # source voxels per output voxel, per source axis
    if order > 0 and (step > 1.2).any():  # anti-aliasing before downsampling
        data = ndimage.gaussian_filter(data, np.sqrt(np.maximum(step**2 - 1, 0)) / 2, mode="nearest")
    return ndimage.affine_transform(
        data, matrix[:3, :3], matrix[:3, 3], output_shape=tuple(shape), order=order, mode="constant", cval=cval
    )


def _normalise(x: np.ndarray, fg: np.ndarray, opts: GridOptions, what: str) -> np.ndarray:
    inside = x[fg] if fg.any() else x.ravel()
    if opts.normalize == "zscore":
        std = float(inside.std())
        if std == 0:
            raise VolumeError(f"{what} is constant inside its foreground")
        out = np.clip((x - float(inside.mean())) / (std * opts.zclip), -1, 1)
        out[~fg] = -1.0
        return out
    lo, hi = opts.value_range if opts.normalize == "range" else np.percentile(inside, opts.percentiles)
    if hi <= lo:
        raise VolumeError(f"{what} is constant inside its foreground")
    return np.clip((x - lo) / (hi - lo), 0, 1) * 2 - 1


def decode_case(case: VolumeCase, opts: GridOptions, spacing) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(image (C, X, Y, Z) float32 in [-1, 1], the case's output affine, labels from its mask) or VolumeError."""
    channels, affine = _read_channels(case)
    fg = foreground(channels[0], _brainmask(case, channels[0].shape))
    if not fg.any():
        raise VolumeError(f"{case.channels[0].name} has no foreground above its background")
    if opts.centre == "volume":
        centre = (affine @ np.append((np.asarray(channels[0].shape) - 1) / 2, 1.0))[:3]
    else:
        lo, hi = _world_box(fg, affine)
        centre = (lo + hi) / 2
    target = output_affine(opts.shape, spacing, centre)
    fg_out = _resample(fg.astype(np.float32), affine, target, opts.shape, 1, 0.0) > 0.5
    image = np.stack(
        [
            _normalise(_resample(c, affine, target, opts.shape, 1, _background(c)), fg_out, opts, source.name)
            for c, source in zip(channels, case.channels)
        ]
    ).astype(np.float32)
    labels: dict[str, float] = {}
    if case.mask is not None:
        mask, mask_affine = read_nifti(case.mask)
        if mask.shape != channels[0].shape:
            raise VolumeError(f"mask {case.mask.name} is {mask.shape}, the image {channels[0].shape}")
        found = tumour_from_mask(mask, affine=mask_affine, labels=opts.mask_labels or None)
        labels = {"Tumour": float(found.present), "Tumour volume mL": round(found.volume_ml, 3)}
    return image, target, labels
