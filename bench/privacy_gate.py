"""The calibrated near-copy detector (meddiff.evaluation.privacy_gate), measured on known copies (issue 21).

    python bench/privacy_gate.py [--alpha 0.01] [--positives 500] [--descriptor-steps 600] [--seeds 0 1 2]
        [--datasets pneumoniamnist phantoms phantoms-demo] [--model pneumoniamnist=RUN ...]

For each dataset: the training split is the reference set, and the copy descriptor is trained on it
(`--descriptor-steps`, 0: pixel detectors only); the held-out images are split at random into a calibration half
(threshold at the (1 - alpha) quantile of the fused score) and a test half (the measured false-flag rate), after
held-out images that duplicate a training image (a leak between the splits: PneumoniaMNIST's val split holds 8) are
counted and left out; `--positives` training images per copy type are copied exactly or changed (shift, rotation,
gamma, noise, crop) and must be flagged. The fusion of the detectors' scores is learned from known copies of
`--fusion-sources` other training images (0: the largest standardised score). Where a model trained on that data
is given (defaults below, used when they exist), its own near-copies are measured too: the same training images
noised to t = 0.1 / 0.3 / 0.5 and denoised by the model with their own labels.

- pneumoniamnist: 28 px; held-out = val + test (1,148 images); model: runs/few_step/teacher (bench/few_step.py);
  `--pneumonia-holdout N` moves N training images (a fixed random draw) to the held-out side, so that the test half
  holds over 1,000 negatives: the file it writes (runs/privacy_holdout/pneumoniamnist_holdoutN.npz, its `val` split
  = val + the N moved images) is the data the model must then be trained on, e.g.
  `meddiff train --config configs/pneumoniamnist.yaml --data medmnist:THAT.npz --max-steps 1000 --out RUN`, passed
  as `--model pneumoniamnist=RUN` (required with it). MedMNIST keeps no patient ids, so the moved images are only
  image-disjoint from the remaining training images: a patient with images on both sides makes a held-out image
  look like a copy, which can only raise the measured false-flag rate;
- phantoms: 32 px, 2,000 training phantoms, 1,200 new ones held out (`--phantoms TRAIN HELD`); no model;
- phantoms-demo: the 2D demo's phantoms (runs/demo_run2/phantoms at 32 px: 2,400 training, 600 held out) and its
  2,500-step model (runs/demo_run2/run, from `meddiff demo --out runs/demo_run2`).
Patient-disjoint halves need patient ids (none here: PneumoniaMNIST's held-out splits are patient-disjoint from
training at the source, the two halves between themselves may share patients).
`--seeds`: a row per seed (the held-out split into halves, the copy descriptor's training, the known copies and
the model's near-copies all follow it; the data and the model stay). Results: bench/results/privacy_gate.json and a
table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
PNEUMONIA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MODELS = {
    "pneumoniamnist": ROOT / "runs" / "few_step" / "teacher",
    "phantoms-demo": ROOT / "runs" / "demo_run2" / "run",
}


def holdout_file(n: int) -> Path:
    """PneumoniaMNIST with `n` training images (a fixed random draw, seed 0) moved into the val split, written once."""
    import numpy as np

    out = ROOT / "runs" / "privacy_holdout" / f"pneumoniamnist_holdout{n}.npz"
    if not out.is_file():
        with np.load(PNEUMONIA) as z:
            arrays = {k: z[k] for k in z.files}
        moved = np.zeros(len(arrays["train_images"]), bool)
        moved[np.random.default_rng(0).permutation(len(moved))[:n]] = True
        for part in ("images", "labels"):
            train = arrays[f"train_{part}"]
            arrays[f"val_{part}"] = np.concatenate([arrays[f"val_{part}"], train[moved]])
            arrays[f"train_{part}"] = train[~moved]
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.stem + ".partial.npz")
        np.savez_compressed(partial, **arrays)
        partial.replace(out)
    return out


def load(name: str, phantoms: tuple[int, int] = (2000, 1200), pneumonia: Path = PNEUMONIA):
    """(training dataset, training images, held-out images, size); images (N, H, W) in [0, 1]. `phantoms`: how many
    training and held-out images the phantoms dataset renders."""
    import numpy as np

    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.suite import to01

    if name == "pneumoniamnist":
        spec, size = f"medmnist:{pneumonia}", 28
        held = np.concatenate([to01(load_dataset(f"{spec}?split={s}", size).images) for s in ("val", "test")])
    elif name == "phantoms-demo":
        spec, size = f"phantom:{ROOT / 'runs' / 'demo_run2' / 'phantoms'}", 32
        held = to01(load_dataset(f"{spec}?split=valid", size).images)
    else:
        spec, size = f"phantom:?n={phantoms[0]}&seed=11", 32
        held = to01(load_dataset(f"phantom:?n={phantoms[1]}&seed=12", size).images)  # another seed: new patients
    train = load_dataset(spec, size)
    return train, to01(train.images), held, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--positives", type=int, default=500)
    ap.add_argument("--descriptor-steps", type=int, default=600)
    ap.add_argument(
        "--fusion-sources", type=int, default=250, help="training images whose known copies fit the fusion (0: max)"
    )
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "phantoms", "phantoms-demo"])
    ap.add_argument("--model", nargs="*", default=[], help="NAME=RUN: the model whose near-copies to measure")
    ap.add_argument(
        "--phantoms", type=int, nargs=2, default=[2000, 1200], metavar=("TRAIN", "HELD"), help="the phantoms' sizes"
    )
    ap.add_argument(
        "--pneumonia-holdout",
        type=int,
        default=0,
        metavar="N",
        help="move N PneumoniaMNIST training images to the held-out side (writes the file to train the model on)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="a row per seed (splits, descriptor, copies)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from common import write_results
    from meddiff.evaluation.privacy_gate import audit_detector, own_labels
    from meddiff.logs import configure_logging

    configure_logging()
    models = {**MODELS, **{k: Path(v) for k, v in (m.split("=", 1) for m in args.model)}}
    if args.pneumonia_holdout and not any(m.startswith("pneumoniamnist=") for m in args.model):
        data = holdout_file(args.pneumonia_holdout)  # written now, so that the model can be trained on it
        raise SystemExit(
            "--pneumonia-holdout needs --model pneumoniamnist=RUN, a model trained without the moved images (the "
            f"default model saw them): meddiff train --config configs/pneumoniamnist.yaml --data medmnist:{data} "
            "--max-steps 1000 --max-minutes 60 --out RUN"
        )
    rows = []
    for name, seed in ((n, s) for n in args.datasets for s in args.seeds):
        if name == "pneumoniamnist" and not PNEUMONIA.is_file():
            print(f"skipped {name}: {PNEUMONIA} not found", flush=True)
            continue
        if name == "phantoms-demo" and not (ROOT / "runs" / "demo_run2" / "phantoms").is_dir():
            print(f"skipped {name}: run `meddiff demo --out runs/demo_run2` first", flush=True)
            continue
        t0 = time.perf_counter()
        pneumonia = PNEUMONIA
        if name == "pneumoniamnist" and args.pneumonia_holdout:
            pneumonia = holdout_file(args.pneumonia_holdout)
            print(f"PneumoniaMNIST with {args.pneumonia_holdout} training images held out: {pneumonia}", flush=True)
        dataset, train, held, size = load(name, tuple(args.phantoms), pneumonia)
        model = models.get(name)
        model = model if model is not None and (model / "pipeline").is_dir() else None
        audit = audit_detector(
            train,
            held,
            alpha=args.alpha,
            positives=args.positives,
            seed=seed,
            descriptor_steps=args.descriptor_steps,
            model_dir=model,
            conditions=own_labels(dataset, model) if model else None,
            progress=True,
            fusion_sources=args.fusion_sources,
        )
        report = audit.report
        row = {
            "dataset": name,
            "seed": seed,
            "size": size,
            "n_train": len(train),
            "n_heldout": len(held),
            "training_images_held_out": args.pneumonia_holdout if name == "pneumoniamnist" else 0,
            "heldout_duplicates": audit.heldout_duplicates,
            "n_calibration": audit.calibration.n_calibration,
            "n_test_negatives": report.n_test_negatives,
            "alpha": args.alpha,
            "false_flag_rate": round(report.false_flag_rate, 4),
            "false_flag_ci": [round(v, 4) for v in report.false_flag_interval],
            **{f"recall {k}": round(v, 3) for k, v in report.recall.items()},
            "recall_ci": {k: [round(a, 3), round(b, 3)] for k, (a, b) in report.recall_interval.items()},
            "positives_per_type": args.positives,
            "detectors": audit.calibration.detectors,
            "fusion": "learned" if audit.calibration.weights else "max",
            "fusion_weights": {k: round(v, 3) for k, v in (audit.calibration.weights or {}).items()},
            "fusion_fit": audit.calibration.n_fit,
            "descriptor_steps": args.descriptor_steps,
            "model": str(model) if model else None,
            "seconds": {k: round(v, 1) for k, v in audit.seconds.items()} | {"all": round(time.perf_counter() - t0)},
        }
        rows.append(row)
        print(row, flush=True)
    kinds = list(dict.fromkeys(k for r in rows for k in r if k.startswith("recall ") and k != "recall_ci"))
    cols = ["dataset", "seed", "heldout_duplicates", "n_test_negatives", "false_flag_rate", *kinds]
    write_results("privacy_gate", rows, cols, args.out)


if __name__ == "__main__":
    main()
