"""The `meddiff` command line. Every user-facing problem ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from meddiff.errors import MeddiffError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


CONFIG_COMMANDS = (
    "train",
    "finetune",
    "train-autoencoder",
    "distill",
    "generate",
    "fidelity",
    "serve",
)  # flags from typed configs
CONFIG_DESCRIPTION = (
    "Options come from meddiff.training.config.TrainConfig: every recipe key is a flag "
    "(nested keys as --section.key). Defaults < --config YAML < flags."
)
# Spellings kept from earlier versions (users' scripts), beside the generated --section.key flags.
ALIASES = {
    "train": {
        "model.prediction_type": ["--prediction"],
        "model.objective": ["--objective"],
        "latent.autoencoder": ["--autoencoder"],
        "text.encoder": ["--text-encoder"],
        "text.train_encoder": ["--train-text-encoder"],
        "text.shuffle_findings": ["--shuffle-findings"],
    },
    "finetune": {"cond_dropout": ["--caption-dropout"], "finetune.validation_prompts": ["--validation-prompt"]},
    "train-autoencoder": {},
    "distill": {"distill.teacher": ["--model"]},
}
SWITCHES: dict[str, dict[str, tuple[str, object, str]]] = {  # flag -> (key, value it sets, help)
    "train": {"--no-eval": ("eval.fidelity", False, "skip the label-fidelity evaluation")},
    "finetune": {"--use-8bit-adam": ("optimizer", "adamw8bit", "bitsandbytes AdamW8bit (CUDA)")},
    "train-autoencoder": {},
    "distill": {"--no-eval": ("eval.fidelity", False, "skip the label-fidelity evaluation")},
}
FINETUNE_DEFAULTS = {"resolution": 512, "batch_size": 4, "checkpoint_every": 500}  # learning rate: by method
# measured on PneumoniaMNIST (docs/benchmarks.md, few-step sampling): 1000 steps with a cosine-decayed learning rate
# give a 4-NFE student at 0.992 label fidelity; 2000 steps at a constant rate give 0.979
DISTILL_DEFAULTS = {"learning_rate": 1e-4, "max_steps": 1000, "lr_warmup_steps": 50, "lr_schedule": "cosine"}
AUTOENCODER_LEARNING_RATE = 2e-4  # autoencoders want a smaller step than the diffusion default
PHANTOM_N, PHANTOM3D_N = 2000, 48  # `meddiff data phantom` default counts: 2D images, 3D volumes


def _add_config_flags(command: str, parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig key as a flag (meddiff.options); the command's own section also without its prefix."""
    from meddiff.options import add_arguments
    from meddiff.training.config import TrainConfig

    home = {"finetune": "finetune", "train-autoencoder": "autoencoder", "distill": "distill"}.get(command, "")
    shown = {
        "finetune": {
            **{k: str(v) for k, v in FINETUNE_DEFAULTS.items()},
            "learning_rate": "by method (lora 1e-4, unet 1e-5, ...)",
        },
        "train-autoencoder": {"learning_rate": str(AUTOENCODER_LEARNING_RATE)},
        "distill": {k: str(v) for k, v in DISTILL_DEFAULTS.items()},
    }.get(command, {})
    add_arguments(
        parser,
        TrainConfig,
        home=home,
        skip=("method",) if home else (),
        aliases=ALIASES[command],
        switches=SWITCHES[command],
        defaults=shown,
    )


