"""Data loading speed against the training step rate: does the loader keep training fed?

    python bench/loader.py [--n 1000] [--source-size 256] [--resolution 64]

Writes N phantom PNGs (source-size px, like downsized radiographs) as a CheXpert-format folder, then measures
img/s of (a) a cold load (read + decode + resize + cache write), (b) a warm load from the cache, (c) batch
assembly in the training loop, and compares them with training img/s at the same resolution."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--source-size", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    os.environ["MEDDIFF_CACHE"] = str(tmp / "cache")

    import torch

    from common import write_results
    from meddiff.data.phantom_dataset import write_phantom_folder
    from meddiff.data.spec import load_dataset
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import batch_indices, train

    write_phantom_folder(tmp / "ph", n=args.n, size=args.source_size, seed=0, valid_fraction=0.01, progress=False)
    spec = f"phantom:{tmp / 'ph'}"
    t0 = time.perf_counter()
    ds = load_dataset(spec, args.resolution)
    cold = len(ds) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    ds = load_dataset(spec, args.resolution)
    warm = len(ds) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(200):
        idx = torch.from_numpy(batch_indices(len(ds), 32, 0, step))
        _ = ds.images[idx], ds.labels[idx], ds.known[idx]
    batches = 200 * 32 / (time.perf_counter() - t0)
    result = train(
        TrainConfig(out=str(tmp / "run"), resolution=args.resolution, max_steps=args.train_steps, checkpoint_every=0),
        ds,
        progress=False,
    )
    rows = [
        {"stage": "cold load (decode+resize+cache)", "img_per_s": round(cold, 1)},
        {"stage": "warm load (cache)", "img_per_s": round(warm, 1)},
        {"stage": "batch assembly in the loop", "img_per_s": round(batches, 1)},
        {"stage": f"training at {args.resolution} px", "img_per_s": round(result.images_per_second, 1)},
    ]
    write_results("loader", rows, ["stage", "img_per_s"], args.out)


if __name__ == "__main__":
    main()
