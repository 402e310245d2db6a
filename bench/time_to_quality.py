"""Time to quality: label fidelity, domain FID and a classifier trained only on generated images, against
training minutes (benchmark 3 of the performance issue).

    python bench/time_to_quality.py [--data medmnist:../shared/data/pneumoniamnist.npz]
        [--config configs/pneumoniamnist.yaml] [--minutes 3 6 9 12 15 20 25 30] [--n 1000]
        [--steps 250 500 1000 ...] [--variant NAME [--set key=value ...]] [--workdir runs/ttq]

The model trains with meddiff's own loop, stopping at each mark (training minutes: time spent in training steps,
without start-up, export or evaluation) and resuming from its checkpoint, which continues the same run exactly
(batches and noise are functions of the step). At each mark the EMA pipeline is evaluated with the same
real-trained classifier (`meddiff evaluate`'s domain classifier, cached):
- label-fidelity AUC of `--n` images generated with DPM-Solver++ 20 steps, conditions drawn from the real test
  labels, next to the classifier's AUC on the real test split (the ceiling);
- domain FID of those images against the real test split (penultimate classifier features), next to FID(real
  train, real test) (the floor);
- downstream: the classifier recipe trained only on those generated images, tested on the real test split.

`--steps` puts the marks at optimizer steps instead of minutes: steps to quality hold on any machine (minutes are
this CPU's). Label fidelity is reported as the mean over labels and as the worst label (`fidelity_min`, per label
in `fidelity_per_label`).

`--set` overrides config keys for ablations (e.g. `--variant vpred --set model.prediction_type=v_prediction`,
`--variant no-min-snr --set snr_gamma=null`). Marks already trained are only evaluated again, so `--guidance 1`
re-scores a finished run's snapshots at another guidance scale. Results:
bench/results/time_to_quality[-VARIANT][-gGUIDANCE].json, a table and a PNG of the curves."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = f"medmnist:{ROOT.parent / 'shared' / 'data' / 'pneumoniamnist.npz'}"


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def evaluate_snapshot(pipe, train, test, classifier, n: int, guidance: float, epochs: int) -> dict:
    import torch

    from meddiff.data.dataset import ImageLabelDataset
    from meddiff.evaluation.classifier import per_label_auc, predict, train_classifier
    from meddiff.evaluation.distribution import fid
    from meddiff.evaluation.features import embed
    from meddiff.evaluation.fidelity import label_fidelity
    from meddiff.sampling.generate import SamplingSettings

    t0 = time.perf_counter()
    settings = SamplingSettings(steps=20, scheduler="dpm++", guidance=guidance, seed=0, batch_size=128)
    result = label_fidelity(pipe, train, test, n, settings, classifier_epochs=epochs, progress=False)
    sample_seconds = time.perf_counter() - t0
    images = torch.from_numpy(result.images).unsqueeze(1) * 2 - 1
    fid_syn = fid(embed(classifier, test.images), embed(classifier, images))
    synthetic = ImageLabelDataset(
        images,
        torch.from_numpy(result.labels).float(),
        torch.from_numpy(result.known),
        list(train.label_names),
        multiclass=train.multiclass,
    )
    model = train_classifier(synthetic, epochs=epochs, seed=0, progress=False)
    downstream = per_label_auc(predict(model, test.images), test.labels.numpy(), test.known.numpy(), train.label_names)
    per_label = {k: round(v, 4) for k, v in result.synthetic_auc.items() if v is not None}
    return {
        "fidelity_auc": mean(result.synthetic_auc.values()),
        "fidelity_min": min(per_label.values()) if per_label else None,
        "fidelity_per_label": per_label,
        "real_test_auc": mean(result.real_auc.values()),
        "domain_fid": round(fid_syn, 3),
        "synthetic_only_auc": mean(downstream.values()),
        "sample_seconds": round(sample_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def plot(rows: list[dict], path: Path, targets: dict, unit: str = "train_minutes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        x = [r[unit] for r in rs]
        a.plot(x, [r["fidelity_auc"] for r in rs], "o-", label=f"{variant}: label fidelity")
        a.plot(x, [r["synthetic_only_auc"] for r in rs], "s--", label=f"{variant}: trained on synthetic only")
        b.plot(x, [r["domain_fid"] for r in rs], "o-", label=variant)
    a.axhline(targets["fidelity_auc"], color="grey", lw=0.8, ls=":")
    a.axhline(targets["synthetic_only_auc"], color="grey", lw=0.8, ls=":")
    xlabel = "optimizer steps" if unit == "steps" else "training minutes (2-core CPU)"
    a.set(xlabel=xlabel, ylabel="AUC on real test labels", ylim=(0.5, 1.0))
    b.axhline(rows[0]["fid_real_train_vs_test"], color="grey", lw=0.8, ls=":", label="real train vs test")
    b.set(xlabel=xlabel, ylabel="domain FID vs real test (lower is better)", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--config", default=str(ROOT / "configs" / "pneumoniamnist.yaml"))
    ap.add_argument("--minutes", type=float, nargs="+", default=[3, 6, 9, 12, 15, 20, 25, 30])
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="marks at these optimizer steps instead")
    ap.add_argument("--n", type=int, default=1000, help="generated images per mark")
    ap.add_argument("--epochs", type=int, default=10, help="classifier epochs (real-trained and synthetic-trained)")
    ap.add_argument("--guidance", type=float, default=None, help="sampling guidance (default: the config's)")
    ap.add_argument("--variant", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "ttq"))
    ap.add_argument("--fresh", action="store_true", help="delete the variant's earlier run first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from common import write_results
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.evaluation.distribution import fid
    from meddiff.evaluation.features import domain_classifier, embed
    from meddiff.logs import configure_logging
    from meddiff.models.storage import load_pipeline
    from meddiff.training.config import load_config
    from meddiff.training.loop import train as train_loop

    configure_logging()  # meddiff's messages ("resumed from ...") on stderr
    spec = parse_spec(args.data)
    overrides = {"data": args.data, **parse_sets(args.set)}
    config = load_config(args.config, {"data": args.data}, parse_sets(args.set))
    run_dir = Path(args.workdir) / args.variant
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    config.out = str(run_dir)
    guidance = config.guidance if args.guidance is None else args.guidance
    config.checkpoint_every = 0  # a checkpoint at every mark (end of each segment) is enough
    train = load_dataset(spec, config.resolution)
    test = load_dataset(spec.heldout(), config.resolution)
    classifier = domain_classifier(train, str(spec), epochs=args.epochs, progress=False)
    fid_floor = round(fid(embed(classifier, test.images), embed(classifier, train.images)), 3)
    print(f"{len(train)} train / {len(test)} test images; FID(real train, real test) = {fid_floor}", flush=True)

    rows = []
    by_steps = args.steps is not None
    for mark in sorted(args.steps if by_steps else args.minutes):
        snapshot = run_dir / "snapshots" / (f"{mark}steps" if by_steps else f"{mark:g}min")
        if not snapshot.is_dir():
            if by_steps:
                config.max_steps, config.max_minutes = int(mark), None
            else:
                config.max_minutes = mark
            config.resume = "latest" if (run_dir / "checkpoints").is_dir() else None
            result = train_loop(config, train, progress=True)
            shutil.copytree(result.pipeline_dir, snapshot / "pipeline")
            (snapshot / "training.json").write_text((run_dir / "training.json").read_text())
        import json

        info = json.loads((snapshot / "training.json").read_text())
        pipe = load_pipeline(snapshot)
        torch.manual_seed(0)
        row = {
            "variant": args.variant,
            "train_minutes": round(info["train_seconds_total"] / 60, 2),
            "steps": info["steps"],
            "images_seen": info["steps"] * config.batch_size,
            "guidance": guidance,
            **evaluate_snapshot(pipe, train, test, classifier, args.n, guidance, args.epochs),
            "fid_real_train_vs_test": fid_floor,
        }
        rows.append(row)
        print(row, flush=True)

    targets = {"fidelity_auc": 0.95, "synthetic_only_auc": 0.90}
    unit = "steps" if by_steps else "train_minutes"
    targets_min = {**targets, "fidelity_min": 0.95}
    first = {key: next((r[unit] for r in rows if (r[key] or 0) >= t), None) for key, t in targets_min.items()}
    print(
        f"first mark ({unit}) reaching fidelity AUC >= 0.95: {first['fidelity_auc']}, on every label: "
        f"{first['fidelity_min']}; synthetic-only classifier AUC >= 0.90: {first['synthetic_only_auc']}",
        flush=True,
    )
    name = "time_to_quality" + ("" if args.variant == "default" else f"-{args.variant}")
    name += "" if args.guidance is None else f"-g{args.guidance:g}"
    cols = [
        "variant",
        "train_minutes",
        "steps",
        "guidance",
        "fidelity_auc",
        "fidelity_min",
        "real_test_auc",
        "domain_fid",
        "fid_real_train_vs_test",
        "synthetic_only_auc",
        "eval_seconds",
    ]
    extra = {
        "config": config.to_dict(),
        "overrides": overrides,
        "n_generated": args.n,
        "sampler": "dpm++ 20 steps",
        "first_mark_reaching": {"unit": unit, **first},
        "targets": targets,
    }
    path = write_results(name, rows, cols, args.out, extra=extra)
    plot(rows, path.with_suffix(".png"), targets, unit)
    print(f"curves: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
