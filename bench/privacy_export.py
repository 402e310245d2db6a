"""The export gate on a generated set with injected known copies (issue 21).

    python bench/privacy_export.py [--model runs/few_step/teacher] [--n 2000] [--inject 0.01]
        [--descriptor-steps 600] [--recalibrate] [--workdir runs/privacy_export]

1. `meddiff privacy calibrate` on the model's training data (skipped when RUN/privacy/calibration.json exists,
   unless --recalibrate): the copy descriptor (with the model's own near-copies as partners), the threshold on
   one half of the held-out split, recall per copy type on the other; its measured numbers are reported here too;
2. `meddiff generate --privacy-gate` of `--n` images (the training label mix, 20 DPM++ steps), where the first draw
   of `--inject` of them (at random) is replaced by a known copy of a training image (exact, shift, rotation,
   gamma, noise, crop in turn): the gate must redraw them;
3. reported: the share of injected copies removed (redrawn or rejected) with its 95 % interval, how many genuine
   samples were redrawn (the false-flag rate in use), rejected images, and the exported images read back from
   their PNG files and checked again (none may be above the threshold).
Results: bench/results/privacy_export.json and a table."""

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
    ap.add_argument("--model", default=str(ROOT / "runs" / "few_step" / "teacher"))
    ap.add_argument("--data", default=None, help="training data spec (default: the run's config.yaml)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--inject", type=float, default=0.01)
    ap.add_argument("--descriptor-steps", type=int, default=600)
    ap.add_argument("--recalibrate", action="store_true")
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "privacy_export"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    import yaml
    from PIL import Image

    import meddiff.sampling.synthesize as synthesize
    from common import write_results
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.privacy_gate import (
        COPY_TYPES,
        augmented_copies,
        calibrate_model,
        load_gate,
        wilson_interval,
    )
    from meddiff.evaluation.suite import to01
    from meddiff.logs import configure_logging
    from meddiff.models.storage import load_pipeline, run_directory
    from meddiff.sampling.generate import SamplingSettings
    from meddiff.sampling.plan import GenerationPlan

    configure_logging()
    run = run_directory(args.model)
    data = args.data or yaml.safe_load((run / "config.yaml").read_text())["data"]
    pipe = load_pipeline(run)
    t0 = time.perf_counter()
    note_path = run / "privacy" / "calibration.json"
    if args.recalibrate or not note_path.is_file():
        calibrate_model(run, data, pipe.image_size, descriptor_steps=args.descriptor_steps, progress=True)
    note = json.loads(note_path.read_text())
    calibrate_s = time.perf_counter() - t0
    gate = load_gate(run)

    dataset = load_dataset(data, pipe.image_size)
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.choice(len(dataset), args.n, replace=len(dataset) < args.n))
    plan = GenerationPlan(dataset.labels[rows], dataset.known[rows], [None] * args.n, "the training label mix")
    n_inject = max(1, round(args.n * args.inject))
    injected = sorted(rng.choice(args.n, n_inject, replace=False).tolist())
    sources = to01(dataset.images[torch.from_numpy(rng.choice(len(dataset), n_inject, replace=False))])
    copies, kinds = {}, {}
    for k, i in enumerate(injected):
        kind = COPY_TYPES[k % len(COPY_TYPES)]
        copies[i], kinds[i] = augmented_copies(sources[k : k + 1], kind, seed=k)[0], kind
    settings = SamplingSettings(steps=20, guidance=2.0, seed=0, batch_size=64)
    real_sample = synthesize.sample

    def sample_with_copies(pipe, cond, s, indices=None, **kw):  # the first draw of an injected image is a copy
        images = real_sample(pipe, cond, s, indices=indices, **kw)
        if s.seed == settings.seed and indices is not None:
            for row, i in enumerate(indices):
                if i in copies:
                    images[row] = copies[i]
        return images

    synthesize.sample = sample_with_copies
    out = Path(args.workdir) / f"gated-{args.n}-inject{args.inject:g}"  # a folder per setting: never resumed across
    t = time.perf_counter()
    result = synthesize.generate_dataset(pipe, run, plan, settings, out, gate=gate)
    generate_s = time.perf_counter() - t
    synthesize.sample = real_sample

    log = {}
    for path in out.glob("privacy_gate*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            log[int(entry["i"])] = entry
    removed = [i for i in injected if log[i]["retries"] > 0 or log[i]["rejected"]]
    genuine_redrawn = sum(1 for i, e in log.items() if i not in copies and e["retries"] > 0)
    exported = sorted((out / "images").glob("*.png"))
    read_back = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255 for p in exported])
    flagged_after, fused_after = gate.check(read_back)
    lo, hi = wilson_interval(len(removed), n_inject)
    row = {
        "model": str(run),
        "n": args.n,
        "injected": n_inject,
        "removed": len(removed),
        "removed_share": round(len(removed) / n_inject, 4),
        "removed_ci": [round(lo, 4), round(hi, 4)],
        "missed_by_type": {
            kinds[i]: sum(1 for j in injected if kinds[j] == kinds[i] and j not in removed) for i in injected
        },  # fmt: skip
        "genuine_redrawn": genuine_redrawn,
        "genuine_redrawn_rate": round(genuine_redrawn / (args.n - n_inject), 4),
        "rejected": result.rejected,
        "exported": len(exported),
        "exported_above_threshold": int(flagged_after.sum()),
        "max_exported_score": round(float(fused_after.max()), 3),
        "threshold": round(gate.calibration.threshold, 3),
        "calibration": {
            "alpha": note["calibration"]["alpha"],
            "detectors": note["calibration"]["detectors"],
            "heldout_duplicates": note.get("heldout_duplicates"),
            "false_flag_rate": note["measured"]["false_flag_rate"],
            "false_flag_interval": note["measured"]["false_flag_interval"],
            "n_test_negatives": note["measured"]["n_test_negatives"],
            "recall": note["measured"]["recall"],
            "recall_interval": note["measured"]["recall_interval"],
            "seconds": note.get("seconds"),
        },
        "calibrate_seconds": round(calibrate_s, 1),
        "generate_seconds": round(generate_s, 1),
    }
    print(json.dumps(row, indent=1), flush=True)
    cols = ["n", "injected", "removed_share", "genuine_redrawn_rate", "rejected", "exported_above_threshold"]
    write_results("privacy_export", [row], cols, args.out)


if __name__ == "__main__":
    main()
