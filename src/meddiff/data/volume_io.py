"""Reading and writing 3D volumes: NIfTI files and DICOM series folders, always as RAS-ordered arrays.

`read_volume` returns (array (X, Y, Z) float32, RAS affine) reoriented with nibabel's closest canonical
orientation, or raises VolumeError with a one-line reason (the caller counts and logs skips). `write_nifti`
writes an array with its affine, millimetre units and a description (e.g. marking synthetic data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class VolumeError(Exception):
    """A volume that cannot be used (the reason is one line); datasets count these as skipped files."""


def is_nifti_path(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name.rsplit(".", 1)[0]


def _as_3d(data: np.ndarray, what: str) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise VolumeError(f"{what} is a 4D series of {data.shape[-1]} volumes; give one volume")
    if data.ndim != 3 or min(data.shape) < 2:
        raise VolumeError(f"{what} is a 2D image of shape {tuple(data.shape)}, not a volume")
    return data


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image: nib.Nifti1Image = nib.load(str(path))  # type: ignore[assignment]
        if len(image.shape) < 3 or min(image.shape[:3]) < 2:
            raise VolumeError(f"{path.name} is a 2D image of shape {tuple(image.shape)}, not a volume")
        canonical = nib.as_closest_canonical(image)
        data = np.asarray(canonical.dataobj, dtype=np.float32)
    except VolumeError:
        raise
    except Exception as err:  # nibabel raises many kinds (gzip, header, EOF) for damaged files
        raise VolumeError(f"{path.name} is not a readable NIfTI file ({type(err).__name__})") from None
    return _as_3d(data, path.name), np.asarray(canonical.affine, np.float64)


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The largest series of a folder of DICOM slices, sorted along the slice normal by ImagePositionPatient."""
    import pydicom

    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
            ds.ImagePositionPatient, ds.ImageOrientationPatient  # noqa: B018  (must exist)
        except Exception:
            continue
        slices.append(ds)
    if not slices:
        raise VolumeError(f"{folder.name}/ holds no DICOM slices with positions")
    by_series: dict[str, list] = {}
    for ds in slices:
        by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(ds)
    series = max(by_series.values(), key=len)
    if len(series) < 2:
        raise VolumeError(f"{folder.name}/ holds a single DICOM slice, not a volume")
    row, col = (np.asarray(v, np.float64) for v in np.split(np.asarray(series[0].ImageOrientationPatient, float), 2))
    normal = np.cross(row, col)
    series.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    try:
        planes = [
            ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
            + float(getattr(ds, "RescaleIntercept", 0) or 0)
            for ds in series
        ]
        data = np.stack(planes, axis=-1)  # (rows, columns, slices)
    except Exception as err:
        raise VolumeError(f"{folder.name}/: DICOM pixels unreadable or of mixed sizes ({type(err).__name__})") from None
    first, last = (np.asarray(ds.ImagePositionPatient, float) for ds in (series[0], series[-1]))
    dr, dc = (float(v) for v in series[0].PixelSpacing)
    step = (last - first) / (len(series) - 1)
    lps = np.eye(4)  # voxel (i=row, j=column, k=slice) -> LPS mm
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = col * dr, row * dc, step, first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    import nibabel as nib

    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asarray(canonical.dataobj, np.float32), np.asarray(canonical.affine, np.float64)


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (X, Y, Z) float32 in RAS order, its RAS affine) from a NIfTI file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path} is missing")
    data, affine = read_dicom_series(path) if path.is_dir() else read_nifti(path)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    if float(data.max()) == float(data.min()):
        raise VolumeError(f"{path.name} is constant ({float(data.min()):g} everywhere): no image")
    return data, affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, description: str = "", dtype=np.int16) -> Path:
    """Write a 3D array with its affine (qform and sform), mm units and a description; floats are stored scaled."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(data), np.asarray(affine, np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.set_data_dtype(dtype)
    if description:
        image.header["descrip"] = description.encode()[:79]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
