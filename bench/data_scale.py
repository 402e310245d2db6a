"""Data at any size: does memory grow with the batch and the loader's workers rather than with the number of
images, is preparation parallel, and does the loader keep ahead of training?

For N in --sizes: a folder of N synthetic 640x512 JPEGs (two classes), prepared at --resolution with 2 workers
(`meddiff data prepare`), then --steps training steps in a fresh process reading it through the DataLoader (2
workers), --repeats times. Peak memory (PSS) of the training process plus its loader workers is sampled from /proc
(the least peak of the repeats is kept: allocator timing moves one run's peak by tens of MB); a + b*N is fitted.
Prepare times are the store's own (store.json: decoding and writing, not the command's start-up).
Also: prepare throughput with 1 vs 2 workers, and loader img/s with 2 workers against the training img/s of
the default model at 64 px.

    python bench/data_scale.py                       # N = 1k, 4k, 16k at 256 px, 50 steps
    python bench/data_scale.py --quick               # tiny sizes (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

HERE = Path(__file__).resolve()


def make_pool(folder: Path, n: int, size=(640, 512), seed: int = 0) -> list[Path]:
    """n smooth-with-noise grayscale JPEGs (about radiograph-like file sizes), in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    for i in range(n):
        cls = "A" if i % 2 == 0 else "B"
        path = folder / cls / f"img {i:06d}.jpg"
        files.append(path)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        cx, cy, r = rng.uniform(0.3, 0.7) * size[0], rng.uniform(0.3, 0.7) * size[1], rng.uniform(80, 220)
        img = 120 + 80 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) + rng.normal(0, 6, yy.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)
    return files


def subset(pool: list[Path], root: Path, n: int) -> Path:
    """A class folder holding the first n images of the pool (hard links: no copies)."""
    out = root / f"n{n}"
    for src in pool[:n]:
        dst = out / src.parent.name / src.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
    return out


