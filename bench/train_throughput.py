"""Training throughput of meddiff's loop (img/s, peak RSS) per resolution and precision.

    python bench/train_throughput.py [--resolutions 28 32 64] [--precisions fp32 bf16] [--steps 30]

Each configuration runs in its own process (so peak RSS is its own) through meddiff.training.loop.train on
in-memory phantoms with the default model config; warm-up steps are excluded from the rate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def one(resolution: int, precision: str, steps: int, batch: int) -> dict:
    from common import peak_rss_mb
    from meddiff.data.spec import load_dataset
    from meddiff.training.config import EvalConfig, TrainConfig
    from meddiff.training.loop import train

    data = load_dataset("phantom:?n=512&seed=0", resolution)
    with tempfile.TemporaryDirectory() as tmp:
        warm = TrainConfig(
            out=f"{tmp}/w",
            resolution=resolution,
            batch_size=batch,
            max_steps=5,
            precision=precision,
            checkpoint_every=0,
            eval=EvalConfig(fidelity=False),
        )
        train(warm, data, progress=False)
        cfg = TrainConfig(
            out=f"{tmp}/r",
            resolution=resolution,
            batch_size=batch,
            max_steps=steps,
            precision=precision,
            checkpoint_every=0,
            eval=EvalConfig(fidelity=False),
        )
        t0 = time.perf_counter()
        result = train(cfg, data, progress=False)
        wall = time.perf_counter() - t0
    return {
        "resolution": resolution,
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "params_M": round(result.parameters / 1e6, 2),
        "img_per_s": round(result.images_per_second, 1),
        "wall_s": round(wall, 1),
        "peak_rss_MB": round(peak_rss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[28, 32, 64])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", nargs=2, metavar=("RES", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(one(int(args.single[0]), args.single[1], args.steps, args.batch_size)))
        return
    from common import write_results

    rows = []
    for res in args.resolutions:
        for prec in args.precisions:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--single",
                    str(res),
                    prec,
                    "--steps",
                    str(args.steps),
                    "--batch-size",
                    str(args.batch_size),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"run {res}px {prec} failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    write_results(
        "train_throughput", rows, ["resolution", "precision", "batch", "params_M", "img_per_s", "peak_rss_MB"], args.out
    )


if __name__ == "__main__":
    main()
