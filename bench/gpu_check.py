"""One time-boxed check of a GPU machine: the GPU tests and the headline speeds, in one JSON and one table.

    bash bench/gpu_check.sh                      # install, then this driver; 8 minutes in all on one GPU
    python bench/gpu_check.py [--budget-s 480 | --deadline EPOCH] [--quick] [--skip STAGE ...]
        [--out bench/results/gpu_check.json] [--work /tmp/meddiff-gpu-check]

Stages, in order (each skipped with a note in the JSON when the time left is less than it needs):
- install: recorded from bench/gpu_check.sh (`bash scripts/install.sh test`; seconds and exit status);
- pytest_gpu: `pytest -m gpu -q` (the tests that need CUDA);
- pixel: pixel diffusion training img/s at 64 px (meddiff.training.loop.train, default model, auto precision);
- latent: latent diffusion training img/s at 256 px on a KL autoencoder (f=8, random weights, its latent scaling
  factor measured and saved as `meddiff train-autoencoder` would), bench/latent_throughput.py's latent U-Net;
- sampling: img/s of DPM-Solver++ 20 steps, guidance 2, from the pixel and the latent run (latent: with decode);
- finetune: SD-1.5-size fine-tuning at 512 px (random weights; bench/finetune_scale.py builds and trains it), unet
  and lora, s/step and peak memory, each next to bench/plain_diffusers_loop.py on the same model, batch and
  precision (bf16 autocast where the GPU supports it). The SD-1.5-size pipeline is built in a background process
  (4 CPU threads) while the earlier stages run.

On a GPU each stage (and each fine-tuning configuration) runs in its own process with a timeout (clean peak GPU
memory; a stage that hangs is killed). Without CUDA, or with --quick, tiny sizes run in this one process (the tiny
offline Stable Diffusion instead of SD-1.5 size; peak RSS is then this process's so far): a smoke test of the
command, not a measurement. The first `warmup` steps of every training stage are outside the timed window
(bench/common.timed_seconds). The JSON is rewritten after every stage, so a killed run keeps what it measured."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the machine may have no network; everything here is local
os.environ.setdefault("TQDM_DISABLE", "1")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

STAGES = ("pytest_gpu", "pixel", "latent", "sampling", "finetune")
FINETUNE_CONFIGS = ("unet", "lora")
RESERVE_S = 10  # kept back for writing the results
LATENT_UNET = [64, 128, 256]  # bench/latent_throughput.py's latent U-Net
COLUMNS = [
    "stage",
    "what",
    "config",
    "resolution",
    "batch",
    "precision",
    "img_per_s",
    "s_per_step",
    "peak_gpu_GB",
    "peak_rss_GB",
    "note",
]


@dataclasses.dataclass
class Sizes:
    """What each stage measures, and the seconds it needs at least (`need_*`: skipped below) and at most (`cap_*`:
    killed above; subprocess mode only)."""

    pixel_resolution: int = 64
    pixel_batch: int = 64
    pixel_tiny_model: bool = False
    latent_resolution: int = 256
    latent_factor: int = 8
    latent_ae_channels: tuple = (32, 64, 128, 128)
    latent_unet: tuple = tuple(LATENT_UNET)
    latent_batch: int = 32
    warmup: int = 5
    steps: int = 25
    sample_n: int = 64
    sample_steps: int = 20
    sd: str = "sd15"  # sd15 | tiny
    ft_resolution: int = 512
    ft_batch: int = 4
    ft_steps: int = 6
    need_pytest_gpu: int = 20
    cap_pytest_gpu: int = 150
    need_pixel: int = 45
    cap_pixel: int = 120
    need_latent: int = 60
    cap_latent: int = 150
    need_sampling: int = 25
    cap_sampling: int = 90
    need_finetune: int = 50  # each configuration
    cap_finetune: int = 200


FULL = Sizes()
QUICK = Sizes(
    pixel_resolution=32,
    pixel_batch=4,
    pixel_tiny_model=True,
    latent_resolution=32,
    latent_factor=4,
    latent_ae_channels=(16, 32, 32),
    latent_unet=(32, 64),
    latent_batch=4,
    warmup=1,
    steps=2,
    sample_n=2,
    sd="tiny",
    ft_resolution=32,
    ft_batch=1,
    ft_steps=2,
    need_pytest_gpu=5,
    need_pixel=1,
    need_latent=1,
    need_sampling=1,
    need_finetune=1,
)


# stage bodies (run in this process or in a child) ------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _memory(row: dict) -> dict:
    import torch

    from common import peak_rss_mb

    if torch.cuda.is_available():
        row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        try:  # whether fp32 matmuls/convolutions ran as TF32 (meddiff.precision decides)
            from meddiff.precision import tf32_enabled

            row["tf32"] = tf32_enabled()
        except ImportError:
            row["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    row["peak_rss_GB"] = round(peak_rss_mb() / 1024, 2)
    return row


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def phantoms(resolution: int, n: int):
    """n phantoms at `resolution`; above 64 px drawn at 64 px and upsampled (drawing large phantoms costs CPU
    seconds that say nothing about training speed)."""
    import torch.nn.functional as F

    from meddiff.data.spec import load_dataset

    if resolution <= 64:
        return load_dataset(f"phantom:?n={n}&seed=0", resolution)
    small = load_dataset(f"phantom:?n={n}&seed=0", 64)
    big = F.interpolate(small.images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return dataclasses.replace(small, images=big.clamp(-1, 1).contiguous())


def _train_rate(result, warmup: int, steps: int, batch: int) -> tuple[float, float]:
    from common import timed_seconds

    seconds = timed_seconds(result.loss_history, warmup, steps)
    return steps * batch / seconds, seconds / steps


def stage_pixel(s: Sizes, work: Path) -> dict:
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import EvalConfig, TrainConfig
    from meddiff.training.loop import train

    res, batch = s.pixel_resolution, s.pixel_batch
    model = ModelConfig(block_out_channels=[16, 32], layers_per_block=1) if s.pixel_tiny_model else ModelConfig()
    data = phantoms(res, max(4 * batch, 16))
    _reset_peak()
    cfg = TrainConfig(
        out=str(work / "pixel"),
        resolution=res,
        batch_size=batch,
        max_steps=s.warmup + s.steps,
        checkpoint_every=0,
        log_every=1,
        lr_warmup_steps=0,
        model=model,
        eval=EvalConfig(fidelity=False),
    )
    result = train(cfg, data, progress=False)
    rate, per_step = _train_rate(result, s.warmup, s.steps, batch)
    row = {
        "stage": "pixel",
        "what": "pixel diffusion training",
        "config": "default model" if not s.pixel_tiny_model else "tiny model",
        "resolution": res,
        "batch": batch,
        "precision": result.precision,
        "params_M": round(result.parameters / 1e6, 2),
        "img_per_s": round(rate, 1),
        "s_per_step": round(per_step, 4),
        "run": str(work / "pixel"),
    }
    return {"rows": [_memory(row)]}


def build_random_autoencoder(folder: Path, resolution: int, factor: int, channels, device: str = "cpu") -> Path:
    """A KL autoencoder with random weights saved as `meddiff train-autoencoder` leaves one (RUN/autoencoder, its
    measured latent scaling factor in the config): latent diffusion trains on it at full cost, with useless
    images."""
    import torch

    from meddiff.models.autoencoder import AUTOENCODER_DIR, AutoencoderConfig, build_autoencoder, measure_scaling_factor

    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(kind="kl", downsample=factor, channels=list(channels)), resolution)
    vae.to(device).eval()
    images = phantoms(resolution, 16).images
    scale = measure_scaling_factor(vae, images, torch.Generator().manual_seed(0))
    vae.register_to_config(scaling_factor=scale)
    out = Path(folder) / AUTOENCODER_DIR
    vae.to("cpu").save_pretrained(out, safe_serialization=True)
    return Path(folder)


def stage_latent(s: Sizes, work: Path) -> dict:
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import EvalConfig, LatentConfig, TrainConfig
    from meddiff.training.loop import train

    res, factor, batch = s.latent_resolution, s.latent_factor, s.latent_batch
    t = time.perf_counter()
    ae = build_random_autoencoder(work / "ae", res, factor, s.latent_ae_channels, _device())
    ae_seconds = time.perf_counter() - t
    data = phantoms(res, max(4 * batch, 16))
    _reset_peak()
    cfg = TrainConfig(
        out=str(work / "latent"),
        method="latent",
        resolution=res,
        batch_size=batch,
        latent=LatentConfig(autoencoder=str(ae)),
        max_steps=s.warmup + s.steps,
        checkpoint_every=0,
        log_every=1,
        lr_warmup_steps=0,
        eval=EvalConfig(fidelity=False),
        model=ModelConfig(block_out_channels=list(s.latent_unet), attention_max_resolution=8),
    )
    result = train(cfg, data, progress=False)
    rate, per_step = _train_rate(result, s.warmup, s.steps, batch)
    side = res // factor
    row = {
        "stage": "latent",
        "what": "latent diffusion training",
        "config": f"KL f={factor} latent 4x{side}x{side}",
        "resolution": res,
        "batch": batch,
        "precision": result.precision,
        "params_M": round(result.parameters / 1e6, 2),
        "img_per_s": round(rate, 1),
        "s_per_step": round(per_step, 4),
        "autoencoder_build_s": round(ae_seconds, 1),
        "run": str(work / "latent"),
    }
    return {"rows": [_memory(row)]}


def stage_sampling(s: Sizes, work: Path) -> dict:
    import torch

    from meddiff.conditioning.labels import LabelCodec
    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.generate import SamplingSettings, sample

    rows = []
    for name in ("pixel", "latent"):
        run = work / name
        if not (run / "pipeline").is_dir():
            rows.append(
                {"stage": "sampling", "what": f"{name} model", "note": f"no {name} run (stage skipped or failed)"}
            )
            continue
        pipe = load_pipeline(run, device=_device())
        codec = LabelCodec(pipe.label_names)
        n = s.sample_n
        labels = torch.zeros(n, len(codec.label_names))
        if len(codec.label_names):
            labels[torch.arange(n), torch.arange(n) % len(codec.label_names)] = 1
        conditions = codec.encode(labels, torch.ones_like(labels, dtype=torch.bool))
        sample(pipe, conditions[:2], SamplingSettings(steps=2), progress=False)  # warm-up
        _reset_peak()
        settings = SamplingSettings(steps=s.sample_steps, scheduler="dpm++", guidance=2.0, batch_size=n)
        t = time.perf_counter()
        images = sample(pipe, conditions, settings, progress=False)
        seconds = time.perf_counter() - t
        assert images.shape[0] == n
        res = images.shape[-1]
        row = {
            "stage": "sampling",
            "what": f"{name} model, DPM++ {s.sample_steps} steps, guidance 2"
            + (", with decode" if name == "latent" else ""),
            "config": f"n={n}",
            "resolution": res,
            "batch": n,
            "img_per_s": round(n / seconds, 2),
            "s_per_step": round(seconds / s.sample_steps, 4),
        }
        rows.append(_memory(row))
        del pipe
    return {"rows": rows}


def build_sd(s: Sizes, base: Path) -> Path:
    if s.sd == "tiny":
        from meddiff.testing import build_tiny_stable_diffusion

        if not (base / "model_index.json").is_file():
            build_tiny_stable_diffusion(base, image_size=s.ft_resolution)
        return base
    from finetune_scale import build_sd15_architecture

    return build_sd15_architecture(base)


def finetune_one(s: Sizes, work: Path, loop: str, name: str) -> dict:
    """One fine-tuning configuration: meddiff's (bench/finetune_scale.py) or the plain diffusers loop."""
    base = str(work / ("sd15-random" if s.sd == "sd15" else "sd-tiny"))
    _reset_peak()
    if loop == "meddiff":
        import finetune_scale

        try:
            row = finetune_scale.run_one(name, base, s.ft_resolution, s.ft_batch, s.ft_steps, work / "finetune")
        finally:
            shutil.rmtree(finetune_scale.run_dir(work / "finetune", name), ignore_errors=True)  # ~4 GB for unet
        row["loop"] = "meddiff"
    else:
        import plain_diffusers_loop

        row = plain_diffusers_loop.run_one(name, base, s.ft_resolution, s.ft_batch, s.ft_steps, "auto")
    size = "SD-1.5 size" if s.sd == "sd15" else "tiny SD"
    row.update(stage="finetune", what=f"{loop} fine-tune, {size}", config=name)
    return {"rows": [row]}


