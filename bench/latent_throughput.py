"""Autoencoder and latent-diffusion throughput (img/s, peak RSS), and latent sampling speed with decoding.

    python bench/latent_throughput.py [--resolutions 64 128] [--factors 4 8] [--kinds kl vq] [--steps 10]
        [--precision bf16] [--conditioning labels text]

Per resolution and downsampling factor, in their own processes (so peak RSS is each one's own):
- autoencoder training (each kind) with meddiff's loop, the shipped phantom recipe's channel widths;
- latent diffusion training on that (KL) autoencoder's latents, per conditioning (labels; text through the packaged
  MiniLM encoder), with the latent recipe's U-Net;
- sampling from the latent model: DPM-Solver++ 20 steps, guidance 2, including the autoencoder decode.
Weights are untrained (speed only). The rate excludes the first `--warmup` steps."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

AE_CHANNELS = {4: [32, 64, 64], 8: [32, 64, 128, 128]}  # the phantom recipes' widths per factor
LATENT_UNET = [64, 128, 256]


def _rate(result, warmup: int, steps: int, batch: int) -> float:
    from common import timed_seconds

    return steps * batch / timed_seconds(result.loss_history, warmup, steps)


def run_one(job: dict) -> dict:
    import torch

    from common import peak_rss_mb
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.data.spec import load_dataset
    from meddiff.models.autoencoder import AutoencoderConfig
    from meddiff.models.factory import ModelConfig
    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.generate import SamplingSettings, sample
    from meddiff.training.config import EvalConfig, LatentConfig, TrainConfig
    from meddiff.training.loop import train

    res, factor, kind = job["resolution"], job["factor"], job["kind"]
    data = load_dataset("phantom:?n=256&seed=0", res)
    ae = AutoencoderConfig(kind=kind, downsample=factor, channels=AE_CHANNELS[factor], scale_samples=64)
    base = dict(
        resolution=res, checkpoint_every=0, log_every=1, precision=job["precision"], eval=EvalConfig(fidelity=False)
    )
    warmup, steps = job["warmup"], job["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        ae_batch = 8
        result = train(
            TrainConfig(
                out=f"{tmp}/ae",
                method="autoencoder",
                batch_size=ae_batch,
                autoencoder=ae,
                max_steps=warmup + steps,
                **base,
            ),
            data,
            progress=False,
        )
        if job["stage"] == "autoencoder":
            return {
                **job,
                "batch": ae_batch,
                "img_per_s": round(_rate(result, warmup, steps, ae_batch), 1),
                "peak_rss_MB": round(peak_rss_mb()),
            }
        batch = 32
        cfg = TrainConfig(
            out=f"{tmp}/ldm",
            method="latent",
            batch_size=batch,
            conditioning=job["conditioning"],
            latent=LatentConfig(autoencoder=f"{tmp}/ae"),
            max_steps=warmup + steps,
            model=ModelConfig(block_out_channels=LATENT_UNET, attention_max_resolution=8),
            **base,
        )
        result = train(cfg, data, progress=False)
        row = {
            **job,
            "batch": batch,
            "latent": f"{ae.latent_channels}x{res // factor}x{res // factor}",
            "params_M": round(result.parameters / 1e6, 2),
            "img_per_s": round(_rate(result, warmup, steps, batch), 1),
        }
        pipe = load_pipeline(f"{tmp}/ldm")
        n = 16
        codec = LabelCodec(pipe.label_names)
        labels = torch.zeros(n, len(codec.label_names))
        labels[:, 1 % len(codec.label_names)] = 1
        conditions = codec.encode(labels, torch.ones_like(labels, dtype=torch.bool))
        prompts = ["chest x-ray with cardiomegaly"] * n if job["conditioning"] == "text" else None
        sample(pipe, conditions[:2], SamplingSettings(steps=2), progress=False, prompts=prompts and prompts[:2])
        t0 = time.perf_counter()
        images = sample(
            pipe, conditions, SamplingSettings(steps=20, guidance=2.0, batch_size=16), progress=False, prompts=prompts
        )
        row["sample_img_per_s"] = round(n / (time.perf_counter() - t0), 2)
        assert images.shape == (n, res, res)
        row["peak_rss_MB"] = round(peak_rss_mb())
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--kinds", nargs="+", default=["kl", "vq"])
    ap.add_argument("--conditioning", nargs="+", default=["labels", "text"])
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(run_one(json.loads(args.single))))
        return
    from common import write_results

    jobs = []
    for res in args.resolutions:
        for factor in args.factors:
            common = {
                "resolution": res,
                "factor": factor,
                "precision": args.precision,
                "steps": args.steps,
                "warmup": args.warmup,
            }
            jobs += [{**common, "stage": "autoencoder", "kind": k, "conditioning": ""} for k in args.kinds]
            jobs += [{**common, "stage": "latent", "kind": "kl", "conditioning": c} for c in args.conditioning]
    rows = []
    for job in jobs:
        proc = subprocess.run([sys.executable, __file__, "--single", json.dumps(job)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"job {job} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    write_results(
        "latent_throughput",
        rows,
        [
            "stage",
            "resolution",
            "factor",
            "kind",
            "conditioning",
            "latent",
            "batch",
            "img_per_s",
            "sample_img_per_s",
            "peak_rss_MB",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
