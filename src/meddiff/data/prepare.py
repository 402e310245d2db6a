"""`meddiff data prepare SPEC --out DIR --resolution R --workers W`: decode a dataset once into a prepared store
in DIR (memory-mapped shards plus its index), then train from it with `--data store:DIR`. Also writes
manifest.csv (one row per stored image: labels, prompt, patient, source), skipped.csv and summary.json.

Volume specs (`volumes:`, `phantom3d:`) are prepared where training looks for them: each split is decoded once into
its memory-mapped store in the cache ($MEDDIFF_CACHE/volumes-KEY), which `meddiff train --data SPEC` then maps
without decoding; `prepare_volumes` builds the training split and, unless the spec names a split, the held-out one,
and can write the same summary files into a folder."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from meddiff.data.inspect import is_volume_spec, load_volume_dataset, volume_store
from meddiff.data.materialize import MaterializePlan, prepare_store, report_problems
from meddiff.data.spec import LOADERS, DatasetSpec, check_options, parse_spec
from meddiff.data.store import describe_store
from meddiff.data.volume_dataset import VolumeDataset
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)


def _plan(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    loader = LOADERS[spec.kind]
    if is_volume_spec(spec):
        raise MeddiffError(f"{spec.kind}: volumes are prepared into the cache with prepare_volumes(spec, edge)")
    if loader.plan is None:
        raise MeddiffError(
            f"{spec.kind}: datasets are read into memory whole (no image files to prepare); train "
            "from the spec directly"
        )
    return loader.plan(spec, resolution)


def prepare(spec_text: str, out: Path, resolution: int, workers: int | None = None, progress: bool = True) -> Path:
    spec = parse_spec(spec_text)
    check_options(spec)
    out = Path(out)
    plan = _plan(spec, resolution)
    table = plan.table
    existing = describe_store(out)
    if (
        existing is None
        and out.is_dir()
        and any(p.name not in ("manifest.csv", "skipped.csv", "summary.json") for p in out.iterdir())
    ):
        raise MeddiffError(f"{out} is a folder with other files, not a prepared store; choose a new or empty --out")
    store = prepare_store(
        table,
        plan.policy,
        plan.prep,
        str(spec),
        folder=out,
        multiclass=plan.multiclass,
        workers=workers,
        progress=progress,
    )
    if existing is not None and existing.get("key") != store.key:
        logger.info(
            "note: %s held a store of other sources or another resolution (%s at %s px); it was rebuilt",
            out,
            existing.get("spec"),
            existing.get("resolution"),
        )
    report_problems(store.problems, len(table.records), table.source)
    index = store.index()
    assert index is not None  # a store prepared from files always has its index
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", *index.label_names, "prompt", "patient", "source"])
        for i in range(len(index.labels)):
            cells = [
                ("1" if index.labels[i, k] > 0.5 else "0") if index.known[i, k] else ""
                for k in range(len(index.label_names))
            ]
            w.writerow([i, *cells, index.prompt_texts[index.prompt_ids[i]], index.patients[i], index.paths[i]])
    with open(out / "skipped.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason"])
        w.writerows(store.problems)
    counts = {
        name: int(((index.labels[:, k] > 0.5) & index.known[:, k]).sum()) for k, name in enumerate(index.label_names)
    }
    shards = store.meta["shards"]
    nbytes = sum((out / s["file"]).stat().st_size for s in shards)
    summary = {
        "spec": str(spec),
        "resolution": resolution,
        "images": len(store.images),
        "skipped": len(store.problems),
        "label_counts": counts,
        "key": store.key,
        "shards": len(shards),
        "bytes": nbytes,
        "dtypes": sorted({s["dtype"] for s in shards}),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info(
        "prepared %d images at %s px in %s (%d shards, %.1f MB, %s); %d skipped; train with --data store:%s",
        len(store.images),
        resolution,
        out,
        len(shards),
        nbytes / 1e6,
        "/".join(summary["dtypes"]),
        len(store.problems),
        out,
    )
    return out / "manifest.csv"


def _volume_split(spec: DatasetSpec, edge: int) -> tuple[dict, VolumeDataset]:
    dataset = load_volume_dataset(spec, edge)  # decodes into the cache store unless it is there
    store = volume_store(dataset)
    summary = {
        "spec": str(spec),
        "split": spec.options.get("split", "train"),
        "cases": len(dataset),
        "skipped": len(dataset.problems),
        "shape": list(dataset.shape[1:]),
        "spacing": [round(v, 4) for v in dataset.spacing],
        "channels": list(dataset.channel_names),
        "label_counts": dataset.label_counts(),
        "store": str(store),
        "bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file()),
    }
    return summary, dataset


def prepare_volumes(spec_text: str, edge: int, out: Path | None = None) -> dict:
    """Build the store(s) of a volume spec at a grid edge of `edge` voxels (unless its shape= says otherwise): the
    spec's split and, where the spec names no split, its held-out split too (what training loads; a held-out split
    that cannot be built is noted, not an error). With `out`: summary.json, manifest.csv (one row per case: split,
    index, case id, labels) and skipped.csv there. Returns the summary."""
    spec = parse_spec(spec_text)
    check_options(spec)
    if not is_volume_spec(spec):
        raise MeddiffError(f"{spec} is not volume data; prepare image datasets with prepare(spec, out, resolution)")
    if out is not None:
        out = Path(out)
        if describe_store(out) is not None or (out.exists() and not out.is_dir()):
            raise MeddiffError(f"{out} holds a prepared image store or is a file; choose a new or empty --out")
    specs = [spec] + ([spec.heldout()] if "split" not in spec.options else [])
    splits: list[dict] = []
    datasets: list[VolumeDataset] = []
    for i, split_spec in enumerate(specs):
        try:
            summary, dataset = _volume_split(split_spec, edge)
        except MeddiffError as err:
            if i == 0:
                raise
            splits.append({"spec": str(split_spec), "split": split_spec.options.get("split"), "error": str(err)})
            continue
        splits.append(summary)
        datasets.append(dataset)
    result = {"spec": str(spec), "edge": edge, "splits": splits}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(result, indent=2))
        with open(out / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            names = datasets[0].label_names
            w.writerow(["split", "index", "case_id", *names])
            for summary, dataset in zip((s for s in splits if "error" not in s), datasets):
                columns = [dataset.label_names.index(n) if n in dataset.label_names else None for n in names]
                for i, case in enumerate(dataset.case_ids):
                    cells = [
                        "" if k is None or not dataset.known[i, k] else f"{float(dataset.labels[i, k]):g}"
                        for k in columns
                    ]
                    w.writerow([summary["split"], i, case, *cells])
        with open(out / "skipped.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "case", "reason"])
            for summary, dataset in zip((s for s in splits if "error" not in s), datasets):
                w.writerows([summary["split"], case, why] for case, why in dataset.problems)
    return result