def _add_sampling_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The SamplingSettings fields as flags (all of them, or `only` these)."""
    import dataclasses

    from meddiff.options import add_arguments
    from meddiff.sampling.generate import SamplingSettings

    names = [f.name for f in dataclasses.fields(SamplingSettings)]
    add_arguments(
        parser,
        SamplingSettings,
        skip=[n for n in names if only is not None and n not in only],
        title="sampling options (meddiff.sampling.generate.SamplingSettings)",
    )


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    from meddiff.options import add_arguments
    from meddiff.serve.service import ServeLimits

    add_arguments(parser, ServeLimits, title="request limits (meddiff.serve.service.ServeLimits)")


def _sampling_settings(args):
    """The sampling flags given; without --guidance, the model's own scale (its run's config.yaml: what it was
    trained and reported with), else 2."""
    from meddiff.models.storage import model_guidance
    from meddiff.options import given
    from meddiff.sampling.generate import SamplingSettings

    settings = given(args)
    if "guidance" not in settings and getattr(args, "model", None):
        settings["guidance"] = model_guidance(args.model)
    return SamplingSettings(**settings)


def build_parser(config_flags: tuple[str, ...] = CONFIG_COMMANDS) -> argparse.ArgumentParser:
    """The whole command line. `config_flags`: the commands whose config flags are built (building them imports
    torch; `main` builds only the one asked for, so `meddiff env --check` works with a broken torch)."""
    p = argparse.ArgumentParser(prog="meddiff", description="Medical image synthesis with diffusion models.")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="count",
        default=0,
        help="more messages (-vv: third-party libraries' too)",
    )
    loud.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const=-1, help="only warnings and errors"
    )
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    ph = data_sub.add_parser(
        "phantom",
        help="write chest radiograph phantoms, or with --3d brain phantom volumes (synthetic test data, not medical "
        "data)",
    )
    ph.add_argument("--out", required=True)
    ph.add_argument(
        "--3d",
        dest="volumes",
        action="store_true",
        help="3D brain phantoms: NIfTI volumes with tumour masks and train.csv/valid.csv (spec phantom3d:OUT)",
    )
    ph.add_argument("--n", type=_positive_int, default=None, help=f"default {PHANTOM_N} (--3d: {PHANTOM3D_N})")
    ph.add_argument("--size", type=int, default=64, help="pixels, 32-256 (--3d: voxels along each axis, 16-256)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--valid-fraction", type=float, default=0.2)
    ph.add_argument("--bit-depth", type=int, choices=(8, 16), default=None, help="2D phantoms: 8 (default) or 16")
    ph.add_argument(
        "--studies",
        type=_positive_int,
        default=1,
        help="2D: studies per synthetic patient (same anatomy; privacy tests)",
    )
    info = data_sub.add_parser(
        "inspect",
        help="counts per label/value, view, sex, age, sizes, and every problem (volume specs: cases, grid, "
        "channels, labels, intensities, store)",
    )
    info.add_argument("spec")
    info.add_argument("--json", help="also write the full report (every problem listed) as JSON")
    info.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help="volume specs: grid edge in voxels (default: what `meddiff train` uses, --volume.size 64 or "
        "phantom3d's size=)",
    )
    prep = data_sub.add_parser(
        "prepare",
        help="decode a dataset once into a memory-mapped store (train from store:DIR; volume specs: the cache store "
        "that training on the spec maps)",
    )
    prep.add_argument("spec")
    prep.add_argument(
        "--out",
        default=None,
        help="the store folder (written atomically; resumable when killed); required for image datasets; volume "
        "specs: optional folder for summary.json, manifest.csv and skipped.csv",
    )
    prep.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help="pixels (default 32); volume specs: grid edge in voxels (default: what `meddiff train` uses)",
    )
    prep.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: the CPU count for 500+ images, else 0 = this process)",
    )
    dl = data_sub.add_parser("download", help="fetch public data where the network allows")
    dl.add_argument("source", choices=("medmnist",))
    dl.add_argument("name", help="e.g. pneumoniamnist, chestmnist")
    dl.add_argument("--size", type=int, default=28, choices=(28, 64, 128, 224))
    dl.add_argument("--out", required=True)

    tr = sub.add_parser("train", help="train a diffusion model", description=CONFIG_DESCRIPTION)
    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained Stable Diffusion (unet, lora, dreambooth, ...)",
        description=CONFIG_DESCRIPTION,
    )
    ae = sub.add_parser(
        "train-autoencoder",
        help="train a VQ-VAE or KL autoencoder for latent diffusion",
        description=CONFIG_DESCRIPTION,
    )
    di = sub.add_parser(
        "distill",
        help="distil a trained model into a 1-8 step sampler (latent consistency distillation)",
        description="meddiff distill --model RUN --out RUN_FAST --steps 4. The data, resolution and conditioning "
        "come from the teacher's run unless given. " + CONFIG_DESCRIPTION,
    )
    for command, parser in (("train", tr), ("finetune", ft), ("train-autoencoder", ae), ("distill", di)):
        parser.add_argument("--config", help="YAML recipe, e.g. configs/pneumoniamnist.yaml (flags override it)")
        if command in config_flags:
            _add_config_flags(command, parser)

    ge = sub.add_parser("generate", help="generate a labelled synthetic dataset with a trained model")
    ge.add_argument("--model", required=True, help="run directory (or its pipeline/ folder)")
    which = ge.add_mutually_exclusive_group(required=True)
    which.add_argument("--labels", help='comma-separated label names, e.g. "Cardiomegaly,Pleural Effusion"')
    which.add_argument("--unconditional", action="store_true")
    which.add_argument("--conditions", help="CSV whose label columns (or prompt column) give one condition per row")
    which.add_argument("--prompt", help="free-text prompt (text-conditioned models)")
    which.add_argument(
        "--balance",
        action="store_true",
        help="the same number of images for every label (that label present, the others absent): a class-balanced "
        "set for rare-class augmentation; --n N gives N / labels each",
    )
    ge.add_argument(
        "--n",
        type=_positive_int,
        default=None,
        help="number of images (default 16; with --conditions: one per row, cycling the rows when larger)",
    )
    ge.add_argument("--per-condition", type=_positive_int, default=None, help="images per condition / CSV row")
    ge.add_argument(
        "--privacy-gate",
        action="store_true",
        help="check every image against the training images (needs `meddiff privacy calibrate`); flagged images "
        "are drawn again, never written",
    )
    ge.add_argument("--max-retries", type=_positive_int, default=8, help="privacy gate: redraws per image")
    ge.add_argument(
        "--allow-failed-audit",
        action="store_true",
        help="export a model whose privacy audit failed (or whose memorisation check warned); the override is "
        "stamped into every file",
    )
    ge.add_argument("--sex", default=None, help="F or M: models trained with demographics=sex")
    ge.add_argument("--age", type=float, default=None, help="years: models trained with demographics=age")
    ge.add_argument("--view", default=None, help="PA, AP or Lateral: models trained with demographics=view")
    ge.add_argument("--out", required=True)
    ge.add_argument(
        "--format",
        default=None,
        choices=("png", "png16", "dicom", "nifti", "both"),
        help="images: png (default), png16, dicom; volumes: nifti (default), dicom (a series per volume), both",
    )
    if "generate" in config_flags:
        _add_sampling_flags(ge)
    ge.add_argument(
        "--unspecified",
        choices=("absent", "unknown"),
        default="absent",
        help="labels not named in --labels: known absent (default) or left unspecified",
    )
    ge.add_argument(
        "--uncertain",
        choices=("ignore", "ones", "zeros"),
        default="ignore",
        help="-1 values in --conditions: unspecified (default), present or absent",
    )
    ge.add_argument("--shard", default=None, help="K/N: this process makes every N-th image starting at K")
    ge.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: this process's GPU where there is one, else mps, else cpu)",
    )
    ge.add_argument("--animate", action="store_true", help="also write a denoising GIF per image (animations/)")

    fi = sub.add_parser("fidelity", help="label fidelity of a trained model against real data")
    fi.add_argument("--model", required=True)
    fi.add_argument("--data", required=True, help="real training data spec (the held-out split is used too)")
    fi.add_argument("--out", required=True)
    fi.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: this process's GPU where there is one, else mps, else cpu)",
    )
    fi.add_argument("--n", type=_positive_int, default=512)
    if "fidelity" in config_flags:
        _add_sampling_flags(fi, only=("steps", "guidance", "scheduler", "seed"))
    fi.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="text models: a prompt for the prompt-response table (repeatable; default: each finding, "
        "three two-finding prompts and the normal prompt)",
    )
    fi.add_argument("--prompt-samples", type=_positive_int, default=48, help="text models: images per prompt")

    ev = sub.add_parser(
        "evaluate",
        help="FID/KID, precision/recall, fidelity, diversity, downstream AUC, "
        "memorization, UMAP -> metrics.json + report.html",
    )
    ev.add_argument("--real", required=True, help="real data spec (its train split; the held-out split is the test)")
    ev.add_argument("--synthetic", required=True, help="a folder from `meddiff generate`, or a dataset spec")
    ev.add_argument("--out", required=True)
    ev.add_argument(
        "--features",
        default="domain",
        choices=("domain", "inception", "xrv"),
        help="network behind FID/KID/PRDC: domain (trained here), inception (TorchScript file), xrv",
    )
    ev.add_argument(
        "--feature-weights",
        default=None,
        help="inception: path of the TorchScript Inception-v3 "
        "(inception-2015-12-05.pt); xrv: torchxrayvision weights name or path",
    )
    ev.add_argument("--resolution", type=_positive_int, default=None, help="default: the synthetic images' size")
    ev.add_argument("--seeds", type=_positive_int, default=3, help="downstream classifier seeds")
    ev.add_argument("--classifier-epochs", type=_positive_int, default=10)
    ev.add_argument("--max-images", type=_positive_int, default=None)
    ev.add_argument(
        "--protocols",
        default="real,synthetic,real+synthetic",
        help="downstream training sets, comma-separated: real, synthetic, real+synthetic, synthetic->real "
        "(synthetic pretraining, real fine-tuning), real-reweighted (class-reweighting baseline); or 'all'",
    )
    ev.add_argument(
        "--real-fractions",
        default="",
        help="also train on these stratified fractions of the real split, with and without the synthetic set "
        "(e.g. 0.1,0.25)",
    )

    pv = sub.add_parser("privacy", help="privacy gate: calibrate the near-copy detector of a trained model")
    pv_sub = pv.add_subparsers(dest="privacy_command", required=True)
    pc = pv_sub.add_parser(
        "calibrate",
        help="calibrate on the held-out split and measure on known copies -> RUN/privacy/calibration.json",
    )
    pc.add_argument("--model", required=True, help="run directory")
    pc.add_argument("--data", required=True, help="the model's training data spec (its held-out split calibrates)")
    pc.add_argument("--alpha", type=float, default=0.01, help="false-flag rate of new images to hold")
    pc.add_argument("--positives", type=_positive_int, default=500, help="known copies per copy type")
    pc.add_argument(
        "--descriptor-steps",
        type=int,
        default=600,
        help="training steps of the learned copy descriptor (a detector trained on the training images; 0: none)",
    )
    pc.add_argument(
        "--model-strengths",
        type=_strengths,
        default="0.1,0.3,0.5",
        help="model-made near-copies: training images noised this far into the schedule and denoised by the model "
        "('none' to skip)",
    )
    pc.add_argument(
        "--fusion-sources",
        type=int,
        default=250,
        help="training images (never the measured ones) whose known copies teach the detector how to combine its "
        "scores (0: the largest standardised score alone)",
    )

    pa = pv_sub.add_parser(
        "audit",
        help="sample the model and count near-copies of training images with the calibrated detector -> "
        "RUN/privacy/audit.json (a failed audit blocks exports without --allow-failed-audit)",
    )
    pa.add_argument("--model", required=True, help="run directory (calibrated with `meddiff privacy calibrate`)")
    pa.add_argument("--n", type=_positive_int, default=512, help="images to sample")
    pa.add_argument("--steps", type=_positive_int, default=20, help="sampler steps")
    pa.add_argument(
        "--scheduler",
        default=None,
        choices=("ddim", "ddpm", "dpm++", "unipc", "euler", "heun", "lcm"),
        help="sampler (default ddim, euler for flow models: these show a memorising model's copies, DPM-Solver++ "
        "may not)",
    )

    de = sub.add_parser("demo", help="phantoms -> train -> generate -> label fidelity -> report.html")
    de.add_argument("--out", required=True)
    de.add_argument(
        "--minutes",
        type=_positive_float,
        default=None,
        help="a training time budget instead of the fixed step counts (results then depend on the machine's speed)",
    )
    de.add_argument(
        "--steps", type=_positive_int, default=None, help="2D: training steps (default: meddiff.demo.DEMO_STEPS)"
    )
    de.add_argument("--n", type=_positive_int, default=3000, help="number of phantoms")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument(
        "--3d",
        dest="volumes",
        action="store_true",
        help="3D: brain phantom volumes (9 min on 2 Zen 4 cores, 18.5 on an AMX Xeon's 2)",
    )

    sv = sub.add_parser("survival", help="overall survival from radiomic features (BraTS layout), Spearman filter")
    sv.add_argument("--data", required=True, help="folder of BraTS case folders with survival_info.csv")
    sv.add_argument("--out", required=True)
    sv.add_argument("--modalities", default="t1,t1ce,t2,flair", help="comma-separated (default all four)")
    sv.add_argument(
        "--thresholds",
        default="none,|0.08|,|0.10|,|0.12|,<-0.01,<-0.05,<-0.10",
        help="filter rules: none, |t| (keep |rho| > t), <t (keep rho < t)",
    )
    sv.add_argument("--model", default="linear,forest", help="comma-separated: linear, ridge, forest, gbm")
    sv.add_argument("--modality-threshold", default="|0.10|", help="filter for the per-modality table")
    sv.add_argument(
        "--feature-classes",
        default="firstorder,shape,glcm",
        help="pyradiomics classes: shape, firstorder, glcm, glrlm, glszm, gldm, ngtdm",
    )
    sv.add_argument("--folds", type=_positive_int, default=5)
    sv.add_argument("--repeats", type=_positive_int, default=3)
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--workers", type=_positive_int, default=1, help="processes extracting features")
    sv.add_argument("--forest-trees", type=_positive_int, default=300, help="trees of the random forest model")
    sv.add_argument("--resection", default="all", help="all, or GTR to keep gross-total resections only")

    en = sub.add_parser(
        "env",
        help="versions, devices, precision, attention, distributed launch, extras, hub and "
        "caches of this machine, with one line of advice per problem",
    )
    en_out = en.add_mutually_exclusive_group()
    en_out.add_argument("--json", action="store_true", help="one JSON object")
    en_out.add_argument("--check", action="store_true", help="only the import health check (what the install runs)")
    se = sub.add_parser(
        "serve",
        help="web page: type a prompt or pick findings, get images + manifest as a ZIP (volume models: pick labels, "
        "view one volume with slice sliders, download its NIfTI)",
    )
    se.add_argument("--model", required=True, help="run directory (or its pipeline/ folder)")
    se.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    se.add_argument("--port", type=_positive_int, default=None, help="port (default: 7860 or the next free one)")
    if "serve" in config_flags:
        _add_serve_flags(se)
    se.add_argument(
        "--allow-failed-audit",
        action="store_true",
        help="serve a model whose privacy audit failed; the override is stamped into every image and ZIP",
    )
    se.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:N or mps (default: this process's GPU where there is one, else mps, else cpu)",
    )
    return p


def cmd_data(args) -> None:
    if args.data_command == "phantom":
        if args.volumes:
            _phantom_volumes(args)
            return
        from meddiff.data.phantom_dataset import write_phantom_folder

        counts = write_phantom_folder(
            Path(args.out),
            args.n or PHANTOM_N,
            args.size,
            args.seed,
            args.valid_fraction,
            args.bit_depth or 8,
            studies=args.studies,
        )
        print(
            f"wrote {counts['train']} training and {counts['valid']} validation phantoms to {args.out} "
            "(synthetic test data, not medical data)"
        )
    elif args.data_command == "inspect":
        import json

        from meddiff.data.inspect import format_report, inspect_spec

        edge = _volume_edge(args.spec, args.resolution)
        report = inspect_spec(args.spec, volume_edge=edge if edge is not None else args.resolution)
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    elif args.data_command == "prepare":
        edge = _volume_edge(args.spec, args.resolution)
        if edge is not None:
            _prepare_volumes(args, edge)
            return
        from meddiff.data.prepare import prepare

        if not args.out:
            raise MeddiffError("data prepare: --out DIR is required for image datasets (the store folder)")
        manifest = prepare(args.spec, Path(args.out), args.resolution or 32, workers=args.workers)
        print(f"manifest {manifest}")
    else:
        from meddiff.data.download import download_medmnist

        print(f"saved {download_medmnist(args.name, args.size, Path(args.out))}")


def _training_edge(spec_text: str) -> int:
    """The grid edge `meddiff train --data SPEC` uses by default (--volume.size, or phantom3d's size=)."""
    from meddiff.data.spec import parse_spec
    from meddiff.training.config import TrainConfig
    from meddiff.workflow_volume import volume_edge

    return volume_edge(TrainConfig(), parse_spec(spec_text))


def _volume_edge(spec_text: str, resolution: int | None) -> int | None:
    """For a volume spec, the grid edge in voxels: --resolution, else what training uses; None for other specs."""
    from meddiff.workflow_volume import is_volume_data

    if not is_volume_data(spec_text):
        return None
    return resolution or _training_edge(spec_text)


def _phantom_volumes(args) -> None:
    """`meddiff data phantom --3d`: brain phantom volumes, tumour masks and label CSVs."""
    from meddiff.data.phantom3d import write_phantom_volumes

    if args.bit_depth is not None:
        raise MeddiffError("--bit-depth is for 2D phantoms; 3D phantoms are float32 NIfTI volumes")
    out = Path(args.out)
    counts = write_phantom_volumes(out, args.n or PHANTOM3D_N, args.size, args.seed, args.valid_fraction)
    spec = f"phantom3d:{out}"
    if args.size != _training_edge(spec):  # trains at the phantoms' own size, not resampled to the default grid
        spec += f"?size={args.size}"
    print(
        f"wrote {counts['train']} training and {counts['valid']} validation brain phantom volumes "
        f"({args.size}^3 voxels, NIfTI with tumour masks; labels in train.csv and valid.csv) to {out} "
        "(synthetic test data, not medical data)"
    )
    print(f"use them as --data '{spec}' (e.g. meddiff data inspect '{spec}')")


def _prepare_volumes(args, edge: int) -> None:
    from meddiff.data.inspect import human_bytes
    from meddiff.data.prepare import prepare_volumes

    result = prepare_volumes(args.spec, edge, Path(args.out) if args.out else None)
    for split in result["splits"]:
        if "error" in split:
            print(f"split {split['split']}: not prepared ({split['error']})")
            continue
        skipped = f", {split['skipped']} skipped" if split["skipped"] else ""
        print(
            f"split {split['split']}: {split['cases']} case{'' if split['cases'] == 1 else 's'}{skipped}, "
            f"{'x'.join(map(str, split['shape']))} voxels at {' x '.join(f'{v:g}' for v in split['spacing'])} mm "
            f"-> store {split['store']} ({human_bytes(split['bytes'])})"
        )
    size = "" if edge == _training_edge(args.spec) else f" --volume.size {edge}"
    print(f"`meddiff train --data '{args.spec}'{size}` maps these stores without decoding again")
    if args.out:
        print(f"summary {Path(args.out) / 'summary.json'}; cases {Path(args.out) / 'manifest.csv'}")


def _base_config(args, settings: dict) -> Path | None:
    """The YAML under the flags: --config, or on --resume without one the run's own config.yaml."""
    if args.config:
        return Path(args.config)
    out = settings.get("out")
    if settings.get("resume") and out and (Path(out) / "config.yaml").is_file():
        return Path(out) / "config.yaml"  # continue with the run's own config; flags still override
    return None


def _older_run_defaults(path: Path) -> dict:
    """Settings that a run's config.yaml saved before an option existed implies (volume_unet.SAVED_WITHOUT: a U-Net
    saved without `label_embedding` was built without that path, so resuming it must not add one)."""
    import yaml

    from meddiff.models.volume_unet import SAVED_WITHOUT

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # load_config reports a bad file
    unet = (data.get("volume") or {}).get("unet") if isinstance(data, dict) else None
    if not isinstance(unet, dict):
        return {}
    return {f"volume.unet.{key}": value for key, value in SAVED_WITHOUT.items() if key not in unet}


def _run_config(args, settings: dict):
    """TrainConfig from defaults < the base YAML < `settings` (the flags given and what the command fixes)."""
    from meddiff.training.config import load_config

    base = _base_config(args, settings)
    if settings.get("resume") and base is not None and not args.config:  # the run's own config.yaml
        settings = {**_older_run_defaults(base), **settings}
    config = load_config(base, {}, settings)
    if not config.data:
        raise MeddiffError("no training data: pass --data SPEC (e.g. phantom:DIR) or set data: in --config")
    if not config.out:
        raise MeddiffError("no run directory: pass --out RUN_DIR")
    return config


def _recipe(path: Path | None) -> dict:
    """The base YAML's mapping, for command defaults that sit below it ({} when absent or broken: load_config
    reports a broken file in one line)."""
    import yaml

    if path is None or not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _volume_run(args, settings: dict, method: str) -> bool:
    """Volume data (or an explicit volume method): set `method` and the volume batch size (below the recipe and
    the flags) in `settings` and say so."""
    from meddiff.workflow_volume import VOLUME_BATCH_SIZES, is_volume_data

    recipe = _recipe(_base_config(args, settings))
    data = settings.get("data") or recipe.get("data") or ""
    asked = settings.get("method") or recipe.get("method") or ""
    if not (is_volume_data(str(data)) or str(asked).startswith("volume-")):
        return False
    if asked and asked not in (method, "pixel", "latent", "autoencoder"):
        raise MeddiffError(f"method {asked!r} does not train on volumes here; this command trains {method!r}")
    settings["method"] = method
    if "batch_size" not in settings and "batch_size" not in recipe:
        settings["batch_size"] = VOLUME_BATCH_SIZES[method]
    return True


def cmd_finetune(args) -> None:
    from meddiff.options import given
    from meddiff.workflow import FINETUNE_LEARNING_RATES, finetune_and_report

    settings = given(args)
    recipe = _recipe(_base_config(args, settings))
    method = settings.get("finetune.method") or (recipe.get("finetune") or {}).get("method") or "unet"
    defaults = {**FINETUNE_DEFAULTS, "learning_rate": FINETUNE_LEARNING_RATES.get(method, 1e-5)}
    for key, value in defaults.items():  # method defaults, below the recipe and the flags
        if key not in recipe and key not in settings:
            settings[key] = value
    config = _run_config(args, {**settings, "method": "finetune"})
    if not config.finetune.pretrained:
        raise MeddiffError("no pretrained model: pass --pretrained (a Stable Diffusion hub id or local folder)")
    summary = finetune_and_report(config)
    if summary is None:
        return
    print(f"done: {summary.steps} steps; export in {summary.export}; card {Path(config.out) / 'README.md'}")


def cmd_train_autoencoder(args) -> None:
    from meddiff.options import given
    from meddiff.workflow import train_autoencoder_and_report

    settings = given(args)
    if "learning_rate" not in settings and _base_config(args, settings) is None:
        settings["learning_rate"] = AUTOENCODER_LEARNING_RATE
    if _volume_run(args, settings, "volume-autoencoder"):
        from meddiff.workflow_volume import train_volume_autoencoder_and_report

        volume_config = _run_config(args, settings)
        volume_report = train_volume_autoencoder_and_report(volume_config)
        if volume_report is not None:
            r = volume_report.reconstruction
            print(
                f"done: held-out PSNR {r.psnr:.2f} dB, SSIM {r.ssim:.4f}, 3D SSIM {r.ssim_3d:.4f}; scaling factor "
                f"{volume_report.scaling_factor:.4f}; report {Path(volume_config.out) / 'report.html'}"
            )
        return
    config = _run_config(args, {**settings, "method": "autoencoder"})
    report = train_autoencoder_and_report(config)
    if report is None:
        return
    ms = f", MS-SSIM {report.ms_ssim:.4f}" if report.ms_ssim is not None else ""
    print(
        f"done: held-out PSNR {report.psnr:.2f} dB, SSIM {report.ssim:.4f}{ms}; scaling factor "
        f"{report.scaling_factor:.4f}; model in {Path(config.out) / 'autoencoder'}; report "
        f"{Path(config.out) / 'report.html'}"
    )


def cmd_train(args) -> None:
    from meddiff.options import given
    from meddiff.workflow import train_and_report

    settings = given(args)
    if _volume_run(args, settings, "volume-latent"):
        from meddiff.workflow_volume import train_volume_and_report

        volume_config = _run_config(args, settings)
        volume_summary = train_volume_and_report(volume_config)
        if volume_summary is not None:
            print(
                f"done: {volume_summary.steps} steps; model in {Path(volume_config.out) / 'pipeline'}; volumes "
                f"{volume_summary.volumes}; report {Path(volume_config.out) / 'report.html'}"
            )
        return
    if _base_config(args, settings) is None:  # no recipe: defaults that follow the image size, below the flags
        from meddiff.training.recipes import size_defaults

        defaults, note = size_defaults(int(settings.get("resolution") or 32), settings.get("method"), settings)
        for key, value in defaults.items():
            settings.setdefault(key, value)
        if note:
            logging.getLogger(__name__).info("%s", note)
    config = _run_config(args, settings)
    if config.method == "autoencoder":
        raise MeddiffError("this config trains an autoencoder; use `meddiff train-autoencoder`")
    if config.method == "finetune":
        raise MeddiffError("this config fine-tunes Stable Diffusion; use `meddiff finetune`")
    summary = train_and_report(config)
    if summary is None:
        return
    print(
        f"done: {summary.steps} steps; model in {Path(config.out) / 'pipeline'}; card {Path(config.out) / 'README.md'}"
    )


def cmd_distill(args) -> None:
    from meddiff.options import given
    from meddiff.training.config import load_config
    from meddiff.workflow import distill_and_report

    settings = {**{k: v for k, v in DISTILL_DEFAULTS.items()}, **given(args), "method": "distill"}
    config = load_config(_base_config(args, settings), {}, settings)
    if not config.out:
        raise MeddiffError("no run directory: pass --out RUN_DIR")
    summary = distill_and_report(config)
    if summary is None:
        return
    auc = summary.fidelity.mean_synthetic_auc if summary.fidelity else None
    print(
        f"done: {summary.steps} distillation steps; {config.distill.steps} network evaluations per image"
        + (f", mean label-fidelity AUC {auc:.3f}" if auc is not None else "")
        + f"; model in {Path(config.out) / 'pipeline'}; card {Path(config.out) / 'README.md'}"
    )


def cmd_generate(args) -> None:
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.devices import launch_rank, run_device
    from meddiff.models.storage import load_pipeline
    from meddiff.sampling.plan import make_plan
    from meddiff.sampling.synthesize import generate_dataset, parse_shard

    if _is_volume_model(args.model):
        _generate_volumes(args)
        return
    if args.format in ("nifti", "both"):
        raise MeddiffError(f"--format {args.format} is for volume models; images are png, png16 or dicom")
    args.format = args.format or "png"
    shard = parse_shard(args.shard)
    rank, world = launch_rank()
    if world > 1:  # launched by accelerate launch / torchrun: one shard per process, no collectives needed
        if args.shard:
            raise MeddiffError("use either --shard or a multi-process launcher, not both")
        shard = (rank, world)
    pipe = load_pipeline(args.model, device=run_device(args.device))
    codec = LabelCodec(pipe.label_names)
    if (args.labels is not None or args.balance) and not codec.label_names:
        raise MeddiffError("this model has no labels; use --unconditional (or --prompt for a text model)")
    if args.prompt is not None and not pipe.supports_prompts:
        raise MeddiffError("this model is not text-conditioned; use --labels (or --unconditional)")
    settings = _sampling_settings(args)
    if settings.negative_prompt and not pipe.supports_prompts:
        raise MeddiffError("--negative-prompt needs a text-conditioned model")
    plan = make_plan(
        codec,
        labels_text=args.labels,
        unconditional=args.unconditional,
        conditions=args.conditions,
        n=args.n,
        per_condition=args.per_condition,
        unspecified=args.unspecified,
        uncertain=args.uncertain,
        prompt=args.prompt,
        balance=args.balance,
    )
    plan = _with_demographics(plan, args, codec.label_names)
    from meddiff.evaluation.privacy_audit import failed_audit

    stamp = None
    reason = failed_audit(args.model)
    if reason and not args.allow_failed_audit:
        raise MeddiffError(
            f"{args.model}: {reason}; it is not exported without --allow-failed-audit (stamped into every file)"
        )
    if reason:
        print(f"warning: exporting with --allow-failed-audit: {reason}", file=sys.stderr)
        stamp = {"privacy": f"PRIVACY AUDIT FAILED: {reason}; exported with --allow-failed-audit"}
    gate = None
    if args.privacy_gate:
        from meddiff.evaluation.privacy_gate import load_gate

        gate = load_gate(args.model, args.max_retries)
    result = generate_dataset(
        pipe,
        args.model,
        plan,
        settings,
        Path(args.out),
        args.format,
        shard,
        animate=args.animate,
        gate=gate,
        stamp=stamp,
    )
    if gate is not None:
        print(
            f"privacy gate: {result.redrawn} image(s) drawn again, {result.rejected} rejected after "
            f"{args.max_retries} retries (not written)"
        )
    counts = ", ".join(f"{k}={v}" for k, v in sorted(result.per_condition.items(), key=lambda kv: -kv[1])[:12])
    print(
        f"generated {result.written} images ({result.skipped} already present) in {result.seconds:.1f} s, "
        f"{result.images_per_second:.1f} img/s; per condition: {counts}"
    )
    print(
        f"manifest: {result.manifest}"
        if result.manifest
        else f"shard {shard[0]}/{shard[1]} done; the manifest is written when every shard has finished"
    )


def _is_volume_model(model: str) -> bool:
    from meddiff.models.volume_pipeline import PIPELINE_FILE

    folder = Path(model).expanduser()
    return (folder / PIPELINE_FILE).is_file() or (folder / "pipeline" / PIPELINE_FILE).is_file()


def _generate_volumes(args) -> None:
    """`meddiff generate` with a VolumePipeline run: NIfTI (or DICOM series) volumes and a manifest."""
    from meddiff.conditioning.labels import LabelCodec
    from meddiff.devices import run_device
    from meddiff.models.volume_pipeline import VolumePipeline
    from meddiff.sampling.plan import make_plan
    from meddiff.sampling.volume_export import VolumeExportOptions, generate_volumes

    if args.prompt is not None:
        raise MeddiffError("volume models take labels, not prompts; use --labels (or --unconditional)")
    if args.format in ("png", "png16"):
        raise MeddiffError(f"--format {args.format} is for 2D models; volumes are nifti, dicom or both")
    if args.shard or args.animate:
        raise MeddiffError("--shard and --animate are for 2D models")
    pipe = VolumePipeline.from_pretrained(args.model, device=run_device(args.device))
    codec = LabelCodec(pipe.label_names)
    if (args.labels is not None or args.balance) and not codec.label_names:
        raise MeddiffError("this model has no labels; use --unconditional (or --prompt for a text model)")
    plan = make_plan(
        codec,
        labels_text=args.labels,
        unconditional=args.unconditional,
        conditions=args.conditions,
        n=args.n,
        per_condition=args.per_condition,
        unspecified=args.unspecified,
        uncertain=args.uncertain,
        balance=args.balance,
    )
    plan = _with_demographics(plan, args, codec.label_names)
    settings = _sampling_settings(args)
    result = generate_volumes(
        pipe,
        plan.labels,
        plan.known,
        Path(args.out),
        seed=settings.seed,
        guidance=settings.guidance,
        steps=settings.steps,
        options=VolumeExportOptions(format=args.format or "nifti"),
        model_id=str(args.model),
    )
    print(
        f"generated {result.written} volumes ({result.skipped} already present) in {result.seconds:.1f} s; "
        f"manifest: {result.manifest}"
    )


def cmd_fidelity(args) -> None:
    from meddiff.data.spec import load_dataset, parse_spec
    from meddiff.devices import run_device
    from meddiff.evaluation.fidelity import label_fidelity
    from meddiff.models.storage import load_pipeline

    if _other_launch_process("fidelity"):
        return
    pipe = load_pipeline(args.model, device=run_device(args.device))
    if args.prompt and not pipe.supports_prompts:
        raise MeddiffError("--prompt needs a text-conditioned model; this one takes labels")
    resolution = pipe.image_size
    spec = parse_spec(args.data)
    train, heldout = load_dataset(spec, resolution), load_dataset(spec.heldout(), resolution)
    if train.label_names != pipe.label_names:
        raise MeddiffError(f"the model's labels {pipe.label_names} differ from the data's {train.label_names}")
    settings = _sampling_settings(args)
    result = label_fidelity(pipe, train, heldout, args.n, settings, seed=settings.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(result.table())
    response = None
    if pipe.supports_prompts:  # two findings named: both drawn? one named: only that one?
        from meddiff.evaluation.fidelity import default_prompts, prompt_response

        response = prompt_response(
            pipe,
            result.classifier,
            args.prompt or default_prompts(train.label_names),
            train.label_names,
            args.prompt_samples,
            settings,
            heldout=heldout,
        )
        print(response.table())
    result.report(response).write_json(out / "fidelity.json")


def _other_launch_process(what: str) -> bool:
    """Under accelerate launch / torchrun, commands that write one report run on the main process; the others say so
    and stop (generate shards its images instead)."""
    from meddiff.devices import launch_rank

    rank, world = launch_rank()
    if rank:
        print(f"process {rank} of {world}: {what} runs on the main process only")
    return rank != 0


def cmd_evaluate(args) -> None:
    from meddiff.evaluation.suite import run_evaluation

    if _other_launch_process("evaluate"):
        return

    report = run_evaluation(
        args.real,
        args.synthetic,
        Path(args.out),
        resolution=args.resolution,
        features=args.features,
        feature_weights=args.feature_weights,
        seeds=args.seeds,
        classifier_epochs=args.classifier_epochs,
        max_images=args.max_images,
        protocols=_protocols(args.protocols),
        fractions=_fractions(args.real_fractions),
    )
    print(f"report: {report}; metrics: {Path(args.out) / 'metrics.json'}")


def _with_demographics(plan, args, names: list[str]):
    """--sex / --age / --view on every image of the plan (checked against what the model was trained on)."""
    if args.sex is None and args.age is None and args.view is None:
        return plan
    from meddiff.conditioning.demographics import condition_values
    from meddiff.models.storage import training_label_counts
    from meddiff.sampling.plan import with_attributes

    counts = training_label_counts(args.model)
    return with_attributes(plan, names, condition_values(names, args.sex, args.age, args.view, counts))


def _protocols(text: str) -> tuple[str, ...]:
    from meddiff.evaluation.downstream import PROTOCOLS

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    return tuple(PROTOCOLS) if names == ("all",) else names


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise MeddiffError(f"--real-fractions wants numbers like 0.1,0.25, got {text!r}") from None


def _strengths(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants numbers like 0.1,0.3, got {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"strengths are fractions of the schedule in (0, 1], got {text!r}")
    return values


def cmd_privacy(args) -> None:
    from meddiff.evaluation.privacy_gate import calibrate_model
    from meddiff.models.card import update_privacy_section
    from meddiff.models.storage import load_pipeline, run_directory

    run_dir = run_directory(args.model)
    if args.privacy_command == "audit":
        from meddiff.evaluation.privacy_audit import audit_model

        audit = audit_model(run_dir, args.n, args.steps, scheduler=args.scheduler)
        update_privacy_section(run_dir)
        lo, hi = audit["copy_rate_interval"]
        print(
            f"privacy audit {audit['verdict'].upper()}: {audit['copies']} of {audit['n']} samples flagged as "
            f"near-copies (copy rate {audit['copy_rate']:.3f}, 95 % interval {lo:.3f}-{hi:.3f}, alpha "
            f"{audit['alpha']:g}); {audit['training_images_hit']} training image(s) hit; "
            f"{run_dir / 'privacy' / 'audit.json'}"
        )
        return
    resolution = load_pipeline(args.model).image_size
    if args.descriptor_steps < 0:
        raise MeddiffError(f"--descriptor-steps must be 0 or more, got {args.descriptor_steps}")
    if args.fusion_sources < 0:
        raise MeddiffError(f"--fusion-sources must be 0 or more, got {args.fusion_sources}")
    note = calibrate_model(
        run_dir,
        args.data,
        resolution,
        args.alpha,
        args.positives,
        descriptor_steps=args.descriptor_steps,
        model_strengths=args.model_strengths,
        progress=True,
        fusion_sources=args.fusion_sources,
    )
    update_privacy_section(run_dir)  # the model card states the calibration
    m = note["measured"]
    recall = ", ".join(f"{k} {v:.3f}" for k, v in m["recall"].items())
    print(
        f"calibrated (alpha {args.alpha:g}): false-flag rate on {m['n_test_negatives']} held-out images "
        f"{m['false_flag_rate']:.4f}; recall per copy type: {recall}; {run_dir / 'privacy' / 'calibration.json'}"
    )


def cmd_demo(args) -> None:
    from meddiff.demo import DEMO_STEPS, run_demo, run_demo3d

    if args.volumes:
        if args.steps:
            raise MeddiffError("demo --3d: --steps is for the 2D demo (the 3D one has fixed autoencoder and LDM steps)")
        run_demo3d(Path(args.out), minutes=args.minutes, seed=args.seed)
        return
    run_demo(Path(args.out), minutes=args.minutes, n=args.n, seed=args.seed, steps=args.steps or DEMO_STEPS)


def cmd_survival(args) -> None:
    from meddiff.survival.features import require_pyradiomics
    from meddiff.survival.run import SurvivalConfig, run_survival

    require_pyradiomics()  # a missing extra fails before anything is read

    def items(text: str) -> tuple[str, ...]:
        return tuple(part.strip().lower() for part in text.split(",") if part.strip())

    config = SurvivalConfig(
        data=args.data,
        out=args.out,
        modalities=items(args.modalities),
        rules=tuple(p.strip() for p in args.thresholds.split(",") if p.strip()),
        models=items(args.model),
        modality_rule=args.modality_threshold,
        feature_classes=items(args.feature_classes),
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        workers=args.workers,
        forest_trees=args.forest_trees,
        resection=args.resection,
    )
    report = run_survival(config)
    best = max(report["threshold_table"], key=lambda r: r["accuracy"])
    print(
        f"best: filter {best['filter']}, {best['model']}: accuracy {best['accuracy']:.3f}, Spearman R "
        f"{best['spearman_r']:.3f}; tables in {Path(args.out) / 'survival.md'} and survival.json"
    )


def cmd_env(args) -> None:
    from meddiff.environment import main as env_main

    code = env_main(["--json"] if args.json else ["--check"] if args.check else [])
    if code:
        raise SystemExit(code)


def cmd_serve(args) -> None:
    from meddiff.options import given
    from meddiff.serve.app import require_gradio, serve
    from meddiff.serve.service import ServeLimits

    require_gradio()  # before loading the model: a missing extra fails in a second
    limits = ServeLimits(**given(args))
    serve(
        args.model,
        args.host,
        args.port,
        limits,
        args.device,
        volume=_is_volume_model(args.model),
        allow_failed_audit=args.allow_failed_audit,
    )


COMMANDS = {
    "env": cmd_env,
    "finetune": cmd_finetune,
    "survival": cmd_survival,
    "serve": cmd_serve,
    "data": cmd_data,
    "train": cmd_train,
    "distill": cmd_distill,
    "train-autoencoder": cmd_train_autoencoder,
    "generate": cmd_generate,
    "fidelity": cmd_fidelity,
    "evaluate": cmd_evaluate,
    "demo": cmd_demo,
    "privacy": cmd_privacy,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(config_flags=(command,) if command in CONFIG_COMMANDS else ()).parse_args(argv)
    from meddiff.logs import configure_logging

    configure_logging(getattr(args, "verbosity", 0))  # library messages on stderr; a -v/-q flag may set verbosity
    try:
        COMMANDS[args.command](args)
    except MeddiffError as exc:
        print(f"meddiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meddiff: interrupted; continue a training run with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
