"""The calibrated near-copy detector (meddiff.evaluation.privacy_gate), measured on known copies (issue 21).

    python bench/privacy_gate.py [--alpha 0.01] [--positives 500] [--datasets pneumoniamnist phantoms]

For each dataset: the training split is the reference set; the held-out images (PneumoniaMNIST: val + test, 1,148
images; phantoms: 1,200 new ones) are split at random into a calibration half (threshold at the (1 - alpha) quantile
of the fused score) and a test half (the measured false-flag rate); `--positives` training images per copy type are
copied exactly or changed (shift, rotation, gamma, noise, crop) and must be flagged. Reported: false-flag rate and
recall per copy type with 95 % Wilson intervals. Patient-disjoint halves need patient ids in the dataset (not yet
carried: PneumoniaMNIST's held-out splits are patient-disjoint from training at the source, the two halves between
themselves may share patients). Autoencoder and model-made near-copies are not measured yet.
Results: bench/results/privacy_gate.json and a table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
PNEUMONIA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"


def load(name: str):
    import numpy as np

    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.suite import to01

    if name == "pneumoniamnist":
        spec = f"medmnist:{PNEUMONIA}"
        train = to01(load_dataset(spec, 28).images)
        held = np.concatenate(
            [to01(load_dataset(f"{spec}?split=val", 28).images), to01(load_dataset(f"{spec}?split=test", 28).images)]
        )
        return train, held, 28
    train = to01(load_dataset("phantom:?n=2000&seed=11", 32).images)
    held = to01(load_dataset("phantom:?n=1200&seed=12", 32).images)  # other seeds: new synthetic patients
    return train, held, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--positives", type=int, default=500)
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "phantoms"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np

    from common import write_results
    from meddiff.evaluation.privacy_gate import COPY_TYPES, ReferenceIndex, augmented_copies, calibrate, measure

    rows = []
    for name in args.datasets:
        if name == "pneumoniamnist" and not PNEUMONIA.is_file():
            print(f"skipped {name}: {PNEUMONIA} not found", flush=True)
            continue
        t0 = time.perf_counter()
        train, held, size = load(name)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(held))
        cal, test = held[order[: len(held) // 2]], held[order[len(held) // 2 :]]
        index = ReferenceIndex(train)
        calibration = calibrate(index, cal, args.alpha)
        sources = train[rng.choice(len(train), min(args.positives, len(train)), replace=False)]
        positives = {kind: augmented_copies(sources, kind) for kind in COPY_TYPES}
        report = measure(calibration, index, test, positives)
        row = {
            "dataset": name,
            "size": size,
            "n_train": len(train),
            "n_calibration": len(cal),
            "n_test_negatives": report.n_test_negatives,
            "alpha": args.alpha,
            "false_flag_rate": round(report.false_flag_rate, 4),
            "false_flag_ci": [round(v, 4) for v in report.false_flag_interval],
            **{f"recall {k}": round(v, 3) for k, v in report.recall.items()},
            "recall_ci": {k: [round(a, 3), round(b, 3)] for k, (a, b) in report.recall_interval.items()},
            "positives_per_type": args.positives,
            "detectors": calibration.detectors,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(row, flush=True)
    cols = ["dataset", "n_test_negatives", "false_flag_rate", *(f"recall {k}" for k in COPY_TYPES), "seconds"]
    write_results("privacy_gate", rows, cols, args.out)


if __name__ == "__main__":
    main()