# the driver ------------------------------------------------------------------------------------------------------
class Driver:
    def __init__(self, args, sizes: Sizes, quick: bool):
        self.args, self.sizes, self.quick = args, sizes, quick
        self.in_process = quick and not args.processes
        self.notes: list[str] = []
        self.t0 = time.time()
        self.deadline = args.deadline or self.t0 + args.budget_s
        self.work = Path(args.work)
        self.out = Path(args.out)
        self.stages: dict[str, dict] = {}
        self.rows: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def skip_note(self, need: float) -> str | None:
        left = self.left()
        return None if left >= need else f"skipped: {max(left, 0):.0f} s of the budget left, needs about {need:.0f} s"

    def child(self, payload: dict, cap: float) -> dict:
        """Run one stage body in a child process, killed after min(cap, time left) seconds."""
        timeout = max(1.0, min(cap, self.left()))
        cmd = [sys.executable, __file__, "--child", json.dumps(payload)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "note": f"killed after {timeout:.0f} s"}
        found = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not found:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"status": "failed", "note": f"exit {proc.returncode}: {tail[0][:300]}"}
        return {"status": "ok", **json.loads(found[-1])}

    def body(self, payload: dict, cap: float) -> dict:
        if not self.in_process:
            return self.child(payload, cap)
        try:
            return {"status": "ok", **run_payload(payload, self.sizes, self.work)}
        except Exception as exc:  # noqa: BLE001 - a failed stage is reported, the others still run
            return {
                "status": "failed",
                "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            }

    def record(self, name: str, result: dict, seconds: float) -> None:
        rows = result.pop("rows", [])
        result["seconds"] = round(seconds, 1)
        if name in self.stages:  # finetune: one entry, several configurations
            entry = self.stages[name]
            entry["seconds"] = round(entry["seconds"] + seconds, 1)
            entry.setdefault("parts", []).append(result)
            if result["status"] != "ok":
                entry["status"] = "partial"
        else:
            self.stages[name] = result
        for row in rows:
            row.setdefault("stage", name)
        if not rows and result["status"] != "ok":
            rows = [
                {
                    "stage": name,
                    "what": result.get("loop", ""),
                    "config": result.get("config", ""),
                    "note": result.get("note", result["status"]),
                }
            ]
        self.rows += rows
        self.write(final=False)

    def run_stage(self, name: str, payload: dict, need: float, cap: float, **label) -> None:
        note = self.skip_note(need)
        if note or name in self.args.skip:
            self.record(name, {"status": "skipped", "note": note or "skipped (--skip)", **label}, 0.0)
            return
        t = time.time()
        result = self.body(payload, cap)
        result.update(label)
        self.record(name, result, time.time() - t)

    def pytest_gpu(self) -> None:
        s = self.sizes
        if "pytest_gpu" in self.args.skip or self.skip_note(s.need_pytest_gpu):
            self.record(
                "pytest_gpu",
                {"status": "skipped", "note": self.skip_note(s.need_pytest_gpu) or "skipped (--skip)"},
                0.0,
            )
            return
        timeout = max(1.0, min(s.cap_pytest_gpu, self.left()))
        t = time.time()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-n", "0", "-p", "no:cacheprovider"],
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=ROOT,
            )
            lines = proc.stdout.strip().splitlines()
            summary = lines[-1] if lines else ""
            status = {0: "ok", 5: "ok"}.get(proc.returncode, "failed")
            result = {
                "status": status,
                "rc": proc.returncode,
                "summary": summary,
                "note": "no test carries the gpu marker" if proc.returncode == 5 else summary,
            }
            if status == "failed":
                result["failures"] = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]
        except subprocess.TimeoutExpired:
            result = {"status": "timeout", "note": f"killed after {timeout:.0f} s"}
        result["rows"] = [{"stage": "pytest_gpu", "what": "pytest -m gpu", "note": result["note"]}]
        self.record("pytest_gpu", result, time.time() - t)

    def finetune(self, builder) -> None:
        s = self.sizes
        if "finetune" in self.args.skip:
            self.record("finetune", {"status": "skipped", "note": "skipped (--skip)"}, 0.0)
            return
        base = self.work / ("sd15-random" if s.sd == "sd15" else "sd-tiny")
        t = time.time()
        if builder is not None:  # the background build of the SD-1.5-size pipeline
            try:
                builder.wait(timeout=max(1.0, self.left() - s.need_finetune))
            except subprocess.TimeoutExpired:
                builder.kill()
                builder.wait()
            if builder.returncode != 0 or not (base / "model_index.json").is_file():
                log = self.work / "build_sd.log"
                tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
                self.record(
                    "finetune",
                    {
                        "status": "failed",
                        "note": "building the SD-1.5-size pipeline did not "
                        f"finish in time or failed: {(tail or ['no log'])[0][:200]}",
                    },
                    time.time() - t,
                )
                return
        elif self.in_process:
            build_sd(s, base)
        self.stages["finetune"] = {
            "status": "ok",
            "seconds": round(time.time() - t, 1),
            "base": str(base),
            "resolution": s.ft_resolution,
            "batch": s.ft_batch,
            "steps": s.ft_steps,
        }
        for name in self.args.finetune_configs:
            for loop in ("meddiff", "plain-diffusers"):
                self.run_stage(
                    "finetune",
                    {"stage": "finetune_one", "loop": loop, "config": name},
                    s.need_finetune,
                    s.cap_finetune,
                    loop=loop,
                    config=name,
                )

    def run(self) -> Path:
        s = self.sizes
        self.work.mkdir(parents=True, exist_ok=True)
        builder = None
        if not self.in_process and "finetune" not in self.args.skip:
            log = open(self.work / "build_sd.log", "w")
            env = {**os.environ, "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}  # leave CPU to the GPU stages
            builder = subprocess.Popen(
                [sys.executable, __file__, "--child", json.dumps({"stage": "build_sd"})],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        self.pytest_gpu()
        self.run_stage("pixel", {"stage": "pixel"}, s.need_pixel, s.cap_pixel)
        self.run_stage("latent", {"stage": "latent"}, s.need_latent, s.cap_latent)
        self.run_stage("sampling", {"stage": "sampling"}, s.need_sampling, s.cap_sampling)
        self.finetune(builder)
        return self.write(final=True)

    def write(self, final: bool) -> Path:
        import torch

        from common import machine

        info = machine()
        if torch.cuda.is_available():
            info.update(
                gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda, bf16=torch.cuda.is_bf16_supported()
            )
        data = {
            "benchmark": "gpu_check",
            "machine": info,
            "quick": self.quick,
            "in_process": self.in_process,
            "budget_s": round(self.deadline - self.t0),
            "elapsed_s": round(time.time() - self.t0, 1),
            "complete": final,
            "notes": self.notes,
            "sizes": dataclasses.asdict(self.sizes),
            "stages": self.stages,
            "rows": self.rows,
        }
        if self.args.install_seconds is not None:
            data["stages"] = {
                "install": {
                    "status": "ok" if self.args.install_rc == 0 else "failed",
                    "rc": self.args.install_rc,
                    "seconds": self.args.install_seconds,
                },
                **self.stages,
            }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.out)
        return self.out


def run_payload(payload: dict, sizes: Sizes, work: Path) -> dict:
    stage = payload["stage"]
    if stage == "pixel":
        return stage_pixel(sizes, work)
    if stage == "latent":
        return stage_latent(sizes, work)
    if stage == "sampling":
        return stage_sampling(sizes, work)
    if stage == "build_sd":
        build_sd(sizes, work / ("sd15-random" if sizes.sd == "sd15" else "sd-tiny"))
        return {"rows": []}
    if stage == "finetune_one":
        return finetune_one(sizes, work, payload["loop"], payload["config"])
    raise ValueError(f"unknown stage {stage!r}")


def print_table(rows: list[dict]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) if rows else len(c) for c in COLUMNS]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(COLUMNS, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes in one process (implied without CUDA)")
    ap.add_argument(
        "--processes",
        action="store_true",
        help="each stage in its own time-boxed process even with --quick (the default on a GPU)",
    )
    ap.add_argument("--budget-s", type=float, default=450, help="seconds for all stages (from now)")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="absolute end time (epoch seconds); wins over "
        "--budget-s (bench/gpu_check.sh passes its own start + 8 minutes)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    ap.add_argument("--finetune-configs", nargs="+", default=list(FINETUNE_CONFIGS), choices=FINETUNE_CONFIGS)
    ap.add_argument("--ft-batch", type=int, default=None, help="fine-tuning batch (default 4 on a GPU, 1 quick)")
    ap.add_argument("--out", default=str(BENCH / "results" / "gpu_check.json"))
    ap.add_argument("--work", default="/tmp/meddiff-gpu-check", help="run folders and the built SD pipeline")
    ap.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)  # from gpu_check.sh
    ap.add_argument("--install-rc", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one stage body, prints RESULT
    args = ap.parse_args()

    import torch

    if args.child:
        sizes = Sizes(**json.loads(os.environ["MEDDIFF_GPU_CHECK_SIZES"]))
        result = run_payload(json.loads(args.child), sizes, Path(os.environ["MEDDIFF_GPU_CHECK_WORK"]))
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return
    # run folders' caches (latents, phantoms) under --work unless the caller chose a cache: fresh, and the user's
    # ~/.cache/meddiff untouched
    os.environ.setdefault("MEDDIFF_CACHE", str(Path(args.work).resolve() / "cache"))
    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    sizes = dataclasses.replace(QUICK if quick else FULL)
    if args.ft_batch:
        sizes.ft_batch = args.ft_batch
    os.environ["MEDDIFF_GPU_CHECK_SIZES"] = json.dumps(dataclasses.asdict(sizes))
    os.environ["MEDDIFF_GPU_CHECK_WORK"] = str(Path(args.work).resolve())
    driver = Driver(args, sizes, quick)
    if not cuda:
        driver.notes.append("no CUDA: quick sizes in one process, the tiny offline SD instead of SD-1.5 size")
    out = driver.run()
    print_table(driver.rows)
    print(f"results: {out} ({time.time() - driver.t0:.0f} s)")


if __name__ == "__main__":
    main()
