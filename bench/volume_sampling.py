"""Label fidelity of a trained 3D latent diffusion run against guidance scale and sampler steps, on more volumes
than the run's own report draws (issue 20: the demo's report measures 12 volumes, so its tumour AUC moves by
~0.1 between seeds).

    python bench/volume_sampling.py --run runs/demo3d/run [--guidance 1.5 3 5] [--steps 12] [--per-condition 12]
        [--seeds 0 1]

For each (guidance, steps, seed): `per-condition` volumes of every label combination of the training volumes (the
run's condition rows), scored by the real-trained 3D classifier (per-label AUC against the labels they were drawn
with; the classifier is the run's, cached in MEDDIFF_CACHE) and, on phantoms, by the exact tumour measurement
(presence AUC, side accuracy, and with a `Large` label the size AUC); and what guidance costs: slice FID (mean of
the three planes, against the training volumes, as the run's report; real held-out vs training in the JSON) and
diversity (mean pairwise 3D SSIM of the generated volumes; lower is more diverse; real held-out in the JSON).
Seconds per volume are this CPU's. Results: bench/results/volume_sampling.json and a table."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

COLUMNS = [
    "guidance", "steps", "seed", "volumes", "s_per_volume", "classifier_auc", "measured_presence_auc", "side_accuracy",
    "size_auc", "mean_volume_ml", "real_mean_volume_ml", "slice_fid", "diversity_ssim3d",
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a `meddiff train` volume run (its config.yaml and pipeline/)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.5, 3.0, 5.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[12])
    ap.add_argument("--per-condition", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import tempfile

    import torch

    from common import write_results
    from meddiff.data.spec import load_dataset
    from meddiff.evaluation.volume_classifier import volume_classifier_scores
    from meddiff.evaluation.volume_metrics import pairwise_similarity, slice_distances
    from meddiff.logs import configure_logging
    from meddiff.models.volume_pipeline import VolumePipeline
    from meddiff.training.config import load_config
    from meddiff.workflow_volume import (
        TUMOUR_LABEL,
        _load,
        _model_range,
        condition_rows,
        generate_condition_sets,
        label_subset,
        real_feature_nets,
        tumour_fidelity,
    )

    configure_logging()
    run = Path(args.run)
    config = load_config(run / "config.yaml", {})
    spec, dataset, config = _load(config, "volume-latent")
    heldout = load_dataset(spec.heldout(), config.resolution)
    pipe = VolumePipeline.from_pretrained(run / "pipeline")
    rows_in = condition_rows(dataset, list(pipe.label_names))
    real, real_heldout = _model_range(dataset.images), _model_range(heldout.images)
    names = list(pipe.label_names)
    features, _, _ = real_feature_nets(dataset, real, config.seed, 64, False)  # the run report's slice features
    per_volume = 8
    reference_fid = slice_distances(real, real_heldout, features, per_volume=per_volume, n_boot=0, seed=config.seed)
    real_diversity = pairwise_similarity(real_heldout, max_pairs=60, seed=config.seed)[0]  # as the run's report
    rows = []
    for guidance in args.guidance:
        for steps in args.steps:
            for seed in args.seeds:
                t = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    synthetic, labels, known, _ = generate_condition_sets(
                        pipe, rows_in, args.per_condition, Path(tmp) / "volumes", seed, guidance, steps
                    )
                seconds = (time.perf_counter() - t) / len(synthetic)
                if not names:
                    raise SystemExit(f"{run} is unconditional: there is no label fidelity to measure")
                scores = volume_classifier_scores(
                    real, *label_subset(dataset, names), names, synthetic, labels, known,
                    real_heldout, *label_subset(heldout, names), seed=config.seed,
                )  # fmt: skip
                row = {
                    "guidance": guidance,
                    "steps": steps,
                    "seed": seed,
                    "volumes": len(synthetic),
                    "s_per_volume": round(seconds, 2),
                    "classifier_auc": {k: None if v is None else round(v, 3) for k, v in scores.synthetic_auc.items()},
                    "classifier_real_auc": {k: None if v is None else round(v, 3) for k, v in scores.real_auc.items()},
                }
                if spec.kind == "phantom3d" and TUMOUR_LABEL in names:
                    tf = tumour_fidelity(synthetic, labels, known, heldout, names, pipe.grid.spacing)
                    row.update(
                        measured_presence_auc=tf.presence_auc,
                        side_accuracy=tf.side_accuracy,
                        size_auc=tf.size_auc,
                        mean_volume_ml=None if tf.mean_volume_ml is None else round(tf.mean_volume_ml, 1),
                        real_mean_volume_ml=None
                        if tf.real_mean_volume_ml is None
                        else round(tf.real_mean_volume_ml, 1),
                        mean_volume_ml_by_size=tf.mean_volume_ml_by_size,
                        real_mean_volume_ml_by_size=tf.real_mean_volume_ml_by_size,
                    )
                distances = slice_distances(
                    real, synthetic, features, per_volume=per_volume, n_boot=0, seed=config.seed
                )
                row["slice_fid"] = round(distances.mean_fid, 2)
                diversity = pairwise_similarity(synthetic, max_pairs=60, seed=config.seed)[0]
                row["diversity_ssim3d"] = None if diversity is None else round(diversity, 3)
                rows.append(row)
                print(row, flush=True)
    del torch
    reference = {"slice_fid_real_heldout": round(reference_fid.mean_fid, 2), "diversity_real_heldout": real_diversity}
    write_results("volume_sampling", rows, COLUMNS, args.out, extra={"run": str(run), **reference})


if __name__ == "__main__":
    main()
