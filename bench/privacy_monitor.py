"""A deliberately memorising run and the memorisation check during training (issue 21).

    python bench/privacy_monitor.py [--train 32] [--heldout 128] [--steps 600] [--every 25] [--descriptor-steps 0]
        [--workdir runs/memorise]

32 chest phantoms (32 px) are trained on far too long for their number (batch 32, lr 1e-3: every step sees every
image), with `--privacy.every`: at each check 128 fixed-seed samples from the EMA weights are compared with the
training images (threshold calibrated on 128 held-out phantoms at alpha = 0.01). Reported per check: the copy rate
and its 95 % interval, the training images hit, the held-out minus training denoising loss, and at which step (and
copy rate) the warning first fired. `--descriptor-steps N`: the check also uses a copy descriptor trained for N steps
on the training images (`--privacy.descriptor-steps`). Results: bench/results/privacy_monitor.json, a table and a
PNG of the curve."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--descriptor-steps", type=int, default=0)
    ap.add_argument("--samples", type=int, default=128, help="images sampled per check")
    ap.add_argument("--sample-steps", type=int, default=10, help="sampler steps of those images")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "memorise"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import RESULTS, write_results
    from meddiff.data.phantom_dataset import write_phantom_folder
    from meddiff.logs import configure_logging
    from meddiff.training.config import load_config
    from meddiff.workflow import train_and_report

    configure_logging()
    work = Path(args.workdir)
    data = work / f"phantoms-{args.train}-{args.heldout}"
    n = args.train + args.heldout
    if not (data / "train.csv").is_file():
        write_phantom_folder(data, n=n, size=32, seed=3, valid_fraction=args.heldout / n, progress=False)
    descriptor = f"-descriptor{args.descriptor_steps}" if args.descriptor_steps else ""
    sampling = "" if (args.samples, args.sample_steps) == (128, 10) else f"-samples{args.samples}x{args.sample_steps}"
    run = work / f"run-{args.steps}-every{args.every}{descriptor}{sampling}"
    settings = {
        "data": f"phantom:{data}",
        "out": str(run),
        "resolution": 32,
        "max_steps": args.steps,
        "batch_size": 32,
        "learning_rate": 1e-3,
        "checkpoint_every": args.steps,
        "privacy": {
            "every": args.every,
            "compare_size": 32,
            "descriptor_steps": args.descriptor_steps,
            "samples": args.samples,
            "sample_steps": args.sample_steps,
        },
        "eval": {"fidelity": False},
    }
    config = load_config(None, {}, settings)
    t0 = time.perf_counter()
    if not (run / "training.json").is_file():
        train_and_report(config, progress=True)
    seconds = time.perf_counter() - t0
    rows = json.loads((run / "training.json").read_text())["checks"]["privacy"]
    table = [
        {
            "step": r["step"],
            "copy_rate": round(r["copy_rate"], 4),
            "copy_rate_ci": [round(r["copy_rate_low"], 4), round(r["copy_rate_high"], 4)],
            "training_images_hit": r["training_images_hit"],
            "loss_gap": round(r["loss_gap"], 5),
            "warning": bool(r.get("warning")),
        }
        for r in rows
    ]
    first = next((r for r in table if r["warning"]), None)
    summary = {
        "training_images": args.train,
        "heldout_images": args.heldout,
        "first_warning_step": first["step"] if first else None,
        "copy_rate_at_first_warning": first["copy_rate"] if first else None,
        "descriptor_steps": args.descriptor_steps,
        "samples_per_check": args.samples,
        "seconds": round(seconds, 1),
    }
    write_results(
        "privacy_monitor",
        table,
        ["step", "copy_rate", "copy_rate_ci", "training_images_hit", "loss_gap", "warning"],
        args.out,
        extra={"summary": summary},
    )
    fig, left = plt.subplots(figsize=(7, 3.5))
    steps = [r["step"] for r in table]
    left.plot(steps, [r["copy_rate"] for r in table], "o-", color="tab:red", label="copy rate")
    left.fill_between(steps, *zip(*[r["copy_rate_ci"] for r in table]), color="tab:red", alpha=0.2)
    left.axhline(0.01, color="grey", ls=":", label="alpha (false-flag rate)")
    if first:
        left.axvline(first["step"], color="black", ls="--", label=f"warning (step {first['step']})")
    left.set_xlabel("training step")
    left.set_ylabel("share of samples flagged as copies")
    right = left.twinx()
    right.plot(steps, [r["loss_gap"] for r in table], "s-", color="tab:blue", ms=3, label="loss gap")
    right.set_ylabel("held-out - training denoising loss", color="tab:blue")
    left.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png = Path(args.out).with_suffix(".png") if args.out else RESULTS / "privacy_monitor.png"
    fig.savefig(png, dpi=110)
    print(json.dumps(summary), f"curve: {png}")


if __name__ == "__main__":
    main()
