"""What the latent cache saves: two latent-diffusion runs on the same images and autoencoder, each in a fresh process
sharing one MEDDIFF_CACHE. The first encodes every image once (on the run's device) into the cache; the second must
start training without encoding anything. Reported per run: data loading, the method's set-up (encoding or cache
read), the training steps, and the whole run; the saving is run 1's set-up minus run 2's.

    python bench/latent_cache.py                      # 2000 JPEGs at 128 px, KL f=4 autoencoder (random weights)
    python bench/latent_cache.py --data folder:DIR --resolution 256 --n 0
    python bench/latent_cache.py --quick              # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

HERE = Path(__file__).resolve()
COLUMNS = ["run", "images", "resolution", "latent", "data_s", "setup_s", "train_s", "total_s", "encoded", "note"]


def child(args) -> None:
    """One run: load the data, build the method (encodes or reads the cache), train a few steps; JSON on stdout."""
    t0 = time.perf_counter()
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.training import latent_cache
    from meddiff.training.config import EvalConfig, LatentConfig, TrainConfig
    from meddiff.training.loop import train
    from meddiff.training.methods import latent as latent_method

    data = load_dataset(args.data, args.resolution)
    t_data = time.perf_counter()
    setup = {"encoded": 0}
    real_setup, real_encode = latent_method.encoded_latents, latent_cache._encode_part

    def timed(*a, **kw):  # the method's only data set-up: encode, or read the stored latents
        t = time.perf_counter()
        out = real_setup(*a, **kw)
        setup["seconds"] = time.perf_counter() - t
        return out

    def counted(vae, dataset, *a, **kw):
        setup["encoded"] += len(dataset)
        return real_encode(vae, dataset, *a, **kw)

    latent_method.encoded_latents, latent_cache._encode_part = timed, counted
    config = TrainConfig(
        out=args.run,
        method="latent",
        resolution=args.resolution,
        batch_size=8,
        latent=LatentConfig(autoencoder=args.ae),
        max_steps=args.steps,
        checkpoint_every=0,
        lr_warmup_steps=0,
        eval=EvalConfig(fidelity=False),
        precision="fp32",
        model=ModelConfig(block_out_channels=[32, 64], layers_per_block=1),
    )
    t_train = time.perf_counter()
    result = train(config, data, progress=False)
    t_end = time.perf_counter()
    print(
        "RESULT "
        + json.dumps(
            {
                "images": len(data),
                "data_s": t_data - t0,
                "setup_s": setup.get("seconds"),
                "encoded": setup.get("encoded"),
                "train_s": t_end - t_train - setup.get("seconds", 0),
                "total_s": t_end - t0,
                "steps": result.steps,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", default=None, help="dataset spec (default: a folder of N synthetic 640x512 JPEGs)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--factor", type=int, default=4, choices=(4, 8))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ae", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.resolution, args.steps = 64, 32, 2
    if args.child:
        child(args)
        return
    from data_scale import make_pool
    from gpu_check import build_random_autoencoder

    work = Path(tempfile.mkdtemp(prefix="meddiff-latent-cache-"))
    if args.data is None:
        make_pool(work / "images", args.n, size=(160, 128) if args.quick else (640, 512))
        args.data = f"folder:{work / 'images'}?split=all"
    env = {**os.environ, "MEDDIFF_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    os.environ.update({"MEDDIFF_CACHE": env["MEDDIFF_CACHE"]})
    channels = [32, 64, 128] if args.factor == 4 else [32, 64, 128, 128]  # one level per factor of 2
    ae = build_random_autoencoder(work / "ae", args.resolution, args.factor, channels)
    # the image store is prepared before either run, so both read the same prepared images
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from meddiff.data.spec import load_dataset; load_dataset({args.data!r}, {args.resolution})",
        ],
        env=env,
        check=True,
    )
    rows = []
    for name in ("first (encodes)", "second (cache)"):
        cmd = [
            sys.executable,
            str(HERE),
            "--child",
            "--data",
            args.data,
            "--resolution",
            str(args.resolution),
            "--steps",
            str(args.steps),
            "--ae",
            str(ae),
            "--run",
            str(work / f"run{len(rows)}"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        side = args.resolution // args.factor
        rows.append(
            {
                "run": name,
                "images": r["images"],
                "resolution": args.resolution,
                "latent": f"4x{side}x{side}",
                "data_s": round(r["data_s"], 1),
                "setup_s": round(r["setup_s"], 2),
                "train_s": round(r["train_s"], 1),
                "total_s": round(r["total_s"], 1),
                "encoded": r["encoded"],
            }
        )
    saved = rows[0]["setup_s"] - rows[1]["setup_s"]
    rows[1]["note"] = (
        f"saved {saved:.1f} s of set-up ({saved / max(rows[0]['total_s'], 1e-9):.0%} of the first run; "
        f"{1000 * saved / rows[0]['images']:.1f} ms per image)"
    )
    rows.append(
        {"run": "saved", "setup_s": round(saved, 2), "total_s": round(rows[0]["total_s"] - rows[1]["total_s"], 1)}
    )
    if rows[1]["encoded"] or rows[0]["encoded"] != rows[0]["images"]:
        raise SystemExit("the second run encoded again (or the first did not): the latent cache did not work")
    write_results("latent_cache", rows, COLUMNS, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
