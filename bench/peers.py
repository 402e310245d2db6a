"""Training throughput side by side, in one run: meddiff's loop against two peer recipes on the same machine, the
same data (in-memory phantoms), resolution and batch, with the peers' U-Nets sized to meddiff's parameter count
(within 10 %).

    python bench/peers.py [--resolutions 32 64] [--steps 20] [--batch-size 32]

- meddiff: `meddiff.training.loop.train` with the default model and `precision=auto` (bf16 autocast on AMX CPUs).
- diffusers-example: a plain loop written as diffusers' unconditional-training example does it: UNet2DModel with
  the example's block pattern (attention in the second-to-last level), DDPMScheduler, AdamW, MSE on the noise, fp32.
- monai-tutorial: MONAI's 2D DDPM tutorial recipe: DiffusionModelUNet (3 levels, attention in levels 2 and 3, one
  res block), MONAI's DDPMScheduler and DiffusionInferer, Adam 2.5e-5, fp32 (needs `pip install monai`; skipped
  with a message otherwise).

Each configuration runs in its own process, so peak RSS is its own; 5 warm-up steps are excluded from the rate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEERS = ("meddiff", "diffusers-example", "monai-tutorial")
WARMUP = 5


def _images(resolution: int):
    from meddiff.data.spec import load_dataset

    return load_dataset("phantom:?n=512&seed=0", resolution)


def meddiff_params(resolution: int) -> int:
    from meddiff.models.factory import ModelConfig, build_unet

    return sum(p.numel() for p in build_unet(ModelConfig(), resolution, 6).parameters())


def _groups(width: int) -> int:
    """GroupNorm groups: the recipes' 32 where the width allows, else the largest of 16/8/4 that divides it."""
    return next(g for g in (32, 16, 8, 4) if width % g == 0)


def _closest(build, target: int, widths=range(16, 257, 4)):
    """The width whose model has the parameter count nearest to target."""
    best = min(widths, key=lambda w: abs(sum(p.numel() for p in build(w).parameters()) - target))
    model = build(best)
    return model, sum(p.numel() for p in model.parameters())


def diffusers_unet(resolution: int, target: int):
    from diffusers import UNet2DModel

    def build(w):
        return UNet2DModel(
            sample_size=resolution,
            in_channels=1,
            out_channels=1,
            layers_per_block=2,
            block_out_channels=(w, w, 2 * w, 2 * w),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=_groups(w),
        )

    return _closest(build, target)


def monai_unet(target: int):
    from monai.networks.nets import DiffusionModelUNet

    def build(w):
        return DiffusionModelUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(w, 2 * w, 2 * w),
            attention_levels=(False, True, True),
            num_res_blocks=1,
            num_head_channels=2 * w,
            norm_num_groups=_groups(w),
        )

    return _closest(build, target)


def run_meddiff(resolution: int, steps: int, batch: int) -> dict:
    from meddiff.training.config import EvalConfig, TrainConfig
    from meddiff.training.loop import train

    data = _images(resolution)
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(resolution=resolution, batch_size=batch, checkpoint_every=0, eval=EvalConfig(fidelity=False))
        train(TrainConfig(out=f"{tmp}/w", max_steps=WARMUP, **base), data, progress=False)
        result = train(TrainConfig(out=f"{tmp}/r", max_steps=steps, **base), data, progress=False)
    return {"img_per_s": result.images_per_second, "params": result.parameters, "precision": result.precision}


def _plain_loop(model, step_fn, images, steps: int, batch: int) -> float:
    """img/s of step_fn(model, x0) over `steps` batches after WARMUP batches."""
    import torch

    g = torch.Generator().manual_seed(0)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            t0 = time.perf_counter()
        idx = torch.randint(0, len(images), (batch,), generator=g)
        step_fn(model, images[idx])
    return steps * batch / (time.perf_counter() - t0)


def run_diffusers(resolution: int, steps: int, batch: int, target: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    model, params = diffusers_unet(resolution, target)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)

    def step(m, x0):
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        loss = F.mse_loss(m(scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    model.train()
    rate = _plain_loop(model, step, _images(resolution).images, steps, batch)
    return {"img_per_s": rate, "params": params, "precision": "fp32"}


def run_monai(resolution: int, steps: int, batch: int, target: int) -> dict:
    import torch
    import torch.nn.functional as F
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    model, params = monai_unet(target)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.Adam(model.parameters(), lr=2.5e-5)

    def step(m, x0):
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.num_train_timesteps, (x0.shape[0],)).long()
        pred = inferer(inputs=x0, diffusion_model=m, noise=noise, timesteps=t)
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()

    model.train()
    rate = _plain_loop(model, step, _images(resolution).images, steps, batch)
    return {"img_per_s": rate, "params": params, "precision": "fp32"}


def one(peer: str, resolution: int, steps: int, batch: int) -> dict:
    from common import peak_rss_mb

    target = meddiff_params(resolution)
    if peer == "meddiff":
        row = run_meddiff(resolution, steps, batch)
    elif peer == "diffusers-example":
        row = run_diffusers(resolution, steps, batch, target)
    else:
        row = run_monai(resolution, steps, batch, target)
    return {
        "peer": peer,
        "resolution": resolution,
        "batch": batch,
        "steps": steps,
        "params_M": round(row["params"] / 1e6, 2),
        "params_vs_meddiff": round(row["params"] / target, 3),
        "precision": row["precision"],
        "img_per_s": round(row["img_per_s"], 1),
        "peak_rss_MB": round(peak_rss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", nargs=2, metavar=("PEER", "RES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(one(args.single[0], int(args.single[1]), args.steps, args.batch_size)))
        return
    from common import write_results

    rows = []
    for res in args.resolutions:
        for peer in args.peers:
            if peer == "monai-tutorial":
                try:
                    import monai  # noqa: F401
                except ImportError:
                    print("monai-tutorial skipped: pip install monai to run MONAI's recipe", file=sys.stderr)
                    continue
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--single",
                    peer,
                    str(res),
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
                raise SystemExit(f"run {peer} {res}px failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        ours = next((r["img_per_s"] for r in rows if r["peer"] == "meddiff" and r["resolution"] == res), None)
        for r in rows:
            if r["resolution"] == res and ours:
                r["meddiff_speedup"] = round(ours / r["img_per_s"], 2)
    write_results(
        "peers",
        rows,
        [
            "peer",
            "resolution",
            "params_M",
            "params_vs_meddiff",
            "precision",
            "img_per_s",
            "meddiff_speedup",
            "peak_rss_MB",
        ],
        args.out,
    )


if __name__ == "__main__":
    main()
