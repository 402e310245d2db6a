"""RecordTable -> ImageLabelDataset: read every image (raster, DICOM or NIfTI slice), preprocess it
deterministically (square crop or pad, resize in float precision), apply the label policy, build prompts, and
cache the result. Missing and unreadable files are skipped, counted and listed, never dropped silently."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset, to_model_range
from meddiff.data.io import UnreadableImage, is_nifti, read_image, read_nifti_slices, resize
from meddiff.data.prompts import PromptOptions, prompt_for
from meddiff.data.records import LabelPolicy, RecordTable
from meddiff.errors import MeddiffError

COMMON_OPTIONS = ("fit", "cache", "prompt_view", "prompt_demographics", "uncertain")


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
    def from_options(cls, options: dict[str, str], resolution: int, subject: str = "chest x-ray") -> "Preprocess":
        fit = options.get("fit", "crop")
        if fit not in ("crop", "pad"):
            raise MeddiffError(f"fit= must be crop or pad, got {fit!r}")
        uncertain = options.get("uncertain", "omit")
        if uncertain not in ("omit", "possible"):
            raise MeddiffError(f"uncertain= must be omit or possible, got {uncertain!r}")
        return cls(resolution, fit, _flag(options.get("cache"), True),
                   PromptOptions(subject, _flag(options.get("prompt_view")),
                                 _flag(options.get("prompt_demographics")), uncertain))


def _read_all(table: RecordTable, prep: Preprocess, progress: bool) -> tuple[list[int], list[np.ndarray], list]:
    keep, images, problems = [], [], []
    volumes: dict[Path, dict[int, np.ndarray]] = {}  # slices of the volume being read
    for i, rec in enumerate(tqdm(table.records, desc="read images", unit="img",
                                 disable=not progress or len(table.records) < 500)):
        try:
            if rec.slice_index is not None and is_nifti(rec.path):
                if rec.path not in volumes:
                    volumes.clear()  # one volume in memory at a time (records of a volume are adjacent)
                    volumes[rec.path] = dict(read_nifti_slices(rec.path, axis=rec.slice_axis))
                image = volumes[rec.path][rec.slice_index]
            else:
                image = read_image(rec.path)
            images.append(resize(image, prep.resolution, prep.fit))
            keep.append(i)
        except FileNotFoundError:
            problems.append((str(rec.path), "missing"))
        except UnreadableImage as exc:
            problems.append((str(rec.path), str(exc).split(": ", 1)[-1]))
    return keep, images, problems


def report_problems(problems: list[tuple[str, str]], total: int, source: str) -> None:
    if not problems:
        return
    kinds = Counter("missing" if reason == "missing" else "unreadable" for _, reason in problems)
    what = ", ".join(f"{n} {k}" for k, n in kinds.items())
    print(f"warning: {source}: skipped {len(problems)} of {total} images ({what}); first: "
          f"{problems[0][0]} ({problems[0][1]}); `meddiff data inspect` lists them all")


def materialize(table: RecordTable, policy: LabelPolicy, prep: Preprocess, spec_key: str,
                multiclass: bool = False, progress: bool = True) -> ImageLabelDataset:
    names = table.label_names
    records = table.records
    key = cache.cache_key({"spec": spec_key, "resolution": prep.resolution, "fit": prep.fit},
                          sorted({r.path for r in records}))
    hit = cache.load(key) if prep.use_cache else None
    if hit is not None:
        keep = hit["keep"].tolist()
        images01 = cache.images_from_uint16(hit["images"])
        problems = [tuple(p) for p in hit["meta"]["problems"]]
    else:
        keep, images, problems = _read_all(table, prep, progress)
        images01 = np.stack(images) if images else np.zeros((0, prep.resolution, prep.resolution), np.float32)
        if prep.use_cache and keep:
            cache.store(key, {"images": cache.images_to_uint16(images01), "keep": np.asarray(keep, np.int64)},
                        {"problems": problems, "source": table.source})
    report_problems(problems, len(records), table.source)
    kept = [records[i] for i in keep]
    labels, known = policy.apply(kept, names)
    prompts = [r.text if r.text else prompt_for(r.values, names, prep.prompt, r.view, r.sex, r.age) for r in kept]
    return ImageLabelDataset(to_model_range(images01), torch.from_numpy(labels), torch.from_numpy(known), list(names),
                             prompts=prompts, skipped=len(problems), problems=problems, multiclass=multiclass,
                             prompts_from_labels=not any(r.text for r in kept))
