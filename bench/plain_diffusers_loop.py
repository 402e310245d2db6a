"""A plain diffusers fine-tuning loop, written the way diffusers' `train_text_to_image` example (and, for LoRA, its
`train_text_to_image_lora` example) trains, as the reference next to `meddiff finetune` in bench/finetune_scale.py:
the same model folder, batch, resolution, data (in-memory phantoms with their label prompts) and precision.

    python bench/plain_diffusers_loop.py [--base /tmp/meddiff-bench/sd15-random] [--resolution 512]
        [--batch-size 1] [--steps 4] [--configs unet lora] [--precision auto]

What the loop does (own code, the example's structure):
- UNet2DConditionModel, AutoencoderKL, CLIPTextModel, tokenizer and DDPMScheduler from the local folder; VAE and text
  encoder frozen and cast to the mixed-precision dtype; accelerate `Accelerator(mixed_precision=...)` prepares the
  U-Net, AdamW (fp32 trainable weights) and the DataLoader;
- every step: VAE encode of the batch (latent_dist.sample() x scaling_factor), text-encoder forward of the tokenized
  prompts, random timesteps, add_noise, U-Net forward, MSE on the noise, backward, gradient clipping at 1.0, step;
- `lora` (and `lora+gc`): peft LoRA on the same U-Net attention projections as meddiff's lora method (to_q, to_k,
  to_v, to_out.0), rank 8, the frozen U-Net in the mixed-precision dtype as the LoRA example keeps it, the adapter
  weights in fp32; `+gc` turns gradient checkpointing on.

meddiff's loop differs where it saves work: it encodes the training images once (not every step), caches prompt
features when the text encoder is frozen, and adds Min-SNR weighting. Differences in s/step are those.

Each configuration runs in its own process (clean peak memory): peak GPU memory on CUDA
(torch.cuda.max_memory_allocated), peak resident memory on a CPU. The first step is not timed (bench/common's
timed window). `measure()` is the entry point for other benchmarks (bench/gpu_check.py)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, peak_rss_mb, timed_seconds, write_results  # noqa: E402

CONFIGS = {"unet": ("unet", False), "unet+gc": ("unet", True), "lora": ("lora", False), "lora+gc": ("lora", True)}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # meddiff's lora method (training/methods/finetune.py)
LORA_RANK = 8
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
COLUMNS = [
    "loop",
    "config",
    "resolution",
    "batch",
    "trainable_M",
    "precision",
    "s_per_step",
    "img_per_s",
    "peak_gpu_GB",
    "peak_rss_GB",
    "loss",
    "error",
]


def _data(resolution: int, batch: int):
    """The same images and prompts bench/finetune_scale.py trains on: RGB (3 equal channels) in [-1, 1]."""
    from meddiff.data.spec import load_dataset
    from meddiff.models.stable_diffusion import to_rgb

    dataset = load_dataset(f"phantom:?n={max(batch * 2, 4)}&seed=3", resolution)
    return to_rgb(dataset.images).contiguous(), list(dataset.prompts)


def run_one(
    name: str,
    base: str,
    resolution: int,
    batch: int,
    steps: int,
    precision: str = "auto",
    learning_rate: float | None = None,
    seed: int = 0,
    allow_tf32: bool = True,
) -> dict:
    """Train `steps` steps of configuration `name` in this process and return its row (s/step over steps 2..N).
    allow_tf32: the example's --allow_tf32 (on by default here, as meddiff's loop does on CUDA; no effect on CPU)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from meddiff.precision import reset_accelerate_state, resolve_precision

    method, checkpointing = CONFIGS[name]
    mixed = resolve_precision(precision)
    reset_accelerate_state()
    accelerator = Accelerator(mixed_precision=mixed)
    device = accelerator.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if allow_tf32:
            from meddiff.precision import enable_tf32

            enable_tf32()
    torch.manual_seed(seed)

    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    weight_dtype = WEIGHT_DTYPES[mixed]
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    for frozen in (vae, text_encoder):  # the frozen parts in the mixed-precision dtype, as the example does
        frozen.to(device)
        if weight_dtype != torch.float32:
            frozen.to(dtype=weight_dtype)
    if method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device)
        if weight_dtype != torch.float32:
            unet.to(dtype=weight_dtype)
        unet.add_adapter(
            LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        )
        for p in unet.parameters():  # AdamW on fp32 adapter weights
            if p.requires_grad:
                p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lr = learning_rate or (1e-4 if method == "lora" else 1e-5)
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    images, prompts = _data(resolution, batch)
    input_ids = tokenizer(
        prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, input_ids),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()

    history, step, t0 = [], 0, time.perf_counter()
    wall0 = t0
    while step < steps:
        for pixel_values, ids in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(pixel_values.to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            value = loss.detach().float().item()  # synchronises, like meddiff's loop logging every step
            history.append([step, value, time.perf_counter() - t0])
            if step >= steps:
                break
    wall = time.perf_counter() - wall0
    per_step = timed_seconds(history, 1, steps - 1) / (steps - 1)
    row = {
        "loop": "plain-diffusers",
        "config": name,
        "method": method,
        "gradient_checkpointing": checkpointing,
        "resolution": resolution,
        "batch": batch,
        "steps": steps,
        "trainable_M": round(n_trainable / 1e6, 3),
        "trainable_params": n_trainable,
        "precision": mixed,
        "s_per_step": round(per_step, 4),
        "img_per_s": round(batch / per_step, 3),
        "wall_s": round(wall, 1),
        "loss": round(history[-1][1], 5),
        "loss_finite": all(math.isfinite(h[1]) for h in history),
        "device": device.type,
    }
    if cuda:
        row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        row["tf32"] = allow_tf32
    row["peak_rss_GB"] = round(peak_rss_mb() / 1024, 2)
    return row


def measure(
    configs: list[str],
    base: str,
    resolution: int,
    batch: int,
    steps: int,
    precision: str = "auto",
    timeout: float | None = None,
) -> list[dict]:
    """One row per configuration, each trained in its own process (clean peak memory); a failed or timed-out
    configuration gives a row with an `error`."""
    rows = []
    for name in configs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--base",
            str(base),
            "--resolution",
            str(resolution),
            "--batch-size",
            str(batch),
            "--steps",
            str(steps),
            "--precision",
            precision,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"loop": "plain-diffusers", "config": name, "error": f"timed out after {timeout:.0f} s"})
            continue
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append(
                {"loop": "plain-diffusers", "config": name, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
            )
        else:
            rows.append(json.loads(found[0]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base",
        default="/tmp/meddiff-bench/sd15-random",
        help="a diffusers SD folder; built (SD-1.5 size, random weights) when missing",
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=["unet", "lora"], choices=list(CONFIGS))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.one:
        print(
            "ROW "
            + json.dumps(run_one(args.one, args.base, args.resolution, args.batch_size, args.steps, args.precision)),
            flush=True,
        )
        return
    if not (Path(args.base) / "model_index.json").is_file():
        from finetune_scale import build_sd15_architecture

        build_sd15_architecture(Path(args.base))
    rows = measure(args.configs, args.base, args.resolution, args.batch_size, args.steps, args.precision)
    for row in rows:
        print(json.dumps(row), flush=True)
    suffix = "gpu" if torch.cuda.is_available() else "cpu"
    name = f"plain_diffusers_loop-{suffix}-{args.resolution}"
    write_results(name, rows, COLUMNS, args.out or str(RESULTS / f"{name}.json"))


if __name__ == "__main__":
    main()
