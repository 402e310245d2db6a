"""Real BraTS cases through load -> resample -> volume autoencoder round trip, with the reconstruction error before
and after a fixed number of training steps (issue 20).

    python bench/brats_roundtrip.py [--shape 64] [--modalities flair] [--steps 200] [--crop 32] [--threads 1]

The six cases of ../shared/data/brats-deepmedic (train 2, validation 2, test 2; see ../shared/README.md) are decoded
into a fresh cache (so the load + resample time is real work, not a cache hit) onto a shape^3 grid around the brain
(brainmask), percentile-normalised, tumour labels read from OTMultiClass; the held-out splits on the training split's
spacing. The volume autoencoder (the default cpu64 preset, or a recipe's with --recipe) then trains exactly --steps
steps on the 2 training cases through meddiff's one training loop (`train_volume_autoencoder_and_report`, which
also writes its report, card and held-out numbers on the validation cases), on random --crop^3 crops of the volumes
(0: whole volumes). Round trips (posterior mean, decoded) of whole volumes are measured for the untrained
autoencoder (the loop's own initial weights: same seed) and the trained one: PSNR, mean 2D SSIM of the axial
slices, 3D SSIM and mean absolute error, all on voxels in [0, 1]. The training cases are an overfit (2 volumes);
validation and test are held out (how far 2 cases carry). Seconds per step leave out the first 3 steps; the
training split's load time includes the automatic spacing's extra reading pass over its cases. On a
shared 2-core CPU, --threads 1 is several times faster for 3D convolutions than two contended threads.

Without the data folder: a one-line message and exit 0; the JSON ({"skipped": ...}) goes to --out only, so the
committed measured results are never overwritten by a skip."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
BRATS = ROOT.parent / "shared" / "data" / "brats-deepmedic"
SPLITS = (("train", "train (overfit)"), ("valid", "validation"), ("test", "test"))
WARMUP = 3
COLUMNS = ["cases", "volumes", "stage", "psnr_dB", "ssim", "ssim_3d", "mae"]


def measure(autoencoder, dataset) -> dict:
    """Round-trip PSNR / slice SSIM / 3D SSIM (meddiff's reconstruction_metrics) and MAE, voxels in [0, 1]."""
    import numpy as np
    import torch

    from meddiff.workflow_volume import reconstruction_metrics

    trips: list[torch.Tensor] = []
    r = reconstruction_metrics(autoencoder, dataset.images, keep=trips)
    x = torch.as_tensor(np.asarray(dataset.images, dtype=np.float32))
    y = torch.cat(trips)
    if y.shape != x.shape or not torch.isfinite(y).all():
        finite = bool(torch.isfinite(y).all())
        raise SystemExit(f"round trips of shape {tuple(y.shape)} (finite: {finite}) for volumes of {tuple(x.shape)}")
    mae = float((x - y).abs().mean()) / 2  # [-1, 1] -> [0, 1]
    return {
        "volumes": r.volumes,
        "psnr_dB": round(r.psnr, 2),
        "ssim": round(r.ssim, 4),
        "ssim_3d": round(r.ssim_3d, 4),
        "mae": round(mae, 4),
    }


def run(args) -> None:
    import torch

    from common import timed_seconds, write_results
    from meddiff.data.spec import load_dataset
    from meddiff.models.volume_autoencoder import VolumeAutoencoder
    from meddiff.training.config import load_config
    from meddiff.workflow_volume import train_volume_autoencoder_and_report

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = (
        f"volumes:{args.data}?modalities={args.modalities}&label_from_mask=OTMultiClass&brainmask=brainmask"
        f"&shape={args.shape}"
    )
    datasets, loading = {}, {}
    for split, _ in SPLITS:  # train first: the held-out splits take its spacing
        t = time.perf_counter()
        ds = load_dataset(f"{spec}&split={split}", args.shape)
        seconds = time.perf_counter() - t
        datasets[split] = ds
        loading[split] = {
            "cases": ds.case_ids,
            "seconds_per_case": round(seconds / len(ds), 2),
            "spacing_mm": list(ds.spacing),
            "tumour_mL": [round(float(v), 1) for v in ds.labels[:, ds.label_names.index("Tumour volume mL")]],
        }
    train_set = datasets["train"]
    settings = {
        "data": spec,
        "out": str(args.run_dir),
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "lr_warmup_steps": 5,
        "log_every": 1,
        "checkpoint_every": 0,
        "seed": args.seed,
        "threads": args.threads,
        "volume.size": args.shape,
        "volume.autoencoder.train_crop": args.crop,
    }
    config = load_config(args.recipe, {}, settings)
    torch.manual_seed(config.seed)  # what the loop does before it builds the model: its initial weights
    untrained = VolumeAutoencoder(config.volume.autoencoder, train_set.shape[0]).eval()
    before = {split: measure(untrained, ds) for split, ds in datasets.items()}
    t = time.perf_counter()
    report = train_volume_autoencoder_and_report(config, progress=False)
    workflow_seconds = time.perf_counter() - t
    assert report is not None
    trained = VolumeAutoencoder.from_pretrained(args.run_dir)
    after = {split: measure(trained, ds) for split, ds in datasets.items()}
    rows = []
    for split, name in SPLITS:
        rows.append({"cases": name, "stage": "step 0", **before[split]})
        rows.append({"cases": name, "stage": f"step {report.steps}", **after[split]})
    step_seconds = timed_seconds(report.loss_history, WARMUP, report.steps - WARMUP) / (report.steps - WARMUP)
    losses = [row[1] for row in report.loss_history]
    summary = {
        "grid": f"{args.shape}^3, channels {', '.join(train_set.channel_names)}",
        "load_resample_s_per_case": {split: v["seconds_per_case"] for split, v in loading.items()},
        "steps": report.steps,
        "crop": args.crop,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "s_per_step": round(step_seconds, 3),
        "train_minutes": report.train_minutes,
        "workflow_s": round(workflow_seconds, 1),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "parameters": report.parameters,
        "latent_shape": report.latent_shape,
        "scaling_factor": round(report.scaling_factor, 4),
        "workflow_heldout_psnr_dB": round(report.reconstruction.psnr, 2),  # the report's own (validation cases)
    }
    settings = {**settings, "out": "(temporary)" if not args.keep_run else str(args.run_dir)}
    extra = {"summary": summary, "loading": loading, "recipe": args.recipe or "cpu64 preset", "settings": settings}
    write_results("brats_roundtrip", rows, COLUMNS, args.out, extra=extra)
    load = ", ".join(f"{k} {v:.2f}" for k, v in summary["load_resample_s_per_case"].items())
    print(
        f"load+resample s/case: {load}; {summary['s_per_step']:.3f} s/step over {report.steps} steps "
        f"(batch {args.batch_size}, crop {args.crop or 'none'}); latents {report.latent_shape}, "
        f"scaling factor {summary['scaling_factor']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(BRATS), help="the BraTS folder (train/ validation/ test/ case folders)")
    ap.add_argument("--shape", type=int, default=64, help="voxels along each axis of the grid")
    ap.add_argument("--modalities", default="flair", help="flair, or flair,t1c for two channels")
    ap.add_argument("--recipe", default=None, help="a training config YAML (e.g. configs/demo3d-cpu.yaml)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--crop", type=int, default=32, help="train on random crops of this edge (0: whole volumes)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: PyTorch's, all cores)")
    ap.add_argument("--keep-run", default=None, help="keep the run folder (report.html, card, autoencoder) here")
    ap.add_argument("--keep-cache", action="store_true", help="use $MEDDIFF_CACHE (load times are then cache hits)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.steps <= WARMUP:
        ap.error(f"--steps must be more than {WARMUP} (the first {WARMUP} are warm-up, not timed)")
    from meddiff.errors import MeddiffError

    if not Path(args.data).is_dir():
        reason = f"BraTS cases not found at {args.data} (see ../shared/README.md)"
        print(f"skipped: {reason}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"benchmark": "brats_roundtrip", "skipped": reason}, indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="brats_roundtrip-"))
    if not args.keep_cache:
        os.environ["MEDDIFF_CACHE"] = str(work / "cache")
    args.run_dir = Path(args.keep_run) if args.keep_run else work / "run"
    try:
        run(args)
    except MeddiffError as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
