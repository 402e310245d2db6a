"""Reading image files as float arrays in [0, 1], keeping 16-bit precision until normalised.

PNG/JPEG/TIFF (8- or 16-bit; RGB/RGBA converted explicitly to luminance), DICOM via pydicom (modality LUT /
rescale slope and intercept, VOI LUT or window, MONOCHROME1 inverted; multi-frame refused) and NIfTI volumes
via nibabel (2D slices along a chosen axis)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LUMA = np.array([0.299, 0.587, 0.114], np.float64)


class UnreadableImage(Exception):
    """A file that is not a readable image (counted and reported by the caller)."""


def is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: Path) -> bool:
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES or is_nifti(path)


def _normalise(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    return ((arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)).astype(np.float32)


def read_raster(path: Path, draft: int | None = None) -> np.ndarray:
    """`draft`: the size the image will be resized to; JPEGs then decode at the smallest DCT scale that keeps both
    sides at least that large (libjpeg's fast downscaling, several times faster for large radiographs)."""
    try:
        with Image.open(path) as im:
            if draft and im.format == "JPEG" and min(im.size) >= 2 * draft:
                im.draft("L" if im.mode in ("L", "RGB", "YCbCr") else None, (draft, draft))
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
                return (arr / peak).astype(np.float32)
            if im.mode == "F":
                return _normalise(np.asarray(im, dtype=np.float32))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float64) / 255.0
                # composite on black explicitly: transparent regions carry no signal
                return (rgba[..., :3] @ LUMA * rgba[..., 3]).astype(np.float32)
            if im.mode in ("RGB", "P", "CMYK", "YCbCr"):
                return (np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 @ LUMA).astype(np.float32)
            gray = im if im.mode == "L" else im.convert("L")
            return np.asarray(gray, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc


def read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom is a dependency
        raise UnreadableImage("pydicom is not installed") from None
    try:
        ds = pydicom.dcmread(path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise UnreadableImage(f"{path}: multi-frame DICOM ({frames} frames) is not supported; export single frames")
        arr = ds.pixel_array
        if arr.ndim == 3:  # colour DICOM (e.g. secondary capture RGB)
            return _normalise(arr[..., :3].astype(np.float64) @ LUMA)
        arr = apply_modality_lut(arr, ds)  # rescale slope / intercept
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
        arr = _normalise(arr)
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            arr = 1.0 - arr  # MONOCHROME1: high values are dark
        return arr
    except UnreadableImage:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise UnreadableImage(f"{path}: not a readable DICOM ({type(exc).__name__}: {exc})") from exc


def read_nifti_slices(path: Path, axis: int = 2, slices: tuple[int, int] | None = None) -> list[tuple[int, np.ndarray]]:
    """2D slices (index, float image in [0, 1]) of a NIfTI volume; intensities normalised over the volume."""
    try:
        import nibabel as nib

        image = cast(nib.spatialimages.SpatialImage, nib.load(str(path)))  # nibabel types load() as any file image
        vol = np.asarray(image.get_fdata(dtype=np.float32))
    except FileNotFoundError:
        raise  # missing, not unreadable: counted as such by the callers
    except Exception as exc:
        raise UnreadableImage(f"{path}: not a readable NIfTI ({type(exc).__name__}: {exc})") from exc
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise UnreadableImage(f"{path}: expected a 3D volume, got shape {vol.shape}")
    if not 0 <= axis <= 2:
        raise UnreadableImage(f"{path}: axis must be 0, 1 or 2")
    vol = _normalise(vol)
    n = vol.shape[axis]
    lo, hi = slices if slices else (0, n)
    lo, hi = max(0, lo), min(n, hi)
    return [(i, np.ascontiguousarray(np.take(vol, i, axis=axis)).T[::-1].copy()) for i in range(lo, hi)]


def read_image(path: Path, draft: int | None = None) -> np.ndarray:
    """Grayscale float32 (H, W) in [0, 1] from a raster or DICOM file (`draft`: see read_raster)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    if is_dicom(path):
        return read_dicom(path)
    return read_raster(path, draft)


def source_bit_depth(path: Path) -> int:
    """8 for 8-bit rasters (JPEG, 8-bit PNG...), 16 for everything with more precision (16-bit PNG/TIFF, float
    TIFF, DICOM, NIfTI): the depth a prepared store keeps for the image."""
    path = Path(path)
    if is_nifti(path) or is_dicom(path):
        return 16
    try:
        with Image.open(path) as im:
            return 16 if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") else 8
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 16


def resize(image: np.ndarray, size: int, fit: str = "crop") -> np.ndarray:
    """Square `size` x `size` float image: centre-crop (fit='crop') or pad with the image minimum
    (fit='pad') to square first, then resample in float precision (box filter down, bicubic up)."""
    h, w = image.shape
    if h != w:
        if fit == "pad":
            side = max(h, w)
            canvas = np.full((side, side), float(image.min()), np.float32)
            top, left = (side - h) // 2, (side - w) // 2
            canvas[top : top + h, left : left + w] = image
            image = canvas
        else:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            image = image[top : top + side, left : left + side]
    if image.shape[0] == size:
        return image.astype(np.float32)
    resample = Image.Resampling.BOX if image.shape[0] > size else Image.Resampling.BICUBIC
    out = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), resample))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def write_png(path: Path, image01: np.ndarray, bit_depth: int = 8, text: dict[str, str] | None = None) -> None:
    """Write a [0, 1] float image as an 8- or 16-bit grayscale PNG, atomically, with optional text chunks."""
    from PIL import PngImagePlugin

    image01 = np.clip(image01, 0.0, 1.0)
    if bit_depth == 16:
        im = Image.fromarray(np.round(image01 * 65535).astype(np.uint16))
    elif bit_depth == 8:
        im = Image.fromarray(np.round(image01 * 255).astype(np.uint8), mode="L")
    else:
        raise ValueError("bit_depth must be 8 or 16")
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    im.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
