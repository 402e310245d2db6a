"""Turning NIfTI volumes in a record table into one record per 2D slice (options axis= and slices=)."""

from __future__ import annotations

from dataclasses import replace

from meddiff.data.io import is_nifti
from meddiff.data.records import RecordTable
from meddiff.errors import MeddiffError

VOLUME_OPTIONS = ("axis", "slices")


def _slice_range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise MeddiffError(f"slices= must be START:STOP, got {text!r}") from None
    return lo, hi


def expand_volumes(table: RecordTable, options: dict[str, str]) -> RecordTable:
    try:
        axis = int(options.get("axis", "2"))
    except ValueError:
        raise MeddiffError("axis= must be 0, 1 or 2") from None
    if axis not in (0, 1, 2):
        raise MeddiffError("axis= must be 0, 1 or 2")
    window = _slice_range(options.get("slices"))
    out = []
    for rec in table.records:
        if not is_nifti(rec.path):
            out.append(rec)
            continue
        try:
            import nibabel as nib

            shape = nib.load(str(rec.path)).shape  # type: ignore[attr-defined]  # nibabel types load() as any file image
        except Exception:  # unreadable: keep one record so the problem is counted and listed when read
            out.append(replace(rec, slice_index=0, slice_axis=axis))
            continue
        n = shape[axis] if len(shape) > axis else 1
        lo, hi = window if window else (0, n)
        out.extend(replace(rec, slice_index=i, slice_axis=axis) for i in range(max(lo, 0), min(hi, n)))
    return RecordTable(out, table.label_names, table.source, table.notes)
