"""`meddiff demo`: phantom data -> train on a CPU budget -> samples per finding -> label fidelity -> report.html."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from meddiff.data.phantom_dataset import write_phantom_folder
from meddiff.data.spec import load_dataset
from meddiff.evaluation.report import figure, html_page, html_table, loss_curve_png
from meddiff.sampling.grid import grid_png_bytes, upscale_for
from meddiff.training.config import EvalConfig, TrainConfig
from meddiff.workflow import train_and_report

logger = logging.getLogger(__name__)
DEMO_MINUTES = 8.0


def demo_config(out: Path, minutes: float, data: str) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=str(out / "run"),
        resolution=32,
        batch_size=32,
        max_minutes=minutes,
        max_steps=100_000,
        checkpoint_every=500,
        learning_rate=1e-3,
        guidance=2.0,
        sample_steps=20,
        eval=EvalConfig(fidelity=True, fidelity_samples=384, classifier_epochs=8, grid_per_label=16),
    )


def run_demo(out: Path, minutes: float = DEMO_MINUTES, n: int = 3000, seed: int = 0, progress: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    t = time.perf_counter()
    data_dir = out / "phantoms"
    if not (data_dir / "train.csv").is_file():
        counts = write_phantom_folder(data_dir, n=n, size=64, seed=seed, progress=progress)
        logger.info("phantoms: %s in %s", counts, data_dir)
    phantom_s = time.perf_counter() - t
    config = demo_config(out, minutes, f"phantom:{data_dir}")
    config.seed = seed
    summary = train_and_report(config, progress=progress)
    total_s = time.perf_counter() - t_all
    timings = {
        "phantom data": phantom_s,
        **{k.removesuffix("_s").replace("_", " "): v for k, v in summary["timings"].items()},
        "total": total_s,
    }
    real = load_dataset(config.data, config.resolution)
    report = write_demo_report(out / "report.html", summary, timings, real_examples(real, 8))
    (out / "demo.json").write_text(
        json.dumps(
            {
                "timings_s": {k: round(v, 1) for k, v in timings.items()},
                "fidelity": summary["fidelity"],
                "steps": summary["steps"],
                "images_per_second": summary["images_per_second"],
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


def write_demo_report(path: Path, summary: dict, timings: dict[str, float], real: dict[str, bytes]) -> Path:
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
        rows = [[name, fid["real_auc"][name], fid["synthetic_auc"][name]] for name in fid["real_auc"]]
        rows.append(["mean", fid["mean_real_auc"], fid["mean_synthetic_auc"]])
        fid_html = (
            f"<p>A CNN trained on real (phantom) training images scores {fid['n_synthetic']} generated images "
            f"against the labels they were generated with; the real column is the same CNN on "
            f"{fid['n_real_heldout']} held-out real images. Sampling: {fid['sampling']}.</p>"
            + html_table(["label", "real AUC", "synthetic AUC"], rows)
        )
    train_html = (
        f"<p>{summary['dataset']}</p><p>{summary['steps']} steps, batch {summary['batch_size']}, "
        f"{summary['images_per_second']:.1f} img/s, precision {summary['precision']}, "
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
