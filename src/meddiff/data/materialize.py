"""RecordTable -> ImageLabelDataset: every image (raster, DICOM or NIfTI slice) is decoded once, preprocessed
deterministically (square crop or pad, resize in float precision) into a prepared, memory-mapped store
(meddiff.data.store; in the cache, keyed by the sources, or in a folder of `meddiff data prepare`); the label
policy and prompts come from the table. Missing and unreadable files are skipped, counted and listed, never
dropped silently."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.decode import decode, tasks_for
from meddiff.data.io import is_nifti
from meddiff.data.prompts import PromptOptions, prompt_for
from meddiff.data.records import LabelPolicy, RecordTable
from meddiff.data.store import ImageStore, MappedImages, Prompts, StoreIndex, fingerprint, prepare_or_wait, write_store
from meddiff.devices import usable_cores
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
COMMON_OPTIONS = ("fit", "cache", "prompt_view", "prompt_demographics", "uncertain", "demographics")


def _flag(value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Preprocess:
    resolution: int
    fit: str = "crop"
    use_cache: bool = True
    prompt: PromptOptions = PromptOptions()

    @classmethod
    def from_options(cls, options: dict[str, str], resolution: int, subject: str = "chest x-ray") -> Preprocess:
        fit = options.get("fit", "crop")
        if fit not in ("crop", "pad"):
            raise MeddiffError(f"fit= must be crop or pad, got {fit!r}")
        uncertain = options.get("uncertain", "omit")
        if uncertain not in ("omit", "possible"):
            raise MeddiffError(f"uncertain= must be omit or possible, got {uncertain!r}")
        return cls(
            resolution,
            fit,
            _flag(options.get("cache"), True),
            PromptOptions(
                subject, _flag(options.get("prompt_view")), _flag(options.get("prompt_demographics")), uncertain
            ),
        )


def store_items(table: RecordTable) -> list[tuple[str, int | None, int]]:
    """(path, NIfTI slice or None, axis) per record: what determines each stored image."""
    return [
        (str(r.path), r.slice_index if r.slice_index is not None and is_nifti(r.path) else None, r.slice_axis)
        for r in table.records
    ]


def default_workers(n: int) -> int:
    """Decoding processes for n images: none for small sets (a pool costs a second to start), else the cores."""
    env = os.environ.get("MEDDIFF_PREPARE_WORKERS")
    if env:
        return max(int(env), 0)
    return 0 if n < 500 else min(usable_cores(), 16)


def _read_all(items, prep: Preprocess, progress: bool) -> tuple[list[int], list[np.ndarray], list]:
    """Without a store (cache=0): decode in this process, keeping the stored integer precision."""
    keep, images, problems = [], [], []
    tasks, members = tasks_for(items)
    for task, task_members in zip(
        tqdm(tasks, desc="read images", unit="file", disable=not progress or len(tasks) < 500), members
    ):
        for record, (arr, problem) in zip(task_members, decode((task, prep.resolution, prep.fit))):
            if arr is None:
                problems.append((items[record][0], problem))
            else:
                keep.append(record)
                images.append(arr)
    return keep, images, problems


def report_problems(problems: list[tuple[str, str]], total: int, source: str) -> None:
    if not problems:
        return
    kinds = Counter("missing" if reason == "missing" else "unreadable" for _, reason in problems)
    what = ", ".join(f"{n} {k}" for k, n in kinds.items())
    logger.warning(
        "%s: skipped %d of %d images (%s); first: %s (%s); `meddiff data inspect` lists them all",
        source,
        len(problems),
        total,
        what,
        problems[0][0],
        problems[0][1],
    )


@dataclass(frozen=True)
class MaterializePlan:
    """How a file-based kind turns a spec into images: its record table, label policy and preprocessing."""

    table: RecordTable
    policy: LabelPolicy
    prep: Preprocess
    multiclass: bool = False

    def materialize(self, spec_key: str, progress: bool = True) -> ImageLabelDataset:
        return materialize(self.table, self.policy, self.prep, spec_key, self.multiclass, progress)


def table_index(table: RecordTable, policy: LabelPolicy, prep: Preprocess, keep, multiclass: bool) -> StoreIndex:
    """Labels, known-masks, prompts, patients and paths of the kept records (the index a store carries)."""
    kept = [table.records[i] for i in np.asarray(keep, np.int64)]
    labels, known = policy.apply(kept, table.label_names)
    prompts = [
        r.text if r.text else prompt_for(r.values, table.label_names, prep.prompt, r.view, r.sex, r.age) for r in kept
    ]
    return StoreIndex.build(
        table.label_names,
        labels,
        known,
        prompts,
        [r.patient for r in kept],
        [str(r.path) for r in kept],
        multiclass,
        not any(r.text for r in kept),
    )


def prepare_store(
    table: RecordTable,
    policy: LabelPolicy,
    prep: Preprocess,
    spec_key: str,
    folder: Path | None = None,
    multiclass: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> ImageStore:
    """The prepared store of `table` at `prep.resolution`: in `folder`, or in the cache under its key."""
    items = store_items(table)
    key = fingerprint(items, {"resolution": prep.resolution, "fit": prep.fit})
    folder = Path(folder) if folder is not None else cache.cache_root() / "stores" / key
    workers = default_workers(len(items)) if workers is None else workers
    meta = {"spec": spec_key, "source": table.source, "label_names": list(table.label_names)}

    def write() -> ImageStore:
        return write_store(
            folder,
            key,
            items,
            prep.resolution,
            prep.fit,
            meta,
            index_fn=lambda keep: table_index(table, policy, prep, keep, multiclass),
            workers=workers,
            progress=progress,
        )

    return prepare_or_wait(folder, key, write)


def materialize(
    table: RecordTable,
    policy: LabelPolicy,
    prep: Preprocess,
    spec_key: str,
    multiclass: bool = False,
    progress: bool = True,
) -> ImageLabelDataset:
    """The dataset of `table`: images memory-mapped from its prepared store (written on first use), labels and
    prompts from the table (label options and prompt options never need the pixels again)."""
    keep: np.ndarray | list[int]  # the table rows that gave an image
    if prep.use_cache:
        store = prepare_store(table, policy, prep, spec_key, multiclass=multiclass, progress=progress)
        keep, images, problems, key = np.asarray(store.keep), store.images, store.problems, store.key
    else:
        items = store_items(table)
        keep, arrays, problems = _read_all(items, prep, progress)
        wide = any(a.dtype == np.uint16 for a in arrays)
        stack = (
            np.stack([a.astype(np.uint16) * 257 if wide and a.dtype == np.uint8 else a for a in arrays])
            if arrays
            else np.zeros((0, prep.resolution, prep.resolution), np.uint8)
        )
        images, key = MappedImages([stack]), ""
    report_problems(problems, len(table.records), table.source)
    index = table_index(table, policy, prep, keep, multiclass)
    return ImageLabelDataset(
        images,
        torch.from_numpy(index.labels),
        torch.from_numpy(index.known),
        list(table.label_names),
        prompts=Prompts(index.prompt_texts, index.prompt_ids),
        skipped=len(problems),
        problems=problems,
        multiclass=multiclass,
        prompts_from_labels=index.prompts_from_labels,
        store_key=key,
        patients=list(index.patients) if any(index.patients) else [],
    )
