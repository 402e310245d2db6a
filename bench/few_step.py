"""Few-step sampling, measured honestly: network evaluations (NFE) against quality for the noise-schedule samplers,
the flow-matching objective and a distilled student, all from the same data, recipe and training steps.

    python bench/few_step.py [--data medmnist:../shared/data/pneumoniamnist.npz]
        [--config configs/pneumoniamnist.yaml] [--train-steps 1000] [--distill-steps 1000]
        [--n 1000] [--seeds 0 1 2] [--ddpm-n 250] [--ddpm-seeds 0 1 2] [--guidance 2] [--workdir runs/few_step]
        [--quick]

Models (trained once, reused from --workdir): the teacher (the recipe as is: epsilon, Min-SNR), a flow-matching
model (`model.objective: flow`, everything else equal) trained for the same steps, and a student distilled from
the teacher (`meddiff distill`), and for the LCM-LoRA rows an adapter student (`meddiff distill --lora-rank 16`,
sampled at guidance 1, its guidance distilled in), and for the phased rows phased-consistency students
(`meddiff distill --distill.consistency phased --steps 2|4`, deterministic DDIM on their own grid), and
for the adversarial rows an LCM student that also learns against a label-conditioned patch discriminator
(`--adversarial-weight 0.5`), and for the matching rows an LCM student with distribution matching (DMD)
against a fake-score network (`--distribution-weight 1`); training minutes are reported per row, a student's
including its teacher's.

Each row draws `--n` images per seed with the condition rows of the real held-out split (cycled), and reports:
- NFE per image, counted by a hook on the U-Net (rows it saw / images), so guidance's second pass is counted;
- s/image and img/s (batch 128, this machine's default precision);
- label fidelity: the real-trained domain classifier's AUC on the generated images, mean over seeds, with a 95 %
  bootstrap interval over condition rows, and per finding (`fidelity_per_label`: which findings a row loses);
- domain FID and KID against the real held-out split (mean and range over seeds) next to the real train-vs-test
  FID at the same count; precision and recall (k-NN manifolds, k = 5);
- diversity: mean pairwise SSIM between generated images (real held-out images: the reference);
- near-copy rate: share of generated images whose nearest training image (pixel correlation) is closer than the
  99th percentile of held-out real images' nearest-training correlation.
Rows are appended to --workdir/rows.jsonl as they finish; a rerun with the same --n/--seeds/--ddpm-n/--guidance
reuses them, so an interrupted run resumes where it stopped.
DDPM-1000 costs 2000 NFE per image at guidance 2: it runs on `--ddpm-n` images and the first seed only unless
`--ddpm-seeds` says otherwise; every row keeps each finished seed in --workdir/parts, so a long row resumes seed by
seed (delete --workdir/parts and rows.jsonl after retraining a model).
Results: bench/results/few_step.json, a table, and bench/results/few_step.png (NFE vs fidelity and FID)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = f"medmnist:{ROOT.parent / 'shared' / 'data' / 'pneumoniamnist.npz'}"

# (row name, model, sampler, steps)
ROWS = [
    ("DDPM 1000", "teacher", "ddpm", 1000),
    ("DPM++ 20", "teacher", "dpm++", 20),
    ("DPM++ 10", "teacher", "dpm++", 10),
    ("DPM++ 4", "teacher", "dpm++", 4),
    ("DPM++ 2", "teacher", "dpm++", 2),
    ("DPM++ 1", "teacher", "dpm++", 1),
    ("DDIM 4", "teacher", "ddim", 4),  # deterministic, as a phased student samples (the teacher: guidance doubles it)
    ("UniPC 4", "teacher", "unipc", 4),
    ("UniPC 10", "teacher", "unipc", 10),
    ("DPM++ 3rd order 4", "teacher", "dpm++3", 4),
    ("DPM++ 3rd order 10", "teacher", "dpm++3", 10),
    ("flow Euler 4", "flow", "euler", 4),
    ("flow Euler 10", "flow", "euler", 10),
    ("flow Euler 20", "flow", "euler", 20),
    ("flow Heun 4", "flow", "heun", 4),
    ("flow Heun 10", "flow", "heun", 10),
    ("flow DPM++ 4", "flow", "dpm++", 4),
    ("distilled 1", "student", "lcm", 1),
    ("distilled 2", "student", "lcm", 2),
    ("distilled 4", "student", "lcm", 4),
    ("distilled 8", "student", "lcm", 8),  # past issue 22's 2-4 NFE: where the student meets its teacher
    # phased consistency students (--distill.consistency phased), one per step count
    ("phased 2", "phased2", "ddim", 2),
    ("phased 4", "phased4", "ddim", 4),
    # LCM with an adversarial loss on its clean estimates (--adversarial-weight): fine texture at 2-4 steps
    ("adversarial 2", "adversarial", "lcm", 2),
    ("adversarial 4", "adversarial", "lcm", 4),
    # LCM with distribution matching (--distribution-weight): the guided teacher's view of its images, via a fake score
    ("matching 2", "matching", "lcm", 2),
    ("matching 4", "matching", "lcm", 4),
    ("LCM-LoRA 2", "lora_student", "lcm", 2),  # `meddiff distill --lora-rank 16`: sampled at guidance 1 (distilled in)
    ("LCM-LoRA 4", "lora_student", "lcm", 4),
]
LORA_RANK = 16
ADVERSARIAL_WEIGHT = 0.5  # the adversarial gradient at the U-Net's output: half the consistency loss's
DISTRIBUTION_WEIGHT = 1.0  # the distribution-matching gradient at the U-Net's output: the consistency loss's


def train_models(args, spec, train_data, needed: set[str]) -> dict[str, dict]:
    """The models the selected rows need (teacher, flow model, student; the student needs its teacher) in
    --workdir, trained when missing; their training minutes and steps."""
    from meddiff.training.config import load_config
    from meddiff.training.loop import train

    work = Path(args.workdir)
    models: dict[str, dict] = {}
    variants = {
        "teacher": {},
        "flow": {"model.objective": "flow"},
        "student": {
            "method": "distill",
            "distill.teacher": str(work / "teacher"),
            "distill.steps": 4,
            "learning_rate": 1e-4,
            "lr_warmup_steps": 50,
            "lr_schedule": "cosine",
        },
        "lora_student": {
            "method": "distill",
            "distill.teacher": str(work / "teacher"),
            "distill.steps": 4,
            "distill.lora_rank": LORA_RANK,
            "learning_rate": 5e-4,  # only the adapters learn (LCM-LoRA's usual rate is above a full student's)
            "lr_warmup_steps": 50,
            "lr_schedule": "cosine",
        },
    }
    variants["adversarial"] = {**variants["student"], "distill.adversarial_weight": ADVERSARIAL_WEIGHT}
    variants["matching"] = {**variants["student"], "distill.distribution_weight": DISTRIBUTION_WEIGHT}
    for phases in (2, 4):
        variants[f"phased{phases}"] = {**variants["student"], "distill.consistency": "phased", "distill.steps": phases}
    students = {name for name, sets in variants.items() if sets.get("method") == "distill"}
    for key, value in args.student_set:  # a distillation variant: these settings on every student
        for name in students:
            variants[name][key] = value
    if needed & students:
        needed = needed | {"teacher"}
    for name, sets in variants.items():
        if name not in needed:
            continue
        out = work / name
        info_path = out / "bench_training.json"
        if info_path.is_file():  # a trained model is reused only with the settings it was trained with
            recorded = json.loads(info_path.read_text()).get("settings")  # None: before settings were recorded
            variant = name in students and bool(args.student_set)
            if (recorded is not None and recorded != sets) or (recorded is None and variant):
                raise SystemExit(f"{out} was trained with other settings than {sets}; use a new --workdir")
        if not info_path.is_file():
            steps = args.distill_steps if name in students else args.train_steps
            config = load_config(args.config, {}, {"data": args.data, "out": str(out), **sets})
            config.max_steps, config.max_minutes, config.checkpoint_every = steps, None, 0
            config.eval.fidelity = False
            print(f"training {name}: {steps} steps", flush=True)
            result = train(config, train_data, progress=not args.quiet)
            minutes = round(result.train_seconds / 60, 2)
            info_path.write_text(json.dumps({"steps": result.steps, "minutes": minutes, "settings": sets}))
        models[name] = json.loads(info_path.read_text())
    for name in sorted(students):
        if name in models:
            models[name]["minutes_with_teacher"] = round(models[name]["minutes"] + models["teacher"]["minutes"], 2)
    return models


def near_copy_threshold(train_images, test_images) -> float:
    from meddiff.evaluation.memorization import nearest

    held, _ = nearest(test_images, train_images, center=True)
    return float(_quantile(held, 0.99))


def _quantile(values, q):
    import numpy as np

    return np.quantile(values, q)


def evaluate_row(pipe, sampler, steps, n, seeds, guidance, ctx, parts: Path | None = None) -> dict:
    """One row's metrics over `seeds`. With `parts`, each seed's measurements are kept there when it finishes
    (and reused), so a long row (DDPM-1000) resumes seed by seed."""
    import numpy as np
    import torch

    from common import count_evaluations
    from meddiff.evaluation.classifier import predict
    from meddiff.evaluation.distribution import fid, kid, prdc
    from meddiff.evaluation.diversity import mean_pairwise_similarity
    from meddiff.evaluation.downstream import bootstrap_auc
    from meddiff.evaluation.features import embed
    from meddiff.evaluation.memorization import nearest
    from meddiff.sampling.generate import SamplingSettings, sample

    test = ctx["test"]
    rows_idx = torch.arange(n) % len(test)
    labels, known = test.labels[rows_idx], test.known[rows_idx]
    conditions = ctx["codec"].encode(labels, known)
    probs, fids, kids, precision, recall, ssims, copies, seconds, nfe = [], [], [], [], [], [], [], 0.0, []
    for seed in seeds:
        part = parts / f"seed{seed}.npz" if parts is not None else None
        if part is not None and part.is_file():
            kept = np.load(part)
            probs.append(kept["probs"])
            for values, key in ((fids, "fid"), (kids, "kid"), (precision, "precision"), (recall, "recall")):
                values.append(float(kept[key]))
            ssims.append(float(kept["ssim"]))
            copies.append(float(kept["copies"]))
            nfe.append(float(kept["nfe"]))
            seconds += float(kept["seconds"])
            print(f"  seed {seed}: measured before ({part})", flush=True)
            continue
        settings = SamplingSettings(steps=steps, scheduler=sampler, guidance=guidance, seed=seed, batch_size=128)
        started = seconds
        sample(pipe, conditions[:2], SamplingSettings(steps=steps, scheduler=sampler), progress=False)  # warm
        evaluated, hook = count_evaluations(pipe.unet)
        t0 = time.perf_counter()
        images = sample(pipe, conditions, settings, progress=False)
        seconds += time.perf_counter() - t0
        hook.remove()
        nfe.append(sum(evaluated) / n)
        scaled = torch.from_numpy(images).unsqueeze(1) * 2 - 1
        probs.append(predict(ctx["classifier"], scaled))
        features = embed(ctx["classifier"], scaled)
        fids.append(fid(ctx["f_test"], features))
        kids.append(kid(ctx["f_test"], features, subset_size=min(n, len(ctx["f_test"]), 500))[0])
        pr = prdc(ctx["f_test"], features, k=min(5, n - 2))
        precision.append(pr["precision"])
        recall.append(pr["recall"])
        ssims.append(mean_pairwise_similarity(images)[0])
        best, _ = nearest(images, ctx["train_images"], center=True)
        copies.append(float(np.mean(best > ctx["copy_threshold"])))
        if part is not None:
            part.parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                part, probs=probs[-1], fid=fids[-1], kid=kids[-1], precision=precision[-1], recall=recall[-1],
                ssim=ssims[-1], copies=copies[-1], nfe=nfe[-1], seconds=seconds - started,
            )  # fmt: skip
    aucs, per_label = [], {}
    for j, name in enumerate(ctx["codec"].label_names):
        keep = known[:, j].numpy().astype(bool)
        y = labels[keep, j].numpy()
        got = bootstrap_auc([p[keep, j] for p in probs], y)
        if got is not None:
            aucs.append(got)
            per_label[name] = round(float(got[0]), 4)
    fidelity = [float(np.mean([a[k] for a in aucs])) for k in range(3)] if aucs else [None] * 3
    return {
        "nfe": round(float(np.mean(nfe)), 2),
        "n_per_seed": n,
        "seeds": len(seeds),
        "s_per_image": round(seconds / (n * len(seeds)), 4),
        "img_per_s": round(n * len(seeds) / seconds, 1),
        "fidelity_auc": round(fidelity[0], 4) if fidelity[0] is not None else None,
        "fidelity_ci": [round(v, 4) for v in fidelity[1:]] if fidelity[1] is not None else None,
        "fidelity_per_label": per_label,  # which findings a row loses
        "domain_fid": round(float(np.mean(fids)), 3),
        "fid_range": [round(min(fids), 3), round(max(fids), 3)],
        "kid": round(float(np.mean(kids)), 5),
        "precision": round(float(np.mean(precision)), 3),
        "recall": round(float(np.mean(recall)), 3),
        "diversity_ssim": round(float(np.mean(ssims)), 4),
        "near_copy_rate": round(float(np.mean(copies)), 4),
    }


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["row"].rsplit(" ", 1)[0], []).append(r)
    for family, rs in families.items():
        rs = sorted(rs, key=lambda r: r["nfe"])
        x = [r["nfe"] for r in rs]
        a.plot(x, [r["fidelity_auc"] for r in rs], "o-", label=family)
        b.plot(x, [r["domain_fid"] for r in rs], "o-", label=family)
    a.set(xscale="log", xlabel="network evaluations per image (guidance counted)", ylabel="label-fidelity AUC")
    b.axhline(floor, color="grey", lw=0.8, ls=":", label="real train vs test")
    b.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel="domain FID (lower is better)")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--config", default=str(ROOT / "configs" / "pneumoniamnist.yaml"))
    ap.add_argument("--train-steps", type=int, default=1000, help="teacher and flow model training steps")
    ap.add_argument("--distill-steps", type=int, default=1000)
    ap.add_argument("--n", type=int, default=1000, help="images per row and seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ddpm-n", type=int, default=250, help="images per seed for DDPM-1000")
    ap.add_argument(
        "--ddpm-seeds", type=int, nargs="+", default=None, help="seeds for DDPM-1000 (default: the first of --seeds)"
    )
    ap.add_argument(
        "--student-set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config settings for the distilled students, e.g. distill.solver_steps=20 (use a new --workdir with "
        "the teacher linked in: a trained student is reused)",
    )
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the real-trained domain classifier")
    ap.add_argument("--rows", nargs="+", default=None, help="only rows whose name starts with one of these")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "few_step"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny models, few images, few rows")
    args = ap.parse_args()
    bad = [item for item in args.student_set if "=" not in item]
    if bad:
        ap.error(f"--student-set takes KEY=VALUE, got {bad[0]!r}")
    import yaml

    args.student_set = [(k, yaml.safe_load(v)) for k, v in (item.split("=", 1) for item in args.student_set)]
    if args.quick:
        args.train_steps, args.distill_steps, args.n, args.seeds, args.ddpm_n, args.epochs = 3, 2, 8, [0], 8, 1

    import torch

    from common import write_results
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.evaluation.distribution import fid
    from meddiff.evaluation.features import domain_classifier, embed
    from meddiff.logs import configure_logging
    from meddiff.models.storage import load_pipeline
    from meddiff.training.config import load_config

    configure_logging()
    spec = parse_spec(args.data)
    resolution = load_config(args.config, {}, {"data": args.data}).resolution
    train_data = load_dataset(spec, resolution)
    test = load_dataset(spec.heldout(), resolution)
    selected = [r for r in ROWS if not args.rows or any(r[0].startswith(p) for p in args.rows)]
    if args.quick:
        selected = [r for r in selected if r[0] in ("DDPM 1000", "DPM++ 4", "flow Heun 4", "distilled 2", "phased 2")]
    if not selected:
        raise SystemExit(f"no row starts with any of {args.rows}; rows: {', '.join(r[0] for r in ROWS)}")
    models = train_models(args, spec, train_data, {r[1] for r in selected})
    classifier = domain_classifier(train_data, str(spec), epochs=args.epochs, progress=False)
    f_test = embed(classifier, test.images)
    floor_rows = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(0))[: args.n]
    floor = round(fid(f_test, embed(classifier, train_data.images[floor_rows])), 3)
    train_images = (train_data.images[:].float().numpy()[:, 0] + 1) / 2  # a memory-mapped store reads here
    test_images = (test.images[:].float().numpy()[:, 0] + 1) / 2
    ctx = {
        "test": test,
        "classifier": classifier,
        "f_test": f_test,
        "codec": LabelCodec(list(train_data.label_names)),
        "train_images": train_images,
        "copy_threshold": near_copy_threshold(train_images, test_images),
    }
    print(f"FID of {len(floor_rows)} real training images vs held-out: {floor}", flush=True)
    pipes = {name: load_pipeline(Path(args.workdir) / name) for name in {r[1] for r in selected}}
    # rows already measured with these settings (an interrupted run resumes); the acceptance rows run first
    done_path = Path(args.workdir) / "rows.jsonl"
    settings = {"n": args.n, "seeds": args.seeds, "ddpm_n": args.ddpm_n, "guidance": args.guidance, "quick": args.quick}
    if args.ddpm_seeds is not None:
        settings["ddpm_seeds"] = args.ddpm_seeds
    if args.student_set:
        settings["student_set"] = dict(args.student_set)
    done = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("settings") == settings:
                done[entry["row"]["row"]] = entry["row"]

    def parts_dir(name: str, n: int) -> Path:  # per-seed results of a row, kept until the row is complete
        key = f"{name.replace(' ', '_')}-n{n}-g{args.guidance:g}" + ("-quick" if args.quick else "")
        return Path(args.workdir) / "parts" / key

    first = ("DDPM 1000", "distilled", "phased", "DPM++ 20", "flow Euler 4", "flow Heun 4")
    order = sorted(selected, key=lambda r: next((i for i, p in enumerate(first) if r[0].startswith(p)), len(first)))
    measured: dict[str, dict] = {}
    for name, model, sampler, steps in order:
        if name in done:
            measured[name] = done[name]
            print(f"{name}: measured before (resumed from {done_path})", flush=True)
            continue
        ddpm = steps >= 500
        steps_run = 3 if (args.quick and ddpm) else steps
        n, seeds = (args.ddpm_n, args.ddpm_seeds or args.seeds[:1]) if ddpm else (args.n, args.seeds)
        info = models[model]
        row = {
            "row": name,
            "model": model,
            "sampler": sampler,
            "steps": steps_run,
            "train_steps": info["steps"],
            "train_minutes": info.get("minutes_with_teacher", info["minutes"]),
            # an LCM-LoRA student has the guidance distilled in and no guidance input: it samples at 1
            **evaluate_row(
                pipes[model],
                sampler,
                steps_run,
                n,
                seeds,
                1.0 if model == "lora_student" else args.guidance,
                ctx,
                parts_dir(name, n),
            ),  # fmt: skip
            "fid_real_train_vs_test": floor,
        }
        measured[name] = row
        with done_path.open("a") as f:
            f.write(json.dumps({"settings": settings, "row": row}) + "\n")
        print(json.dumps(row), flush=True)
    rows = [measured[r[0]] for r in selected]
    cols = [
        "row",
        "nfe",
        "s_per_image",
        "img_per_s",
        "fidelity_auc",
        "fidelity_ci",
        "domain_fid",
        "fid_range",
        "kid",
        "precision",
        "recall",
        "diversity_ssim",
        "near_copy_rate",
        "train_minutes",
    ]
    path = write_results("few_step", rows, cols, args.out, extra={"student_set": dict(args.student_set)})
    plot(rows, floor, path.with_suffix(".png"))
    print(f"curve: {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
