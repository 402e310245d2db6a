"""Efficiency against the limit and the CPU speed options (benchmark 4 and "make it fast" of the performance issue).

    python bench/speedups.py [--resolution 28] [--batch-size 32] [--steps 30] [--compile] [--profile-steps 5]

1. Model FLOPs per training image (forward + backward of meddiff's pixel method, counted by
   torch.utils.flop_counter: convolutions, matmuls, attention) for the default U-Net at the given resolution.
2. This CPU's limit: theoretical peak (cores x clock x FLOP/cycle: 64 fp32 with two AVX-512 FMA units, 1024 bf16
   with AMX) and the measured peak of a large matmul in fp32 and bf16.
3. Each speed option of the training loop, one process each (one training run of meddiff's own loop on in-memory
   phantoms; the rate excludes the first `--warmup` steps, whose time is reported as start-up cost, e.g. compile):
   fp32, bf16 (AMX), channels-last, batch size, one thread, the attention processor (the default "auto" picks
   diffusers' classic one on CPU in bf16; SDPA for comparison), attention at a higher resolution, and
   torch.compile (with --compile; minutes of compile time). Achieved FLOP/s and the fraction of the measured
   matmul peak are given for each.
4. Where time goes: torch.profiler over `--profile-steps` training steps of the default run (precision
   auto: bf16 with fast bf16, else fp32), grouped into
   convolution, matmul/attention, normalisation, element-wise, optimizer and other; top operators listed.
Results: bench/results/speedups.json, a table, and bench/results/speedups-profile.txt."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {  # name: TrainConfig overrides
    "fp32": {"precision": "fp32"},
    "bf16 (default)": {"precision": "bf16"},
    "fp32 channels-last": {"precision": "fp32", "channels_last": True},
    "bf16 channels-last": {"precision": "bf16", "channels_last": True},
    "bf16 batch 64": {"precision": "bf16", "batch_size": 64},
    "bf16 batch 128": {"precision": "bf16", "batch_size": 128},
    "bf16 1 thread": {"precision": "bf16", "threads": 1},  # the loop's `threads` option
    "bf16 SDPA attention": {"precision": "bf16", "attention": "sdpa"},
    "fp32 classic attention": {"precision": "fp32", "attention": "classic"},
    "bf16 attention <=16 px": {"precision": "bf16", "model.attention_max_resolution": 16},
    "bf16 compile": {"precision": "bf16", "compile": True},
}
CATEGORIES = [  # (category, regex on aten op names), first match wins
    ("convolution", r"conv|mkldnn_convolution"),
    ("matmul / attention", r"\bmm\b|addmm|bmm|matmul|linear|baddbmm|scaled_dot_product|_flash_attention|softmax"),
    ("normalisation", r"group_norm|layer_norm|native_group_norm|native_layer_norm"),
    ("optimizer", r"_foreach|adam|lerp|addcdiv|addcmul|sqrt"),
    ("element-wise", r"add|mul|sub|div|silu|sigmoid|gelu|exp|neg|pow|copy_|to\b|_to_copy|fill|clone|cat|where|mse"),
]


def make_config(tmp: str, resolution: int, batch: int, steps: int, overrides: dict):
    from meddiff.training.config import EvalConfig, TrainConfig

    cfg = TrainConfig(
        out=f"{tmp}/run",
        resolution=resolution,
        batch_size=batch,
        max_steps=steps,
        checkpoint_every=0,
        log_every=1,
        eval=EvalConfig(fidelity=False),
    )
    for key, value in overrides.items():
        obj, *path = [cfg, *key.split(".")]
        for part in path[:-1]:
            obj = getattr(obj, part)
        setattr(obj, path[-1], value)
    return cfg


def run_variant(name: str, resolution: int, batch: int, steps: int, warmup: int, images: int = 512) -> dict:
    import torch

    from common import peak_rss_mb, timed_seconds
    from meddiff.data.spec import load_dataset
    from meddiff.training.loop import train

    overrides = VARIANTS[name]
    batch = overrides.get("batch_size", batch)
    data = load_dataset(f"phantom:?n={images}&seed=0", resolution)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(tmp, resolution, batch, warmup + steps, overrides)
        t0 = time.perf_counter()
        result = train(cfg, data, progress=False)
        wall = time.perf_counter() - t0
    timed = timed_seconds(result.loss_history, warmup, steps)
    first_steps = timed_seconds(result.loss_history, 0, warmup)
    return {
        "variant": name,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "params_M": round(result.parameters / 1e6, 2),
        "img_per_s": round(steps * batch / timed, 1),
        "first_steps_s": round(first_steps, 1),
        "wall_s": round(wall, 1),
        "peak_rss_MB": round(peak_rss_mb()),
    }


def flops_per_image(resolution: int, batch: int, overrides: dict | None = None) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from meddiff.data.spec import load_dataset
    from meddiff.training.methods import METHODS

    data = load_dataset("phantom:?n=64&seed=0", resolution)
    with tempfile.TemporaryDirectory() as tmp:
        model_keys = {k: v for k, v in (overrides or {}).items() if k.startswith("model.")}
        cfg = make_config(tmp, resolution, batch, 1, {"precision": "fp32", **model_keys})
        method = METHODS[cfg.method](cfg, data)
        batch_data = method.batch(torch.arange(batch) % len(data), "cpu")
        batch_data["step"] = 0
        counter = FlopCounterMode(display=False)
        with counter:
            loss = method.loss(method.model, batch_data, torch.Generator().manual_seed(0))
            loss.backward()
    return counter.get_total_flops() / batch


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 1.0) -> tuple[float, int]:
    """FLOP/s of an n x n matmul, timed over about `seconds` (at least 2 products). Where the dtype has no fast
    kernels (bf16 without AVX512-BF16/AMX is ~20x slower than fp32, and slower still per FLOP at large n) a large
    product would take minutes, so for every dtype the size grows from 256 (doubling, at most n) only while one
    product is predicted (n^3) to take under a second. Returns (FLOP/s, the n measured)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    size = min(256, n)
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        t0 = time.perf_counter()
        a @ b
        if size >= n or (time.perf_counter() - t0) * 8 > 1.0:
            break
        size = min(2 * size, n)
    n = size
    a @ b
    repeats, t0 = 0, time.perf_counter()
    while repeats < 2 or time.perf_counter() - t0 < seconds:
        a @ b
        repeats += 1
    return 2 * n**3 * repeats / (time.perf_counter() - t0), n


