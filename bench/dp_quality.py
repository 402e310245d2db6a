"""What differential privacy costs in image quality: label fidelity, domain FID and a classifier trained only on
generated images, against epsilon, with the same recipe, data, seed and step count for every row.

    python bench/dp_quality.py [--data medmnist:../shared/data/pneumoniamnist.npz]
        [--config configs/pneumoniamnist.yaml] [--steps 500] [--rows none eps=10 eps=10,k=4 ...]
        [--n 1000] [--set key=value ...] [--workdir runs/dp_quality]

Each row trains one model from scratch with meddiff's loop (`--dp.epsilon`, `--dp.multiplicity`), then is scored
exactly as bench/time_to_quality.py scores a mark (the real-trained domain classifier, cached; DPM-Solver++ 20
steps; conditions drawn from the real test labels):
- `none`: no DP (the same loop and batch size; the reference);
- `eps=E[,k=K][,clip=C]`: DP-SGD calibrated to spend E by the last step (delta = min(1e-5, 0.1 / units)), K noise
  draws per image averaged before clipping (noise multiplicity), per-sample clip C;
- `sigma=S[,k=K]`: a fixed noise multiplier instead (epsilon reported).
Rows whose pipeline exists are only scored again, if they were trained with the same data, config and steps
(bench_recipe.json in the row's folder; otherwise --fresh). The privacy unit is the patient where the data has
patient ids, else the image (PneumoniaMNIST has none: per image). Results: bench/results/dp_quality.json, a table
and a PNG (fidelity and FID against epsilon)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from time_to_quality import DEFAULT_DATA, ROOT, evaluate_snapshot, parse_sets  # noqa: E402


def parse_row(text: str) -> dict:
    """'none' | 'eps=10,k=4,clip=1' | 'sigma=1.2' -> the DP overrides of that row, checked at once (a bad row
    must not stop the bench hours later)."""
    if text == "none":
        return {}
    keys = {"eps": "epsilon", "sigma": "noise_multiplier", "k": "multiplicity", "clip": "clip"}
    out: dict = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in keys:
            raise SystemExit(f"--rows: {part!r} in {text!r} is not eps=E, sigma=S, k=K or clip=C")
        try:
            out[keys[key]] = int(value) if key == "k" else float(value)
        except ValueError:
            raise SystemExit(f"--rows: {part!r} in {text!r} is not a number") from None
        if out[keys[key]] <= 0:
            raise SystemExit(f"--rows: {part!r} in {text!r} must be above 0 (use 'none' for the run without DP)")
    if ("epsilon" in out) == ("noise_multiplier" in out):
        raise SystemExit(f"--rows: {text!r} needs eps=E or sigma=S, not both (or is 'none')")
    from meddiff.errors import MeddiffError
    from meddiff.training.differential_privacy import DPConfig

    try:
        DPConfig(**out)
    except (MeddiffError, ValueError) as e:
        raise SystemExit(f"--rows: {text!r}: {e}") from None
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    private = [r for r in rows if r["epsilon"] is not None]
    reference = [r for r in rows if r["epsilon"] is None]
    for k in sorted({r["multiplicity"] for r in private}):
        rs = sorted((r for r in private if r["multiplicity"] == k), key=lambda r: r["epsilon"])
        x = [r["epsilon"] for r in rs]
        a.plot(x, [r["fidelity_auc"] for r in rs], "o-", label=f"DP, {k} draw(s)/image: label fidelity")
        a.plot(x, [r["synthetic_only_auc"] for r in rs], "s--", label=f"DP, {k} draw(s)/image: synthetic-only")
        b.plot(x, [r["domain_fid"] for r in rs], "o-", label=f"DP, {k} draw(s)/image")
    for r in reference:
        a.axhline(r["fidelity_auc"], color="k", lw=0.8, label="no DP: label fidelity")
        a.axhline(r["synthetic_only_auc"], color="k", lw=0.8, ls="--", label="no DP: synthetic-only")
        b.axhline(r["domain_fid"], color="k", lw=0.8, label="no DP")
    if rows:
        b.axhline(rows[0]["fid_real_train_vs_test"], color="grey", lw=0.8, ls=":", label="real train vs test")
    a.set(xlabel="epsilon (log)", ylabel="AUC on real test labels", xscale="log", ylim=(0.0, 1.0))
    b.set(xlabel="epsilon (log)", ylabel="domain FID vs real test (lower is better)", xscale="log", yscale="log")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--config", default=str(ROOT / "configs" / "pneumoniamnist.yaml"))
    ap.add_argument("--steps", type=int, default=500, help="optimizer steps of every row")
    ap.add_argument("--rows", nargs="+", default=["none", "eps=10", "eps=1", "eps=10,k=2"])
    ap.add_argument("--n", type=int, default=1000, help="generated images per row")
    ap.add_argument("--epochs", type=int, default=10, help="classifier epochs (real-trained and synthetic-trained)")
    ap.add_argument("--guidance", type=float, default=None, help="sampling guidance (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all rows)")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "dp_quality"))
    ap.add_argument("--fresh", action="store_true", help="retrain rows that were trained before")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    plans = [(text, parse_row(text)) for text in args.rows]

    import torch

    from common import write_results
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.evaluation.distribution import fid
    from meddiff.evaluation.features import domain_classifier, embed
    from meddiff.logs import configure_logging
    from meddiff.models.storage import load_pipeline
    from meddiff.training.config import load_config
    from meddiff.training.loop import train as train_loop

    configure_logging()
    spec = parse_spec(args.data)
    overrides = {"data": args.data, **parse_sets(args.set)}
    base = load_config(args.config, {"data": args.data}, parse_sets(args.set))
    guidance = base.guidance if args.guidance is None else args.guidance
    runs = []  # (row, its folder, its config, its recipe), all checked before any data is loaded
    for text, dp in plans:
        run_dir = Path(args.workdir) / text.replace(",", "_").replace("=", "")
        if args.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        config = load_config(args.config, {"data": args.data}, parse_sets(args.set))
        config.out, config.max_steps, config.max_minutes = str(run_dir), args.steps, None
        config.checkpoint_every = 0
        # the row's DP settings over the config's (--set dp.accountant=prv, dp.delta, ... still apply)
        config.dp = dataclasses.replace(config.dp, **{"epsilon": 0.0, "noise_multiplier": 0.0, "multiplicity": 1, **dp})
        recipe = json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k != "out"}))  # data included
        recipe_file = run_dir / "bench_recipe.json"
        if (run_dir / "pipeline").is_dir():  # trained before: only scored again, if it is this recipe
            if not recipe_file.is_file() or json.loads(recipe_file.read_text()) != recipe:
                raise SystemExit(
                    f"{run_dir} was trained with another recipe (data, config, --set or --steps); "
                    "use --fresh or another --workdir"
                )
        runs.append((text, run_dir, config, recipe))

    train = load_dataset(spec, base.resolution)
    test = load_dataset(spec.heldout(), base.resolution)
    classifier = domain_classifier(train, str(spec), epochs=args.epochs, progress=False)
    fid_floor = round(fid(embed(classifier, test.images), embed(classifier, train.images)), 3)
    print(f"{len(train)} train / {len(test)} test images; FID(real train, real test) = {fid_floor}", flush=True)

    rows = []
    for text, run_dir, config, recipe in runs:
        if not (run_dir / "pipeline").is_dir():
            t0 = time.perf_counter()
            train_loop(config, train, progress=True)
            print(f"{text}: trained in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
            (run_dir / "bench_recipe.json").write_text(json.dumps(recipe, indent=1))
        info = json.loads((run_dir / "training.json").read_text())
        report = info.get("differential_privacy") or {}
        pipe = load_pipeline(run_dir)
        torch.manual_seed(0)
        row = {
            "row": text,
            "epsilon": report.get("epsilon"),
            "delta": report.get("delta"),
            "unit": report.get("unit", "-"),
            "noise_multiplier": report.get("noise_multiplier", 0.0),
            "multiplicity": report.get("multiplicity", 1),
            "clip": report.get("clip"),
            "steps": info["steps"],
            "batch_size": config.batch_size,
            "train_minutes": round(info["train_seconds_total"] / 60, 2),
            "seconds_per_step": round(info["train_seconds_total"] / max(info["steps"], 1), 3),
            "guidance": guidance,
            **evaluate_snapshot(pipe, train, test, classifier, args.n, guidance, args.epochs),
            "fid_real_train_vs_test": fid_floor,
        }
        rows.append(row)
        print(row, flush=True)

    cols = [
        "row",
        "epsilon",
        "unit",
        "noise_multiplier",
        "multiplicity",
        "steps",
        "seconds_per_step",
        "fidelity_auc",
        "fidelity_min",
        "real_test_auc",
        "domain_fid",
        "fid_real_train_vs_test",
        "synthetic_only_auc",
    ]
    extra = {"config": base.to_dict(), "overrides": overrides, "n_generated": args.n, "sampler": "dpm++ 20 steps"}
    path = write_results("dp_quality", rows, cols, args.out, extra=extra)
    plot(rows, path.with_suffix(".png"))
    print(f"curves: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
