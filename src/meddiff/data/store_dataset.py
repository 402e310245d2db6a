"""`store:DIR` datasets: a store written by `meddiff data prepare SPEC --out DIR`, memory-mapped (nothing is
decoded again; the source files need not be present). Its held-out split is the held-out split of the spec it
was prepared from (`store:DIR?split=heldout`)."""

from __future__ import annotations

from pathlib import Path

import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.materialize import report_problems
from meddiff.data.registry import DatasetSpec, load, register
from meddiff.data.store import Prompts, describe_store, open_store
from meddiff.errors import MeddiffError


@register("store", heldout_split="heldout", options=("split",))
def load_store(spec: DatasetSpec, resolution: int) -> ImageLabelDataset:
    folder = Path(spec.path).expanduser()
    meta = describe_store(folder)
    if meta is None:
        partial = folder.parent / f"{folder.name}.partial"
        hint = (
            " (an interrupted preparation: run the same `meddiff data prepare` again to finish it)"
            if partial.is_dir()
            else ""
        )
        raise MeddiffError(
            f"{folder} is not a prepared store{hint}; create it with "
            f"`meddiff data prepare SPEC --out {folder} --resolution R`"
        )
    if spec.options.get("split", "train") == "heldout":
        return load(DatasetSpec.parse(meta["spec"]).heldout(), resolution)
    if int(meta.get("resolution", 0)) != resolution:
        raise MeddiffError(
            f"{folder} was prepared at {meta.get('resolution')} px, not {resolution} px; use "
            f"--resolution {meta.get('resolution')} or prepare it again at {resolution} px"
        )
    store = open_store(folder, meta.get("key"))
    index = store.index() if store is not None else None
    if store is None or index is None:
        raise MeddiffError(
            f"{folder} is damaged (a shard or its index is missing or has the wrong size); prepare it again"
        )
    report_problems(store.problems, int(meta.get("records", len(store.images))), str(spec))
    return ImageLabelDataset(
        store.images,
        torch.from_numpy(index.labels),
        torch.from_numpy(index.known),
        list(index.label_names),
        prompts=Prompts(index.prompt_texts, index.prompt_ids),
        skipped=len(store.problems),
        problems=store.problems,
        multiclass=index.multiclass,
        prompts_from_labels=index.prompts_from_labels,
        store_key=store.key,
        patients=list(index.patients) if any(index.patients) else [],
    )
