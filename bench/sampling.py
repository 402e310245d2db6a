"""Sampling speed (s/image) per scheduler and step count, optionally with label fidelity.

    python bench/sampling.py [--model RUN_DIR] [--data SPEC] [--n 16]

Without --model an untrained default-config model is timed (speed only). With --model and --data, each sampler
setting is also scored with the same real-trained (domain) classifier as `meddiff evaluate` on the same condition
rows (drawn from the real held-out labels): label-fidelity AUC, and domain FID and KID against the real held-out
split. FID is biased by sample count, so every setting uses the same count (`--ddpm-n` defaults to `--n` when
scoring) and the FID of that many real training images is given as the floor. `nfe` counts the U-Net's evaluations
per image (a guidance scale other than 1 doubles them). The few-step comparison (flow matching, distillation,
1-4 NFE, several seeds with intervals) is bench/few_step.py."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SETTINGS = [("ddpm", 1000), ("ddim", 50), ("pndm", 75), ("dpm++", 25), ("dpm++", 20), ("dpm++", 10)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None, help="real data spec for label fidelity (needs --model)")
    ap.add_argument("--n", type=int, default=16, help="images per setting")
    ap.add_argument(
        "--ddpm-n", type=int, default=None, help="images for DDPM-1000 (default: n when scoring, else n/4, at least 4)"
    )
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="a few steps per setting (smoke test of the command)")
    args = ap.parse_args()

    import torch

    from common import count_evaluations, write_results
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.models.factory import ModelConfig, build_noise_scheduler, build_unet
    from meddiff.models.storage import load_pipeline, save_pipeline
    from meddiff.sampling.generate import SamplingSettings, sample

    if args.model:
        pipe = load_pipeline(args.model)
    else:
        from meddiff.data.phantom_dataset import PHANTOM_LABELS

        tmp = tempfile.mkdtemp()
        cfg = ModelConfig()
        save_pipeline(
            Path(tmp) / "pipeline",
            build_unet(cfg, 32, len(PHANTOM_LABELS)),
            build_noise_scheduler(cfg),
            list(PHANTOM_LABELS),
        )
        pipe = load_pipeline(tmp)
    fidelity = None
    if args.model and args.data:
        from meddiff.data.spec import load_dataset, parse_spec
        from meddiff.evaluation.classifier import per_label_auc, predict
        from meddiff.evaluation.distribution import fid, kid
        from meddiff.evaluation.features import domain_classifier, embed

        spec = parse_spec(args.data)
        res = pipe.unet.config.sample_size
        train, heldout = load_dataset(spec, res), load_dataset(spec.heldout(), res)
        clf = domain_classifier(train, str(spec), epochs=10, progress=False)
        f_test = embed(clf, heldout.images)
        floor_rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.n]
        floor = fid(f_test, embed(clf, train.images[floor_rows]))
        print(f"FID of {len(floor_rows)} real training images vs held-out (the floor at this count): {floor:.3f}")
        fidelity = (clf, heldout)
    codec = LabelCodec(pipe.label_names)
    rows = []
    for name, steps in SETTINGS:
        steps = min(steps, 3) if args.quick else steps
        n = args.n
        if steps >= 500:
            n = args.ddpm_n or (args.n if fidelity else max(4, args.n // 4))
        if fidelity:
            heldout = fidelity[1]
            idx = (
                torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:n]
                if n <= len(heldout)
                else torch.arange(n) % len(heldout)
            )
            labels, known = heldout.labels[idx], heldout.known[idx]
        else:
            labels = torch.zeros(n, len(codec.label_names))
            labels[torch.arange(n), torch.arange(n) % max(1, len(codec.label_names))] = 1
            known = torch.ones_like(labels, dtype=torch.bool)
        settings = SamplingSettings(steps=steps, scheduler=name, guidance=args.guidance, batch_size=64)
        sample(pipe, codec.encode(labels[:2], known[:2]), SamplingSettings(steps=2, scheduler=name), progress=False)
        evaluated, hook = count_evaluations(pipe.unet)
        t0 = time.perf_counter()
        images = sample(pipe, codec.encode(labels, known), settings, progress=False)
        dt = time.perf_counter() - t0
        hook.remove()
        nfe = round(sum(evaluated) / n, 2)  # guidance's unconditional pass counted
        row = {"scheduler": name, "steps": steps, "nfe": nfe, "n": n, "s_per_image": round(dt / n, 4)}
        if fidelity:
            scaled = torch.from_numpy(images).unsqueeze(1) * 2 - 1
            probs = predict(fidelity[0], scaled)
            f_syn = embed(fidelity[0], scaled)
            row["domain_fid"] = round(fid(f_test, f_syn), 3)
            row["fid_floor_same_n"] = round(floor, 3) if n == args.n else None
            row["kid"] = round(kid(f_test, f_syn, subset_size=min(n, len(f_test), 500))[0], 5)
            aucs = per_label_auc(probs, labels.numpy(), known.numpy(), codec.label_names)
            vals = [v for v in aucs.values() if v is not None]
            row["mean_fidelity_auc"] = round(sum(vals) / len(vals), 3) if vals else None
        rows.append(row)
        print(row, flush=True)
    cols = ["scheduler", "steps", "nfe", "n", "s_per_image"] + (
        ["mean_fidelity_auc", "domain_fid", "fid_floor_same_n", "kid"] if fidelity else []
    )
    write_results("sampling", rows, cols, args.out)


if __name__ == "__main__":
    main()
