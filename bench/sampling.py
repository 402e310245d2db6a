"""Sampling speed (s/image) per scheduler and step count, optionally with label fidelity.

    python bench/sampling.py [--model RUN_DIR] [--data SPEC] [--n 16]

Without --model an untrained default-config model is timed (speed only). With --model and --data, the label
fidelity AUC of each sampler setting is measured as well (same classifier, same condition rows)."""

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
    ap.add_argument("--n", type=int, default=16, help="images per setting (DDPM-1000 uses n/4, at least 4)")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="a few steps per setting (smoke test of the command)")
    args = ap.parse_args()

    import torch

    from common import write_results

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
        save_pipeline(Path(tmp) / "pipeline", build_unet(cfg, 32, len(PHANTOM_LABELS)), build_noise_scheduler(cfg),
                      list(PHANTOM_LABELS))
        pipe = load_pipeline(tmp)
    fidelity = None
    if args.model and args.data:
        from meddiff.data.spec import load_dataset, parse_spec
        from meddiff.evaluation.classifier import per_label_auc, predict, train_classifier

        spec = parse_spec(args.data)
        res = pipe.unet.config.sample_size
        train, heldout = load_dataset(spec, res), load_dataset(spec.heldout(), res)
        clf = train_classifier(train, epochs=8)
        fidelity = (clf, heldout)
    codec = LabelCodec(pipe.label_names)
    rows = []
    for name, steps in SETTINGS:
        steps = min(steps, 3) if args.quick else steps
        n = max(4, args.n // 4) if steps >= 500 else args.n
        if fidelity:
            heldout = fidelity[1]
            idx = torch.arange(n) % len(heldout)
            labels, known = heldout.labels[idx], heldout.known[idx]
        else:
            labels = torch.zeros(n, len(codec.label_names))
            labels[torch.arange(n), torch.arange(n) % max(1, len(codec.label_names))] = 1
            known = torch.ones_like(labels, dtype=torch.bool)
        settings = SamplingSettings(steps=steps, scheduler=name, guidance=args.guidance, batch_size=64)
        sample(pipe, codec.encode(labels[:2], known[:2]), SamplingSettings(steps=2, scheduler=name), progress=False)
        t0 = time.perf_counter()
        images = sample(pipe, codec.encode(labels, known), settings, progress=False)
        dt = time.perf_counter() - t0
        row = {"scheduler": name, "steps": steps, "n": n, "s_per_image": round(dt / n, 4)}
        if fidelity:
            probs = predict(fidelity[0], torch.from_numpy(images).unsqueeze(1) * 2 - 1)
            aucs = per_label_auc(probs, labels.numpy(), known.numpy(), codec.label_names)
            vals = [v for v in aucs.values() if v is not None]
            row["mean_fidelity_auc"] = round(sum(vals) / len(vals), 3) if vals else None
        rows.append(row)
        print(row, flush=True)
    cols = ["scheduler", "steps", "n", "s_per_image"] + (["mean_fidelity_auc"] if fidelity else [])
    write_results("sampling", rows, cols, args.out)


if __name__ == "__main__":
    main()