def tree_rss_bytes(pid: int) -> int:
    """Memory of a process and all its descendants (Linux /proc): the sum of their proportional set sizes (PSS:
    pages shared between the training process and its forked loader workers are counted once, not per process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
            for t in Path(f"/proc/{p}/task").iterdir():
                kids = (t / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


def run_sampled(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak tree RSS in bytes, output) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = proc.communicate()[0]
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return time.perf_counter() - t0, peak[0], out


def prepare(folder: Path, out: Path, resolution: int, workers: int) -> float:
    """Seconds `meddiff data prepare` spent decoding and writing (its own measure in store.json: the command's
    start-up, about a second of imports whatever the size, is left out)."""
    run_sampled(
        [
            sys.executable,
            "-m",
            "meddiff",
            "data",
            "prepare",
            f"folder:{folder}?split=all",
            "--out",
            str(out),
            "--resolution",
            str(resolution),
            "--workers",
            str(workers),
        ]
    )
    return float(json.loads((out / "store.json").read_text())["prepare_seconds"])


# child processes -------------------------------------------------------------------------------------------------


def child_train(store: str, resolution: int, steps: int, batch: int, workers: int, small: bool, out: str) -> None:
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train

    ds = load_dataset(f"store:{store}", resolution)
    model = ModelConfig(block_out_channels=[16, 32, 32], layers_per_block=1) if small else ModelConfig()
    cfg = TrainConfig(
        data=f"store:{store}",
        out=out,
        resolution=resolution,
        batch_size=batch,
        max_steps=steps,
        checkpoint_every=0,
        log_every=1,
        lr_warmup_steps=0,
        loader_workers=workers,
        model=model,
        ema=False,
    )
    result = train(cfg, ds, progress=False)
    hist = result.loss_history
    warm = max(min(2, len(hist) - 2), 0)
    rate = (hist[-1][0] - hist[warm][0]) * batch / max(hist[-1][2] - hist[warm][2], 1e-9)
    print(json.dumps({"images_per_second": rate, "steps": result.steps}))


def child_loader(store: str, resolution: int, batches: int, batch: int, workers: int) -> None:
    import torch

    from meddiff.data.spec import load_dataset
    from meddiff.data.store import raw_to_model_range
    from meddiff.training.batches import StreamBatchSampler, make_loader

    ds = load_dataset(f"store:{store}", resolution)
    sampler = StreamBatchSampler(len(ds), batch, 0, 0, batches + 5)
    it = iter(make_loader(ds, sampler, torch.device("cpu"), workers))
    for _ in range(5):  # workers started, first batches ready
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        raw_to_model_range(next(it)["image"])
    print(json.dumps({"images_per_second": batches * batch / (time.perf_counter() - t0)}))


def last_json(out: str) -> dict:
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="training runs per size (the least peak is kept)")
    p.add_argument("--work", default="/tmp/meddiff-data-scale")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few steps (a smoke test of the bench)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", choices=("train", "loader"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "train":
        return child_train(args.store, args.resolution, args.steps, args.batch_size, args.workers, args.small, args.run)
    if args.child == "loader":
        return child_loader(args.store, args.resolution, args.steps, args.batch_size, args.workers)
    if args.quick:
        args.sizes, args.resolution, args.steps, args.repeats = [60, 120], 32, 3, 1
    work = Path(args.work)
    env = {"MEDDIFF_CACHE": str(work / "cache"), "TQDM_DISABLE": "1"}
    os.environ.update(env)
    pool = make_pool(work / "pool", max(args.sizes), size=(160, 128) if args.quick else (640, 512))
    rows = []
    for n in args.sizes:
        folder = subset(pool, work / "sets", n)
        store = work / f"store-{n}-{args.resolution}"
        prep_s = prepare(folder, store, args.resolution, 2) if not (store / "store.json").is_file() else None
        cmd = [
            sys.executable,
            str(HERE),
            "--child",
            "train",
            "--store",
            str(store),
            "--resolution",
            str(args.resolution),
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            "2",
            "--small",
            "--run",
            str(work / f"run-{n}"),
        ]
        peaks, rates = [], []
        for _ in range(args.repeats):  # the allocator's timing moves a peak by tens of MB: the least of R runs
            seconds, peak, out = run_sampled(cmd)
            peaks.append(peak)
            rates.append(last_json(out)["images_per_second"])
        rows.append(
            {
                "images": n,
                "prepare_s": round(prep_s, 1) if prep_s else None,
                "prepare_img_per_s": round(n / prep_s, 1) if prep_s else None,
                "train_steps": args.steps,
                "peak_rss_mb": round(min(peaks) / 2**20, 1),
                "peak_rss_mb_runs": [round(x / 2**20, 1) for x in peaks],
                "train_img_per_s": round(float(np.median(rates)), 2),
            }
        )
        print(rows[-1], flush=True)
    sizes = np.array([r["images"] for r in rows], float)
    peaks = np.array([r["peak_rss_mb"] for r in rows], float) * 2**20
    b, a = np.polyfit(sizes, peaks, 1) if len(rows) > 1 else (0.0, peaks[0])
    # parallel preparation: 1 vs 2 workers on the largest size, fresh stores
    n_big = max(args.sizes)
    folder = subset(pool, work / "sets", n_big)
    for w in (1, 2):
        shutil.rmtree(work / f"p{w}", ignore_errors=True)
    t1, t2 = (prepare(folder, work / f"p{w}", args.resolution, w) for w in (1, 2))
    for w in (1, 2):
        shutil.rmtree(work / f"p{w}", ignore_errors=True)
    n_mid = args.sizes[len(args.sizes) // 2]
    folder = subset(pool, work / "sets", n_mid)
    # loader (2 workers) against training at 64 px with the default model
    store64 = work / f"store-{n_mid}-64"
    if not (store64 / "store.json").is_file():
        prepare(folder, store64, 64, 2)
    _, _, out = run_sampled(
        [
            sys.executable,
            str(HERE),
            "--child",
            "loader",
            "--store",
            str(store64),
            "--resolution",
            "64",
            "--steps",
            "20" if args.quick else "200",
            "--batch-size",
            "32",
            "--workers",
            "2",
        ]
    )
    loader_rate = last_json(out)["images_per_second"]
    _, _, out = run_sampled(
        [
            sys.executable,
            str(HERE),
            "--child",
            "train",
            "--store",
            str(store64),
            "--resolution",
            "64",
            "--steps",
            "4" if args.quick else "12",
            "--batch-size",
            "32",
            "--workers",
            "2",
            "--run",
            str(work / "run-64"),
        ]
    )
    train64 = last_json(out)["images_per_second"]
    summary = {
        "fit_a_mb": round(a / 2**20, 1),
        "fit_b_bytes_per_image": round(float(b), 1),
        "prepare_1_worker_img_per_s": round(n_big / t1, 1),
        "prepare_2_workers_img_per_s": round(n_big / t2, 1),
        "prepare_speedup_2_vs_1": round(t1 / t2, 2),
        "loader_2_workers_img_per_s_64px": round(loader_rate, 1),
        "train_img_per_s_64px": round(train64, 1),
        "cpus": os.cpu_count(),
        "resolution": args.resolution,
    }
    write_results(
        "data_scale",
        rows,
        ["images", "prepare_s", "prepare_img_per_s", "train_steps", "peak_rss_mb", "train_img_per_s"],
        args.out,
        extra={"summary": summary},
    )
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(
        f"targets: b < 2048 B/image: {summary['fit_b_bytes_per_image'] < 2048}; prepare 2 vs 1 workers >= 1.6x: "
        f"{summary['prepare_speedup_2_vs_1'] >= 1.6}; loader >= 64 px training: {loader_rate >= train64}"
    )


if __name__ == "__main__":
    main()
