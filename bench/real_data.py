"""Does synthetic data help a real classifier? Train a generator on a real 2D set, generate a labelled synthetic
set, and compare classifiers trained on real, synthetic, real + synthetic, synthetic pretraining + real fine-tuning,
class-reweighted real, and real fractions with and without synthetic images (issue 24).

    python bench/real_data.py --dataset pneumoniamnist          # 28 px, configs/pneumoniamnist.yaml
    python bench/real_data.py --dataset alzheimer               # 64 px, configs/alzheimer-mri-64.yaml
    python bench/real_data.py --dataset alzheimer-128           # 128 px latent: configs/alzheimer-mri-latent-128.yaml
        [--autoencoder RUN]                                     # (its autoencoder trained first unless given)
        [--steps N] [--synthetic mirror|balance] [--n-synthetic N] [--seeds 3] [--epochs 10]
        [--fractions 0.1 0.25] [--workdir runs/real_data] [--quick]

1. the generator: meddiff's training loop with the dataset's recipe for a fixed number of steps (steps, not minutes,
   so the result holds on any machine; reused from --workdir), then the usual report: sample grids per class and
   per-class label fidelity (`meddiff train`'s metrics.json); a latent recipe first trains its autoencoder
   (`meddiff train-autoencoder` with the preset's autoencoder recipe) unless --autoencoder names one;
2. the synthetic set (`meddiff generate`'s code): `mirror` draws one image per real training image with its label
   (the real class balance), `balance` draws the same number for every class (rare-class augmentation);
3. `meddiff evaluate` with every downstream protocol and the real fractions (same classifier recipe, epochs and
   seeds; AUC averaged over seeds with bootstrap 95 % intervals; recall at 0.5 per class). The 128 px preset
   evaluates at 64 px (images resized): the same classifier as the 64 px rows, so the two generators compare directly.
Results: bench/results/real_data-DATASET[-balance].json, a table, and a PNG of generated vs real images per class.
The Alzheimer set has several slices per subject and no subject IDs: its train/test split is not patient-disjoint,
so every AUC on it is optimistic (said in the JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
DATASETS = {
    "pneumoniamnist": {
        "data": f"medmnist:{SHARED / 'pneumoniamnist.npz'}",
        "config": ROOT / "configs" / "pneumoniamnist.yaml",
        "steps": 6000,
        "note": "MedMNIST's official splits (patient-level in the source data)",
    },
    "alzheimer": {
        "data": f"folder:{SHARED / 'alzheimer-mri'}",
        "config": ROOT / "configs" / "alzheimer-mri-64.yaml",
        "steps": 1000,
        "note": "several slices per subject and no subject IDs: train/test are NOT patient-disjoint, AUCs are "
        "optimistic",
    },
    "alzheimer-128": {
        "data": f"folder:{SHARED / 'alzheimer-mri'}",
        "config": ROOT / "configs" / "alzheimer-mri-latent-128.yaml",
        "autoencoder_config": ROOT / "configs" / "alzheimer-mri-autoencoder-128.yaml",
        "steps": 1000,
        "evaluate_resolution": 64,
        "note": "several slices per subject and no subject IDs: train/test are NOT patient-disjoint, AUCs are "
        "optimistic",
    },
}


PROTOCOLS = ("real", "synthetic", "real+synthetic", "synthetic->real", "real-reweighted")


def class_grid_png(run_dir: Path, real, path: Path) -> None:
    """Per class, the run's generated grid (samples/grid_CLASS.png) next to real training images, in one PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from meddiff.demo import real_examples
    from meddiff.workflow import slug

    reals = real_examples(real, 8)
    names = list(real.label_names)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 1.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        generated = run_dir / "samples" / f"grid_{slug(name)}.png"
        images = {
            "generated": Image.open(generated) if generated.is_file() else None,
            "real": Image.open(io.BytesIO(reals[name])) if name in reals else None,
        }
        for col, (title, image) in enumerate(images.items()):
            ax = axes[row][col]
            if image is not None:
                ax.imshow(image, cmap="gray")
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="pneumoniamnist")
    ap.add_argument("--data", default=None, help="override the dataset spec (e.g. a phantom folder for a smoke test)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--steps", type=int, default=None, help="generator training steps (default: per dataset)")
    ap.add_argument("--synthetic", choices=("mirror", "balance"), default="mirror")
    ap.add_argument("--n-synthetic", type=int, default=None, help="default: as many as real training images")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.1, 0.25])
    ap.add_argument(
        "--protocols",
        nargs="+",
        default=list(PROTOCOLS),
        choices=PROTOCOLS,
        help="downstream protocols (default: all; `real` is always run, it is the reference)",
    )
    ap.add_argument(
        "--autoencoder", default=None, help="latent presets: a trained autoencoder run to use (default: train one)"
    )
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "real_data"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps, few images, one seed")
    args = ap.parse_args()
    preset = DATASETS[args.dataset]
    steps = args.steps or preset["steps"]
    if args.quick:
        steps, args.seeds, args.epochs, args.n_synthetic, args.sample_steps = 4, 1, 1, args.n_synthetic or 32, 2

    import torch

    from common import write_results
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.evaluation.suite import run_evaluation
    from meddiff.logs import configure_logging
    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.generate import SamplingSettings
    from meddiff.sampling.plan import GenerationPlan, make_plan
    from meddiff.sampling.synthesize import generate_dataset
    from meddiff.training.config import load_config
    from meddiff.workflow import train_and_report, train_autoencoder_and_report

    configure_logging()
    data = args.data or preset["data"]
    work = Path(args.workdir) / args.dataset
    t0 = time.perf_counter()
    autoencoder_report, ae_dir, ae_tag = None, None, ""
    if "autoencoder_config" in preset:
        ae_config = load_config(str(preset["autoencoder_config"]), {}, {"data": data})
        if args.quick:
            ae_config.max_steps = 4
        # named by its step count (a --quick autoencoder is never taken for a full one) unless given
        ae_dir = Path(args.autoencoder) if args.autoencoder else work / f"autoencoder-{ae_config.max_steps}steps"
        if not (ae_dir / "metrics.json").is_file():
            print(f"training the autoencoder into {ae_dir}", flush=True)
            ae_config.out = str(ae_dir)
            train_autoencoder_and_report(ae_config, progress=not args.quick)
        autoencoder_report = json.loads((ae_dir / "metrics.json").read_text())
        ae_tag = "-" + ae_dir.resolve().name  # the generator (and what is made from it) belongs to this autoencoder
    run_dir = work / f"generator-{steps}steps{ae_tag}"
    config = load_config(str(args.config or preset["config"]), {}, {"data": data, "out": str(run_dir)})
    config.max_steps, config.max_minutes = steps, None
    if ae_dir is not None:
        config.latent.autoencoder = str(ae_dir)
    if args.quick:
        config.eval.min_steps, config.eval.fidelity_samples, config.eval.grid_per_label = 0, 32, 2
        config.eval.classifier_epochs = 1
    if not (run_dir / "metrics.json").is_file():
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            config.resume = "latest"  # an interrupted generator (or its report) carries on from its last checkpoint
        print(f"training the generator: {steps} steps", flush=True)
        train_and_report(config, progress=not args.quick)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train_minutes = metrics["train_minutes"]

    real = load_dataset(parse_spec(data), config.resolution)
    pipe = load_pipeline(run_dir)
    codec = LabelCodec(pipe.label_names)
    n = args.n_synthetic or len(real)
    if args.synthetic == "balance":
        plan = make_plan(codec, balance=True, n=n)
    else:  # the real training labels, row by row (cycled when n is larger; a random subset when smaller, so that
        # the class mix stays the real one whatever order the files come in)
        if n < len(real):
            order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]
        else:
            order = torch.arange(n) % len(real)
        plan = GenerationPlan(real.labels[order], real.known[order], [None] * n, "mirror of the real training labels")
    settings = SamplingSettings(steps=args.sample_steps, guidance=config.guidance, seed=0, batch_size=128)
    subset = "-subset" if args.synthetic == "mirror" and n < len(real) else ""  # a random subset of the rows
    syn_dir = work / f"synthetic-{args.synthetic}{subset}-{n}-{steps}steps{ae_tag}"
    t = time.perf_counter()
    if not (syn_dir / "manifest.csv").is_file():
        generate_dataset(pipe, run_dir, plan, settings, syn_dir, progress=not args.quick)
    generate_s = time.perf_counter() - t
    eval_dir = work / f"evaluate-{args.synthetic}-{n}-{steps}steps{ae_tag}-{args.seeds}x{args.epochs}"
    run_evaluation(
        data,
        str(syn_dir),
        eval_dir,
        resolution=preset.get("evaluate_resolution", config.resolution),
        seeds=args.seeds,
        classifier_epochs=args.epochs,
        protocols=tuple(dict.fromkeys(["real", *args.protocols])),
        fractions=tuple(args.fractions),
        progress=not args.quick,
    )
    evaluation = json.loads((eval_dir / "metrics.json").read_text())
    fidelity = (metrics.get("fidelity") or {}).get("synthetic_auc", {})
    rows = []
    for name, entry in evaluation["downstream"].items():
        row = {"train_set": name, "n_train": entry["n_train"], "macro_auc": round(entry["mean_auc"], 4)}
        for label, auc in entry["auc"].items():
            row[f"auc {label}"] = None if auc is None else round(auc["auc"], 4)
            row[f"ci {label}"] = None if auc is None else [round(v, 4) for v in auc["ci95"]]
            recall = entry["recall"].get(label)
            row[f"recall {label}"] = None if recall is None else round(recall, 3)
        rows.append(row)
    by_set = {r["train_set"]: r for r in rows}

    def gap(a: str, b: str) -> float | None:
        return round(by_set[a]["macro_auc"] - by_set[b]["macro_auc"], 4) if a in by_set and b in by_set else None

    summary = {
        "synthetic_only_gap": gap("real", "synthetic"),
        "real_plus_synthetic_gain": gap("real+synthetic", "real"),
        "pretrain_gain": gap("synthetic->real", "real"),
        "label_fidelity": fidelity,
        "fid_synthetic_vs_real_test": evaluation["distribution"]["fid_synthetic_vs_real_test"],
        "fid_real_train_vs_real_test": evaluation["distribution"]["fid_real_train_vs_real_test"],
        "generator_steps": metrics["steps"],
        "generator_train_minutes": round(train_minutes, 2),
        "generate_seconds": round(generate_s, 1),
        "synthetic": args.synthetic,
        "n_synthetic": n,
        "split_note": preset["note"],
        "generator_resolution": config.resolution,
        "evaluate_resolution": preset.get("evaluate_resolution", config.resolution),
        "autoencoder": None
        if autoencoder_report is None
        else {k: autoencoder_report.get(k) for k in ("psnr", "ssim", "latent_shape", "heldout_images")},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    label_cols = [f"auc {name}" for name in real.label_names] + [f"recall {name}" for name in real.label_names]
    name = f"real_data-{args.dataset}" + ("-balance" if args.synthetic == "balance" else "")
    path = write_results(
        name, rows, ["train_set", "n_train", "macro_auc", *label_cols], args.out, extra={"summary": summary}
    )
    class_grid_png(run_dir, real, path.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"grids: {path.with_suffix('.png')}; report: {eval_dir / 'report.html'}")


if __name__ == "__main__":
    main()
