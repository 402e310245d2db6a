"""Decoding one image (or the slices of one NIfTI volume) to the stored integers of a prepared store.

Runs in the store writer's worker processes, so it imports only numpy, Pillow and meddiff.data.io (no torch):
a worker starts in well under a second."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.data.io import UnreadableImage, read_image, read_nifti_slices, resize, source_bit_depth


@dataclass(frozen=True)
class DecodeTask:
    """One unit of decoding work: a raster/DICOM file, or every wanted slice of one NIfTI volume."""

    path: str
    slices: tuple[int, ...] = ()  # NIfTI slice indices (empty: a 2D file)
    axis: int = 2


def to_stored(image01: np.ndarray, depth: int) -> np.ndarray:
    """[0, 1] floats -> uint8 (8-bit sources) or uint16 (everything with more precision)."""
    if depth == 16:
        return np.round(np.clip(image01, 0, 1) * 65535).astype(np.uint16)
    return np.round(np.clip(image01, 0, 1) * 255).astype(np.uint8)


def decode(job: tuple[DecodeTask, int, str]) -> list[tuple[np.ndarray | None, str]]:
    """(stored array or None, problem) for each image of the task, preprocessed to resolution x resolution."""
    task, resolution, fit = job
    n = max(len(task.slices), 1)
    try:
        if task.slices:
            by_index = dict(read_nifti_slices(Path(task.path), axis=task.axis))
            images, depth = [by_index.get(i) for i in task.slices], 16
        else:
            images, depth = [read_image(Path(task.path), draft=resolution)], source_bit_depth(Path(task.path))
    except FileNotFoundError:
        return [(None, "missing")] * n
    except UnreadableImage as exc:
        return [(None, str(exc).split(": ", 1)[-1])] * n
    except Exception as exc:  # a decoder's own failure on a damaged file: counted and listed, never a crash
        return [(None, f"{type(exc).__name__}: {exc}")] * n
    return [
        (None, "slice out of range") if im is None else (to_stored(resize(im, resolution, fit), depth), "")
        for im in images
    ]


def tasks_for(items: Sequence[tuple[str, int | None, int]]) -> tuple[list[DecodeTask], list[list[int]]]:
    """(path, slice index or None, axis) per record -> decode tasks, and for each task the records it yields
    (adjacent slices of one volume become one task: the volume is read once)."""
    tasks: list[DecodeTask] = []
    members: list[list[int]] = []
    i = 0
    while i < len(items):
        path, sl, axis = items[i]
        if sl is None:
            tasks.append(DecodeTask(path))
            members.append([i])
            i += 1
            continue
        j = i
        while j < len(items) and items[j][0] == path and items[j][1] is not None and items[j][2] == axis:
            j += 1
        tasks.append(DecodeTask(path, tuple(int(s) for _, s, _ in items[i:j] if s is not None), axis))
        members.append(list(range(i, j)))
        i = j
    return tasks, members


JPEG_SUFFIXES = (".jpg", ".jpeg")
_open_targets: dict[str, np.ndarray] = {}  # this worker's open shard files (at most two shards are in flight)


def always_8bit(task: DecodeTask) -> bool:
    """Whether a task can only give 8-bit images (JPEG): its shard's type is then known before decoding."""
    return not task.slices and task.path.lower().endswith(JPEG_SUFFIXES)


def decode_into(job: tuple[DecodeTask, int, str, str, int]) -> list[tuple[np.ndarray | bool | None, str]]:
    """Decode like `decode` and write each image straight into row `slot`, `slot + 1`, ... of the uint8 shard file
    `target` (a memory map shared with the writer): only (True, "") or (None, problem) travel back, not the pixels.
    An image that is not 8-bit after all comes back as its array (the writer then falls back)."""
    task, resolution, fit, target, slot = job
    results = decode((task, resolution, fit))
    out = _open_targets.get(target)
    if out is None:
        if len(_open_targets) >= 2:
            _open_targets.clear()
        out = _open_targets[target] = np.load(target, mmap_mode="r+")
    answers: list[tuple[np.ndarray | bool | None, str]] = []
    for i, (arr, problem) in enumerate(results):
        if arr is None:
            answers.append((None, problem))
        elif arr.dtype != out.dtype:
            answers.append((arr, ""))
        else:
            out[slot + i] = arr
            answers.append((True, ""))
    return answers
