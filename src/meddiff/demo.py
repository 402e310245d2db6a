"""`meddiff demo`: phantom data -> train on a CPU budget -> samples per finding -> label fidelity -> report.html."""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddiff.data.phantom_dataset import write_phantom_folder
from meddiff.data.spec import load_dataset
from meddiff.evaluation.report import figure, fmt, html_page, html_table, loss_curve_png
from meddiff.sampling.grid import grid_png_bytes, upscale_for
from meddiff.training.config import EvalConfig, TrainConfig
from meddiff.training.summary import TrainingSummary
from meddiff.workflow import train_and_report

logger = logging.getLogger(__name__)
# Fixed training steps (not a time budget), so that the demo's fidelity table is the same on every machine;
# `--minutes` asks for a time budget instead. Chosen from bench/time_to_quality.py --steps on the demo's phantoms
# (docs/benchmarks.md): every finding's label fidelity reached 0.96 at 2000 steps on 768 images, but a 2000-step
# demo measured Consolidation at 0.940 on 384, so the demo takes 2500 steps (0.979 in the bench) and 512 images.
DEMO_STEPS = 2500


def demo_config(out: Path, data: str, steps: int = DEMO_STEPS, minutes: float | None = None) -> TrainConfig:
    """What `meddiff demo` trains (configs/phantom-demo.yaml): `steps` optimizer steps, or a `minutes` budget."""
    return TrainConfig(
        data=data,
        out=str(out / "run"),
        resolution=32,
        batch_size=32,
        max_minutes=minutes,
        max_steps=100_000 if minutes else steps,
        checkpoint_every=500,
        learning_rate=1e-3,
        guidance=2.0,
        sample_steps=20,
        # the demo always shows its fidelity table, whatever the run's length
        eval=EvalConfig(
            fidelity=True, fidelity_samples=512, classifier_epochs=8, grid_per_label=16, min_steps=0, time_share=0
        ),
    )


