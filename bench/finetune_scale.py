"""Fine-tuning at Stable Diffusion scale: seconds per step, images per second and peak memory of `meddiff
finetune` on a full-size SD-1.5-architecture pipeline (860 M-parameter U-Net, 84 M VAE, 123 M CLIP ViT-L/14 text
encoder; random weights, which cost the same time and memory as trained ones), for the methods and memory options
a user chooses between.

    python bench/finetune_scale.py [--resolution 512] [--batch-size 1] [--steps 4]
        [--configs unet unet+gc lora lora+gc]

Each configuration runs in its own process (clean peak memory): peak GPU memory (torch.cuda.max_memory_allocated)
on a GPU, peak resident memory on a CPU. The first step (allocation, autotuning) is not timed. EMA is off (it adds
one fp32 copy of the trainable weights: 3.4 GB for the full U-Net), precision is bf16 autocast where supported,
AdamW in fp32."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, peak_rss_mb, timed_seconds, write_results  # noqa: E402

CONFIGS = {
    "unet": ("unet", False),
    "unet+gc": ("unet", True),
    "lora": ("lora", False),
    "lora+gc": ("lora", True),
    "unet+text": ("unet+text", False),
    "unet+text+gc": ("unet+text", True),
}


def build_sd15_architecture(out: Path) -> Path:
    """A Stable Diffusion v1.5-architecture pipeline with random weights, saved as a diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from meddiff.testing import save_stable_diffusion, write_clip_tokenizer

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(out / "_tokenizer", max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # ViT-L/14's text tower: 12 layers, width 768
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder.resize_token_embeddings(max(len(tokenizer), 49408))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    save_stable_diffusion(out, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    return out


def run_dir(work: str | Path, name: str) -> Path:
    return Path(work) / name.replace("+", "_")


def run_one(name: str, base: str, resolution: int, batch: int, steps: int, out: Path) -> dict:
    from meddiff.data.spec import load_dataset
    from meddiff.training.config import FinetuneConfig, TrainConfig
    from meddiff.training.loop import train

    method, checkpointing = CONFIGS[name]
    data = f"phantom:?n={max(batch * 2, 4)}&seed=3"
    config = TrainConfig(
        data=data,
        out=str(run_dir(out, name)),
        method="finetune",
        resolution=resolution,
        batch_size=batch,
        max_steps=steps,
        checkpoint_every=0,
        lr_warmup_steps=0,
        log_every=1,
        learning_rate=1e-5,
        ema=False,
        sample_steps=2,
        finetune=FinetuneConfig(
            pretrained=base,
            method=method,
            gradient_checkpointing=checkpointing,
            validation_every=0,
            validation_images=1,
            validation_prompts=["chest x-ray"],
        ),
    )
    dataset = load_dataset(data, resolution)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = train(config, dataset, progress=True)
    wall = time.perf_counter() - t
    per_step = timed_seconds(result.loss_history, 1, steps - 1) / (steps - 1)  # step 1 (allocation) not timed
    row = {
        "config": name,
        "method": method,
        "gradient_checkpointing": checkpointing,
        "resolution": resolution,
        "batch": batch,
        "trainable_M": round(result.parameters / 1e6, 1),
        "precision": result.precision,
        "s_per_step": round(per_step, 3),
        "img_per_s": round(batch / per_step, 3),
        "hours_per_1k_steps": round(per_step * 1000 / 3600, 2),
        "wall_s": round(wall, 1),
        "device": "cuda" if cuda else "cpu",
    }
    if cuda:
        row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    row["peak_rss_GB"] = round(peak_rss_mb() / 1024, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=["unet", "unet+gc", "lora", "lora+gc"], choices=list(CONFIGS))
    parser.add_argument(
        "--base", default="/tmp/meddiff-bench/sd15-random", help="where the SD-1.5-size pipeline is built"
    )
    parser.add_argument("--work", default="/tmp/meddiff-bench/finetune")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print its JSON
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    base = build_sd15_architecture(Path(args.base))
    if args.one:
        print(
            "ROW "
            + json.dumps(run_one(args.one, str(base), args.resolution, args.batch_size, args.steps, Path(args.work)))
        )
        return
    rows = []
    for name in args.configs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--resolution",
            str(args.resolution),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--base",
            str(base),
            "--work",
            args.work,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        shutil.rmtree(run_dir(args.work, name), ignore_errors=True)  # a full export is ~4 GB
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"config": name, "error": f"exit {proc.returncode}: {tail[0][:200]}"})
        else:
            rows.append(json.loads(found[0]))
        print(json.dumps(rows[-1]), flush=True)
    suffix = "gpu" if torch.cuda.is_available() else "cpu"
    columns = [
        "config",
        "resolution",
        "batch",
        "trainable_M",
        "precision",
        "s_per_step",
        "img_per_s",
        "hours_per_1k_steps",
        "peak_gpu_GB",
        "peak_rss_GB",
        "error",
    ]
    write_results(
        f"finetune_scale-{suffix}-{args.resolution}",
        rows,
        columns,
        args.out or str(RESULTS / f"finetune_scale-{suffix}-{args.resolution}.json"),
    )


if __name__ == "__main__":
    main()
