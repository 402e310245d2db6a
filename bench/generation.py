"""Synthetic-dataset generation at scale: throughput per scheduler, kill-and-resume identity, batch-size
invariance.

    python bench/generation.py --model RUN_DIR --conditions LABELS.csv [--n 1000] [--kill-after 30]

1. generates N images mirroring the conditions CSV row by row, uninterrupted;
2. generates the same N in another folder, SIGKILLs the process after --kill-after seconds, resumes, and
   compares every file's SHA-1 with run 1;
3. generates the first 32 images with batch size 1 and 16 and compares hashes;
4. times each scheduler setting on 64 images.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted((folder / "images").glob("*"))}


def generate(args_list: list[str], kill_after: float | None = None) -> float:
    cmd = [sys.executable, "-m", "meddiff", "generate", *args_list]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return time.perf_counter() - t0
    if proc.wait():
        raise SystemExit(f"generation failed: {' '.join(cmd)}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--conditions", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--kill-after", type=float, default=30.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from common import write_results

    tmp = Path(tempfile.mkdtemp())
    base = ["--model", args.model, "--conditions", args.conditions, "--n", str(args.n), "--steps", "20"]
    rows = []
    seconds = generate(base + ["--out", str(tmp / "straight")])
    rows.append(
        {
            "check": f"{args.n} images, dpm++ 20, uninterrupted",
            "result": f"{seconds:.1f} s",
            "img_per_s": round(args.n / seconds, 2),
        }
    )
    killed_at = generate(base + ["--out", str(tmp / "resumed")], kill_after=args.kill_after)
    done_before = len(list((tmp / "resumed" / "images").glob("*.png")))
    generate(base + ["--out", str(tmp / "resumed")])
    same = hashes(tmp / "straight") == hashes(tmp / "resumed")
    manifest_same = (tmp / "straight" / "manifest.csv").read_bytes() == (tmp / "resumed" / "manifest.csv").read_bytes()
    rows.append(
        {
            "check": f"SIGKILL after {killed_at:.0f} s ({done_before} done), resume",
            "result": f"identical files: {same}, identical manifest: {manifest_same}",
        }
    )
    small = ["--model", args.model, "--conditions", args.conditions, "--n", "32", "--steps", "20"]
    generate(small + ["--batch-size", "1", "--out", str(tmp / "b1")])
    generate(small + ["--batch-size", "16", "--out", str(tmp / "b16")])
    rows.append(
        {"check": "32 images, batch 1 vs batch 16", "result": f"identical: {hashes(tmp / 'b1') == hashes(tmp / 'b16')}"}
    )
    for name, steps in (("ddpm", 1000), ("ddim", 50), ("pndm", 75), ("dpm++", 25), ("dpm++", 20), ("dpm++", 10)):
        n = 16 if steps >= 500 else 64
        s = generate(
            [
                "--model",
                args.model,
                "--conditions",
                args.conditions,
                "--n",
                str(n),
                "--steps",
                str(steps),
                "--scheduler",
                name,
                "--out",
                str(tmp / f"t-{name}-{steps}"),
            ]
        )
        rows.append(
            {"check": f"throughput {name} x{steps}", "result": f"{n} images in {s:.1f} s", "img_per_s": round(n / s, 2)}
        )
    write_results("generation", rows, ["check", "result", "img_per_s"], args.out)


if __name__ == "__main__":
    main()
