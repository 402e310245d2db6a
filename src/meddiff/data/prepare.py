"""`meddiff data prepare SPEC --out DIR --resolution R --workers W`: decode a dataset once into a prepared store
in DIR (memory-mapped shards plus its index), then train from it with `--data store:DIR`. Also writes
manifest.csv (one row per stored image: labels, prompt, patient, source), skipped.csv and summary.json."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from meddiff.data.materialize import MaterializePlan, prepare_store, report_problems
from meddiff.data.spec import LOADERS, DatasetSpec, check_options, parse_spec
from meddiff.data.store import describe_store
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)


def _plan(spec: DatasetSpec, resolution: int) -> MaterializePlan:
    loader = LOADERS[spec.kind]
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
