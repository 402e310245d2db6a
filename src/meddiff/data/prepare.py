"""`meddiff data prepare SPEC --out DIR`: preprocess into the cache and write what was prepared."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from meddiff.data.spec import load_dataset


def prepare(spec: str, out: Path, resolution: int) -> Path:
    ds = load_dataset(spec, resolution)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", *ds.label_names, "prompt"])
        for i in range(len(ds)):
            cells = [("1" if ds.labels[i, k] > 0.5 else "0") if ds.known[i, k] else "" for k in range(len(ds.label_names))]
            w.writerow([i, *cells, ds.prompts[i]])
    with open(out / "skipped.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason"])
        w.writerows(ds.problems)
    (out / "summary.json").write_text(json.dumps({"spec": spec, "resolution": resolution, "images": len(ds),
                                                  "skipped": ds.skipped, "label_counts": ds.label_counts()}, indent=2))
    print(ds.summary())
    return manifest