def run_demo(
    out: Path,
    minutes: float | None = None,
    n: int = 3000,
    seed: int = 0,
    progress: bool = True,
    steps: int = DEMO_STEPS,
) -> Path:
    """phantoms -> train (`steps` fixed steps, or a `minutes` budget when given) -> grids -> fidelity -> report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    t = time.perf_counter()
    data_dir = out / "phantoms"
    if not (data_dir / "train.csv").is_file():
        counts = write_phantom_folder(data_dir, n=n, size=64, seed=seed, progress=progress)
        logger.info("phantoms: %s in %s", counts, data_dir)
    phantom_s = time.perf_counter() - t
    config = demo_config(out, f"phantom:{data_dir}", steps, minutes)
    config.seed = seed
    if minutes:
        schedule = f"{minutes:g}-minute time budget"
        logger.info("demo with a %s: the step count, and so the result, follows this machine's speed", schedule)
    else:
        schedule = f"{steps} fixed training steps"
        logger.info("demo: %s (the same result on any machine; --minutes for a time budget)", schedule)
    summary = train_and_report(config, progress=progress)
    assert summary is not None  # one process: the main one, which reports
    total_s = time.perf_counter() - t_all
    timings = {
        "phantom data": phantom_s,
        **{k.removesuffix("_s").replace("_", " "): v for k, v in summary["timings"].items()},
        "total": total_s,
    }
    real = load_dataset(config.data, config.resolution)
    machine = TrainingSummary.read(Path(config.out)).machine  # what the loop recorded for the training device
    report = write_demo_report(out / "report.html", summary, timings, real_examples(real, 8), schedule, machine)
    fidelity = summary["fidelity"]
    synthetic = [v for v in (fidelity or {}).get("synthetic_auc", {}).values() if v is not None]
    (out / "demo.json").write_text(
        json.dumps(
            {
                "schedule": schedule,
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
                "fidelity": fidelity,
                "min_synthetic_auc": round(min(synthetic), 4) if synthetic else None,
                "steps": summary["steps"],
                "images_per_second": summary["images_per_second"],
                "precision": summary["precision"],
                "machine": machine,
            },
            indent=2,
        )
    )
    logger.info("report: %s  (total %.1f min)", report, total_s / 60)
    return report


def real_examples(dataset, n: int) -> dict[str, bytes]:
    """A grid of real training images per label, for side-by-side comparison with the generated grid."""
    out = {}
    images = (dataset.images[:, 0].numpy() + 1) / 2
    for k, name in enumerate(dataset.label_names):
        has = (dataset.labels[:, k] > 0.5) & dataset.known[:, k]
        only = has & ((dataset.labels > 0.5).sum(1) == 1)  # prefer images with this finding alone
        idx = (only.nonzero().flatten().tolist() + has.nonzero().flatten().tolist())[:n]
        if idx:
            out[name] = grid_png_bytes(images[idx], columns=min(n, 8), upscale=upscale_for(dataset.resolution))
    return out


def write_demo_report(
    path: Path,
    summary: Mapping[str, Any],
    timings: dict[str, float],
    real: dict[str, bytes],
    schedule: str = "",
    machine: str = "",
) -> Path:
    rows = []
    for name, p in summary["grids"].items():
        cells = figure(f"{name}: generated", Path(p).read_bytes())
        if name in real:
            cells += figure(f"{name}: real phantoms (training data)", real[name])
        rows.append(f"<div class='grids'>{cells}</div>")
    grids = "".join(rows)
    fid = summary.get("fidelity")
    fid_html = "<p>not measured</p>"
    if fid:
        aucs = [[name, fid["real_auc"][name], fid["synthetic_auc"][name]] for name in fid["real_auc"]]
        aucs.append(["mean", fid["mean_real_auc"], fid["mean_synthetic_auc"]])
        fid_html = (
            f"<p>A CNN trained on real (phantom) training images scores {fid['n_synthetic']} generated images "
            f"against the labels they were generated with; the real column is the same CNN on "
            f"{fid['n_real_heldout']} held-out real images. Sampling: {fid['sampling']}.</p>"
            + html_table(["label", "real AUC", "synthetic AUC"], aucs)
        )
    train_html = (
        f"<p>{summary['dataset']}</p><p>{summary['steps']} steps ({schedule or 'as configured'}), batch "
        f"{summary['batch_size']}, "
        f"{summary['images_per_second']:.1f} img/s, precision {summary['precision']}, "
        f"on {html.escape(machine or 'this machine')}, "
        f"{summary['parameters'] / 1e6:.2f} M parameters.</p>" + figure("loss", loss_curve_png(summary["loss_history"]))
    )
    timing_html = html_table(["stage", "seconds"], [[k, round(v, 1)] for k, v in timings.items()])
    page = html_page(
        "meddiff demo: chest phantom synthesis",
        [
            ("Samples per finding (that finding present, the others absent) and unconditional", grids),
            ("Label fidelity", fid_html),
            ("Training", train_html),
            ("Timings", timing_html),
            (
                "About the data",
                "<p>The training data are procedurally drawn chest radiograph phantoms: synthetic test "
                "data with exactly known findings, not medical data.</p>",
            ),
        ],
    )
    path.write_text(page)
    return path


# ----------------------------------------------------------------------------------------------- meddiff demo --3d

DEMO3D_MINUTES = 15.0  # the budget the whole 3D demo is sized for on 2 CPU cores (held on a Zen 4: 9 min; an AMX
# Xeon took 18.5 and a Zen 1 hours)
DEMO3D_SIZE, DEMO3D_N = 64, 48  # 64^3 phantoms: the tumour measurement is reliable from 64^3 (not at 32^3)
# Fixed step counts (not a time budget), so the training does not follow the machine's speed; `--minutes` asks for
# a time budget instead. Measured on two machines: tumour presence came out the same, tumour side and size did not
# (docs/training.md). Sized so that everything fits DEMO3D_MINUTES on a 2-core Zen 4 (issue 20's figures).
DEMO3D_AE_STEPS, DEMO3D_LDM_STEPS = 800, 1200
DEMO3D_LABELS = "Tumour,Left"  # conditions; "Tumour,Left,Large" adds the size condition (add_side_label)
# the autoencoder learns with an MSE loss at 1e-3 (800 steps on 64^3 phantoms: 24.9 dB, SSIM 0.63 and every held-out
# tumour found again in its round trips; the L1 loss smoothed the enhancing rim away: 24.0 dB, SSIM 0.52, none found)
DEMO3D_AE_LR = 1e-3


def demo3d_config(out: Path, data: str, size: int, seed: int) -> TrainConfig:
    """What `meddiff demo --3d` trains (configs/demo3d-cpu.yaml): 64^3 volumes into 16^3 x 4 latents, the
    autoencoder on random 32^3 crops (1/8 of a volume's cost a step)."""
    from meddiff.models.volume import VolumeModelConfig
    from meddiff.models.volume_autoencoder import VolumeAutoencoderConfig
    from meddiff.models.volume_unet import VolumeUNetConfig

    full = size >= 64  # tiny test volumes keep a small network and 4^3 latents
    volume = VolumeModelConfig(
        size=size,
        autoencoder=VolumeAutoencoderConfig(
            downsample=4,
            channels=[16, 32, 64] if full else [8, 16, 32],
            latent_channels=4,
            norm_num_groups=8,
            scale_samples=16,
            train_crop=32 if full else 0,
            reconstruction_loss="mse",
            bright_weight=10.0,  # keeps the tumour's enhancing rim: round-trip cores 25-28 mL (real 23.5), was 9-16
        ),
        unet=VolumeUNetConfig(
            channels=[32, 64, 64] if full else [32, 64],
            attention_levels=[False, False, True] if full else [False, True],  # attention at 8^3: 2.3x the step
            norm_num_groups=16,
            num_head_channels=16,
        ),
    )
    return TrainConfig(
        data=data,
        out=str(out),
        learning_rate=1e-3,
        lr_warmup_steps=5,
        checkpoint_every=0,
        log_every=5,
        cond_dropout=0.15,
        noise_offset=0.1,  # without: sampled latents kept channel means near 0 (the data's are up to 1.15), so the
        # volumes came out too bright, tumours measured 10x too large (230 vs 23.5 mL) and slice FID 20; with it and
        # the autoencoder's bright_weight: 24-29 mL, slice FID 2.8-3.0 (docs/training.md#3d-volumes)
        guidance=8.0,  # on the demo's model (96 volumes): tumour presence AUC 0.69 at 3, 0.88 at 5, 0.98 at 8
        sample_steps=12,
        seed=seed,
        volume=volume,
    )


def add_side_label(folder: Path) -> None:
    """Binary `Left` (tumour in the left hemisphere) and `Large` (tumour core >= LARGE_TUMOUR_ML) columns in the
    phantom tables, so that side and size are labels."""
    import csv

    from meddiff.data.phantom3d import LARGE_TUMOUR_ML

    for name in ("train.csv", "valid.csv"):
        path = folder / name
        rows = list(csv.DictReader(open(path, newline="")))
        if not rows or ("Left" in rows[0] and "Large" in rows[0]):
            continue
        for row in rows:
            tumour = row["Tumour"] == "1"
            row["Left"] = str(int(tumour and row["side"] == "left"))
            row["Large"] = str(int(tumour and float(row["Tumour volume mL"]) >= LARGE_TUMOUR_ML))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def run_demo3d(
    out: Path,
    minutes: float | None = None,
    seed: int = 0,
    progress: bool = True,
    ae_steps: int = DEMO3D_AE_STEPS,
    ldm_steps: int = DEMO3D_LDM_STEPS,
    labels: str = DEMO3D_LABELS,
) -> Path:
    """phantoms -> volume autoencoder -> latent diffusion -> volumes -> report, each stage timed. Fixed step
    counts unless `minutes` asks for a time budget. MEDDIFF_DEMO3D_SIZE / MEDDIFF_DEMO3D_N shrink it (tests)."""
    import dataclasses
    import os

    from meddiff.data.phantom3d import write_phantom_volumes
    from meddiff.workflow_volume import VOLUME_BATCH_SIZES, train_volume_and_report, train_volume_autoencoder_and_report

    size = int(os.environ.get("MEDDIFF_DEMO3D_SIZE", DEMO3D_SIZE))
    n = int(os.environ.get("MEDDIFF_DEMO3D_N", DEMO3D_N))
    budget = (minutes or DEMO3D_MINUTES) * 60
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    data_dir = out / "phantoms"
    if not (data_dir / "valid.csv").is_file():
        logger.info("phantoms: %s", write_phantom_volumes(data_dir, n, size, seed, progress=progress))
    add_side_label(data_dir)
    timings["phantoms"] = time.perf_counter() - t
    base = demo3d_config(out, f"phantom3d:{data_dir}?labels={labels}", size, seed)
    if minutes:  # a time budget, when asked: training gets 65 % of what is left, 75 % of it for the autoencoder;
        # the rest: loading, encoding, sampling, measuring. Results then depend on the machine's speed.
        train_s = max(0.65 * (budget - (time.perf_counter() - t_all)), 6.0)
        ae_limits: dict[str, Any] = {"max_minutes": 0.75 * train_s / 60, "max_steps": 100_000}
        ldm_limits: dict[str, Any] = {"max_minutes": 0.25 * train_s / 60, "max_steps": 100_000}
        logger.info("demo --3d with a %.1f-minute budget: step counts follow this machine's speed", budget / 60)
    else:
        ae_limits, ldm_limits = {"max_steps": ae_steps}, {"max_steps": ldm_steps}
        logger.info(
            "demo --3d: autoencoder %d steps, latent diffusion %d steps (fixed: training does not follow the "
            "machine's speed; --minutes for a time budget)", ae_steps, ldm_steps,
        )  # fmt: skip
    t = time.perf_counter()
    ae_config = dataclasses.replace(
        base,
        out=str(out / "autoencoder"),
        learning_rate=DEMO3D_AE_LR,
        batch_size=VOLUME_BATCH_SIZES["volume-autoencoder"],
        **ae_limits,
    )
    ae = train_volume_autoencoder_and_report(ae_config, progress=progress)
    assert ae is not None  # one process
    timings["autoencoder"] = time.perf_counter() - t
    t = time.perf_counter()
    latent = dataclasses.replace(base.latent, autoencoder=str(out / "autoencoder"))
    ldm_config = dataclasses.replace(
        base,
        out=str(out / "run"),
        latent=latent,
        batch_size=VOLUME_BATCH_SIZES["volume-latent"],
        **ldm_limits,
    )
    summary = train_volume_and_report(ldm_config, progress=progress, per_condition=4, feature_size=32)
    assert summary is not None
    timings["latent diffusion (train, generate, evaluate)"] = time.perf_counter() - t
    for key, value in summary.timings.items():
        timings[f"  {key.removesuffix('_s').replace('_', ' ')}"] = value
    timings["total"] = time.perf_counter() - t_all
    numbers = demo3d_numbers(ae, summary, timings, TrainingSummary.read(out / "run").machine)
    numbers["schedule"] = f"{budget / 60:g}-minute time budget" if minutes else "fixed step counts"
    (out / "demo.json").write_text(json.dumps(numbers, indent=2))
    report = write_demo3d_report(out / "report.html", numbers, out)
    logger.info("report: %s  (total %.1f min)", report, timings["total"] / 60)
    return report


def _sig(value: float) -> float:
    return float(f"{value:.4g}")  # random-conv FIDs are small numbers: keep 4 significant digits


def demo3d_numbers(ae, summary, timings: dict[str, float], machine: str) -> dict[str, Any]:
    fid, ref, m = summary.slice_fid, summary.slice_fid_real, summary.memorization
    return {
        "machine": machine,  # the latent diffusion run's training.json
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "autoencoder": {
            "steps": ae.steps,
            "seconds_per_step": ae.seconds_per_step,
            **ae.reconstruction.to_dict(),
            "latent_shape": ae.latent_shape,
            "tumour_auc_round_trip": ae.tumour_round_trip.presence_auc if ae.tumour_round_trip else None,
        },
        "latent_diffusion": {
            "steps": summary.steps,
            "seconds_per_step": summary.seconds_per_step,
            "seconds_per_volume": summary.seconds_per_volume,
        },
        "label_fidelity": summary.tumour.to_dict() if summary.tumour else None,
        "slice_fid": {p: _sig(d["fid"]) for p, d in fid["planes"].items()} | {"mean": _sig(fid["mean_fid"])},
        "slice_fid_real_vs_real": {p: _sig(d["fid"]) for p, d in ref["planes"].items()}
        | {"mean": _sig(ref["mean_fid"])},
        "features": summary.features,
        "classifier_3d": summary.classifier.to_dict() if summary.classifier else None,
        "diversity": summary.diversity,
        "memorization": {k: m[k] for k in ("rate_flagged", "rate_volume", "rate_slice", "rate_knn_ratio")},
        "conditions": summary.conditions,
    }


def write_demo3d_report(path: Path, numbers: dict[str, Any], out: Path) -> Path:
    montages = "".join(
        figure(p.stem.removeprefix("montage_"), p.read_bytes()) for p in sorted((out / "run" / "samples").glob("*.png"))
    )
    ae, fidelity, diversity = numbers["autoencoder"], numbers["label_fidelity"] or {}, numbers["diversity"]
    fid, fid_real = numbers["slice_fid"]["mean"], numbers["slice_fid_real_vs_real"]["mean"]

    def pair(a, b) -> str:
        return f"{fmt(a)} ({fmt(b)})"

    rows = [
        ["autoencoder held-out PSNR dB / SSIM / 3D SSIM", f"{ae['psnr']:.2f} / {ae['ssim']:.3f} / {ae['ssim_3d']:.3f}"],
        ["tumour present/absent AUC (real)", pair(fidelity.get("presence_auc"), fidelity.get("real_presence_auc"))],
        ["tumour AUC on autoencoder round trips (ceiling)", fmt(ae.get("tumour_auc_round_trip"))],
        ["side accuracy (real held-out)", pair(fidelity.get("side_accuracy"), fidelity.get("real_side_accuracy"))],
        ["tumour core volume error vs real, mL", fmt(fidelity.get("mean_volume_error_ml"))],
        ["slice FID, 3 planes (real-vs-real)", pair(fid, fid_real)],
        [f"diversity: 3D {diversity['metric']}, synthetic (real)", pair(diversity["synthetic"], diversity["real"])],
        ["memorization: flagged volumes", numbers["memorization"]["rate_flagged"]],
    ]  # fmt: skip
    c3d = numbers.get("classifier_3d")
    if c3d:
        rows.insert(4, ["3D classifier FID (real-vs-real)", pair(c3d["fid"], c3d["real_fid"])])
        for name in c3d["labels"]:
            auc = pair(c3d["synthetic_auc"][name], c3d["real_auc"][name])
            rows.insert(5, [f"3D classifier AUC: {name} (real)", auc])
    page = html_page(
        "meddiff demo --3d: brain phantom volumes",
        [
            ("Real (left) and synthetic (right) volumes per label combination", montages),
            ("Numbers", html_table(["measure", "value"], rows)),
            (
                "Timings",
                f"<p>On {html.escape(numbers['machine'])}.</p>"
                + html_table(["stage", "seconds"], [[k, v] for k, v in numbers["timings_s"].items()]),
            ),
            (
                "More",
                "<p>Full reports: <a href='run/report.html'>latent diffusion</a>, "
                "<a href='autoencoder/report.html'>autoencoder</a>; volumes in run/volumes/ (NIfTI + manifest.csv). "
                "The training data are procedurally drawn 3D brain phantoms: synthetic test data, not medical "
                "data.</p>",
            ),
        ],
    )
    path.write_text(page)
    return path