def cpu_limits() -> dict:
    import os

    cores = len(os.sched_getaffinity(0))
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = re.findall(r"cpu MHz\s*:\s*([\d.]+)", text)
    ghz = float(mhz[0]) / 1000 if mhz else None
    flags = set(re.findall(r"\b(avx512f|amx_bf16)\b", text))
    out = {"cores": cores, "ghz": ghz, "avx512f": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags}
    if ghz:
        out["theoretical_fp32_gflops"] = round(cores * ghz * (64 if out["avx512f"] else 32), 1)
        out["theoretical_bf16_gflops"] = round(cores * ghz * (1024 if out["amx_bf16"] else 64), 1)
    for dtype in ("fp32", "bf16"):
        flops, n = matmul_peak(dtype)
        out[f"matmul_{dtype}_gflops"], out[f"matmul_{dtype}_n"] = round(flops / 1e9, 1), n
    return out


def profile(resolution: int, batch: int, steps: int, images: int = 512) -> dict:
    """Profile `steps` training steps of the default run (precision auto: bf16 where the CPU has fast bf16, else fp32)
    after 3 warm-up steps, through the loop's own after_step hook."""
    from torch.profiler import ProfilerActivity, schedule
    from torch.profiler import profile as torch_profile

    from meddiff.data.spec import load_dataset
    from meddiff.training.loop import train
    from meddiff.training.methods import METHODS

    data = load_dataset(f"phantom:?n={images}&seed=0", resolution)
    prof = torch_profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=3, active=steps), acc_events=True
    )
    cls = METHODS["pixel"]
    original = cls.after_step

    def after_step(self, *a, **k):
        original(self, *a, **k)
        prof.step()

    cls.after_step = after_step
    try:
        with tempfile.TemporaryDirectory() as tmp, prof:
            result = train(make_config(tmp, resolution, batch, 3 + steps, {"precision": "auto"}), data, progress=False)
    finally:
        cls.after_step = original
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        cat = next((c for c, rx in CATEGORIES if re.search(rx, e.key[6:])), "other")
        groups[cat] = groups.get(cat, 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "steps": steps,
        "precision": {"no": "fp32"}.get(result.precision, result.precision),  # accelerate calls fp32 "no"
        "aten_self_cpu_ms_per_step": round(total / 1e3 / steps, 1),
        "share": {k: round(v / total, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count // steps,
                "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
                "share": round(e.self_cpu_time_total / total, 3),
            }
            for e in top
        ],
        "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="include torch.compile (minutes of compile time)")
    ap.add_argument("--variants", nargs="+", default=None, help="a subset of: " + "; ".join(VARIANTS))
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument(
        "--images", type=int, default=512, help="phantom images each run trains on (fewer: a quicker start)"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(
            json.dumps(run_variant(args.single, args.resolution, args.batch_size, args.steps, args.warmup, args.images))
        )
        return

    from common import write_results

    limits = cpu_limits()
    fpi = flops_per_image(args.resolution, args.batch_size)
    print(f"CPU: {limits}\nmodel FLOPs per training image at {args.resolution} px: {fpi / 1e9:.3f} GFLOP", flush=True)
    names = args.variants or [n for n in VARIANTS if args.compile or not VARIANTS[n].get("compile")]
    rows = []
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {'; '.join(VARIANTS)}")
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--single",
                name,
                "--resolution",
                str(args.resolution),
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--images",
                str(args.images),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        model_keys = {k: v for k, v in VARIANTS[name].items() if k.startswith("model.")}
        res_fpi = flops_per_image(args.resolution, args.batch_size, model_keys) if model_keys else fpi
        row["gflops_per_image"] = round(res_fpi / 1e9, 4)
        achieved = row["img_per_s"] * res_fpi
        peak = limits["matmul_bf16_gflops" if "bf16" in name else "matmul_fp32_gflops"] * 1e9
        row["achieved_gflops"] = round(achieved / 1e9, 1)
        row["of_matmul_peak"] = round(achieved / peak, 3)
        rows.append(row)
        print(row, flush=True)
    prof = profile(args.resolution, args.batch_size, args.profile_steps, args.images)
    print(f"time by category ({prof['precision']}, aten self CPU time):", prof["share"], flush=True)
    out_path = write_results(
        "speedups",
        rows,
        [
            "variant",
            "batch",
            "threads",
            "img_per_s",
            "first_steps_s",
            "achieved_gflops",
            "of_matmul_peak",
            "peak_rss_MB",
        ],
        args.out,
    )
    data = json.loads(out_path.read_text())
    data.update(
        {
            "resolution": args.resolution,
            "cpu_limits": limits,
            "gflops_per_training_image": round(fpi / 1e9, 4),
            "profile": {k: v for k, v in prof.items() if k != "table"},
        }
    )
    out_path.write_text(json.dumps(data, indent=2))
    table = out_path.with_name(out_path.stem + "-profile.txt")
    table.write_text(prof["table"])
    print(f"profile table: {table}")


if __name__ == "__main__":
    main()
