"""What differential privacy costs in image quality: label fidelity, domain FID and a classifier trained only on
generated images, against epsilon, with the same recipe, data, seed and step count for every row.

    python bench/dp_quality.py [--data medmnist:../shared/data/pneumoniamnist.npz]
        [--config configs/pneumoniamnist.yaml] [--steps 500] [--rows none eps=10 eps=10,k=4 ...]
        [--n 1000] [--set key=value ...] [--workdir runs/dp_quality] [--public-fraction 0.5]

Each row trains one model from scratch with meddiff's loop (`--dp.epsilon`, `--dp.multiplicity`), then is scored
exactly as bench/time_to_quality.py scores a mark (the real-trained domain classifier, cached; DPM-Solver++ 20
steps; conditions drawn from the real test labels):
- `none`: no DP (the same loop and batch size; the reference);
- `eps=E[,k=K][,clip=C]`: DP-SGD calibrated to spend E by the last step (delta = min(1e-5, 0.1 / units)), K noise
  draws per image averaged before clipping (noise multiplicity), per-sample clip C;
- `sigma=S[,k=K]`: a fixed noise multiplier instead (epsilon reported).
Public pretraining, then DP fine-tuning (`--public-fraction F`): the training split is divided at random (seed 0; by
patient where the data has patient ids, so that no patient is in both) into a public part (F) and a private part;
- `public`: no DP, trained on the public part only (the reference for what the public data alone gives);
- every other row trains on the private part, and `...,init=public` starts it from the `public` row's model
  (`--init-from`; the `public` row is trained first, added when not listed): DP from scratch on the private part
  against DP fine-tuning of a public model, with epsilon spent on the private part only.
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


@dataclasses.dataclass
class Row:
    text: str  # as given in --rows
    dp: dict  # DPConfig overrides ({} without DP)
    public: bool = False  # the `public` row: no DP, on the public part
    init: bool = False  # starts from the `public` row's model


def parse_row(text: str) -> Row:
    """'none' | 'public' | 'eps=10,k=4,clip=1[,init=public]' | 'sigma=1.2' -> that row, checked at once (a bad row
    must not stop the bench hours later)."""
    if text in ("none", "public"):
        return Row(text, {}, public=text == "public")
    keys = {"eps": "epsilon", "sigma": "noise_multiplier", "k": "multiplicity", "clip": "clip"}
    out: dict = {}
    init = False
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if key == "init" and value == "public":
            init = True
            continue
        if not sep or key not in keys:
            raise SystemExit(f"--rows: {part!r} in {text!r} is not eps=E, sigma=S, k=K, clip=C or init=public")
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
    return Row(text, out, init=init)


def plan_rows(texts: list[str], public_fraction: float) -> list[Row]:
    """The rows in training order: the `public` row first where a row starts from it (added when not listed)."""
    if not 0 <= public_fraction < 1:
        raise SystemExit(f"--public-fraction must be from 0 to below 1, got {public_fraction}")
    rows = [parse_row(t) for t in texts]
    if any(r.init for r in rows) and not any(r.public for r in rows):
        rows.insert(0, parse_row("public"))
    if public_fraction == 0 and any(r.public for r in rows):
        raise SystemExit("--rows: `public` and init=public need --public-fraction F (the public part of the data)")
    return sorted(rows, key=lambda r: not r.public)  # stable: the public row first, the others as given


def split_public(train, fraction: float, seed: int = 0):
    """(public indices, private indices, how): a random `fraction` of the patients (of the images where the data
    has no patient ids) is public; the privacy gate's split (`split_parts`)."""
    import numpy as np

    from meddiff.evaluation.privacy_gate import split_parts

    patients = list(train.patients)
    if len(set(patients)) == 1:  # split_parts would split one patient's images between the parts
        raise SystemExit(f"--public-fraction {fraction} leaves one part empty (one patient)")
    public, how = split_parts(patients, len(train), seed, fraction)
    if public.all() or not public.any():
        raise SystemExit(f"--public-fraction {fraction} leaves one part empty ({len(train)} images)")
    if patients:
        how = (
            f"by patient ({len({patients[i] for i in np.flatnonzero(public)})} of {len(set(patients))} patients public)"
        )
    return np.flatnonzero(public), np.flatnonzero(~public), how


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    private = [r for r in rows if r["epsilon"] is not None]
    reference = [r for r in rows if r["epsilon"] is None]
    for k, init in sorted({(r["multiplicity"], bool(r["init_from"])) for r in private}):
        rs = sorted(
            (r for r in private if (r["multiplicity"], bool(r["init_from"])) == (k, init)), key=lambda r: r["epsilon"]
        )
        x = [r["epsilon"] for r in rs]
        name = f"DP{' from the public model' if init else ''}, {k} draw(s)/image"
        a.plot(x, [r["fidelity_auc"] for r in rs], "o-", label=f"{name}: label fidelity")
        a.plot(x, [r["synthetic_only_auc"] for r in rs], "s--", label=f"{name}: synthetic-only")
        b.plot(x, [r["domain_fid"] for r in rs], "o-", label=name)
    for r, color in zip(reference, ("k", "tab:green", "tab:purple", "tab:brown")):
        name = (
            "no DP"
            if r["row"] == "none" and r["trained_on"] == "all"
            else f"no DP ({r['row']}, {r['trained_on']} data)"
        )
        a.axhline(r["fidelity_auc"], color=color, lw=0.8, label=f"{name}: label fidelity")
        a.axhline(r["synthetic_only_auc"], color=color, lw=0.8, ls="--", label=f"{name}: synthetic-only")
        b.axhline(r["domain_fid"], color=color, lw=0.8, label=name)
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
    ap.add_argument(
        "--public-fraction", type=float, default=0.0, help="public part of the training data (rows public, init=public)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    plans = plan_rows(args.rows, args.public_fraction)

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

    def folder(plan: Row) -> Path:  # rows on the private part have their own folders (not a full-data row's)
        prefix = "private_" if args.public_fraction and not plan.public else ""
        return Path(args.workdir) / (prefix + plan.text.replace(",", "_").replace("=", ""))

    public_recipe = None  # an init=public row is tied to the public row's whole recipe, not only its folder
    for plan in plans:
        run_dir = folder(plan)
        if args.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        config = load_config(args.config, {"data": args.data}, parse_sets(args.set))
        config.out, config.max_steps, config.max_minutes = str(run_dir), args.steps, None
        config.checkpoint_every = 0
        config.init_from = str(folder(parse_row("public"))) if plan.init else None
        # the row's DP settings over the config's (--set dp.accountant=prv, dp.delta, ... still apply)
        config.dp = dataclasses.replace(
            config.dp, **{"epsilon": 0.0, "noise_multiplier": 0.0, "multiplicity": 1, **plan.dp}
        )
        part = "all" if args.public_fraction == 0 else "public" if plan.public else "private"
        recipe = {k: v for k, v in config.to_dict().items() if k != "out"}  # data and init_from included
        if args.public_fraction:  # (full-data rows keep the recipe they had before this option existed)
            recipe["bench_data"] = {"part": part, "public_fraction": args.public_fraction}
            if plan.init:
                recipe["bench_data"]["public_recipe"] = public_recipe
        recipe = json.loads(json.dumps(recipe))
        if plan.public:
            public_recipe = recipe
        recipe_file = run_dir / "bench_recipe.json"
        if (run_dir / "pipeline").is_dir():  # trained before: only scored again, if it is this recipe
            if not recipe_file.is_file() or json.loads(recipe_file.read_text()) != recipe:
                raise SystemExit(
                    f"{run_dir} was trained with another recipe (data, config, --set or --steps); "
                    "use --fresh or another --workdir"
                )
        runs.append((plan, part, run_dir, config, recipe))

    train = load_dataset(spec, base.resolution)
    test = load_dataset(spec.heldout(), base.resolution)
    classifier = domain_classifier(train, str(spec), epochs=args.epochs, progress=False)
    fid_floor = round(fid(embed(classifier, test.images), embed(classifier, train.images)), 3)
    print(f"{len(train)} train / {len(test)} test images; FID(real train, real test) = {fid_floor}", flush=True)
    parts, split = {"all": train}, None
    if args.public_fraction:
        public, private, split = split_public(train, args.public_fraction)
        parts |= {"public": train.subset(public), "private": train.subset(private)}
        print(f"public part {len(public)} images, private part {len(private)}, split {split}", flush=True)

    rows = []
    for plan, part, run_dir, config, recipe in runs:
        text = plan.text
        if not (run_dir / "pipeline").is_dir():
            t0 = time.perf_counter()
            train_loop(config, parts[part], progress=True)
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
            "trained_on": part,
            "n_train": len(parts[part]),
            "init_from": "public" if plan.init else None,
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
        "trained_on",
        "init_from",
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
    extra |= {"public_fraction": args.public_fraction, "public_split": split}
    path = write_results("dp_quality", rows, cols, args.out, extra=extra)
    plot(rows, path.with_suffix(".png"))
    print(f"curves: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
