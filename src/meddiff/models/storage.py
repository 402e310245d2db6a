"""Saving and loading models in diffusers format (plus meddiff's own run metadata)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from meddiff.errors import MeddiffError
from meddiff.hub import quiet_loading
from meddiff.models.pipeline import MedDiffusionPipeline
from meddiff.models.stable_diffusion import load_stable_diffusion

PIPELINE_DIR = "pipeline"
ADAPTER_FILE = "meddiff_adapter.json"  # LoRA / textual-inversion exports: which base model they apply to
ADAPTER_DIRS = ("lora", "textual_inversion")
LABELS_FILE = "meddiff_labels.json"  # training positives per label (the ages / views a model has seen)


def save_pipeline(
    out_dir: Path,
    unet,
    scheduler,
    label_names: list[str],
    vae=None,
    text_encoder=None,
    tokenizer=None,
    label_counts: dict[str, int] | None = None,
    phased_steps: int = 0,
) -> Path:
    """Write a diffusers pipeline folder (unet/, scheduler/, [vae/, text_encoder/, tokenizer/,] model_index.json)
    plus pipeline.py so that plain diffusers can load it with custom_pipeline=<folder>. Weights are safetensors.
    `label_counts`: training images with each label present (meddiff_labels.json; diffusers ignores it).
    `phased_steps`: a phased-consistency student's step count (its saved DDIM scheduler is the only sampler that
    fits it)."""
    out_dir = Path(out_dir)
    pipe = MedDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        label_names=label_names,
        phased_steps=phased_steps,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.copyfile(Path(__file__).with_name("pipeline.py"), out_dir / "pipeline.py")
    if label_counts is not None:
        (out_dir / LABELS_FILE).write_text(json.dumps({"training_positives": label_counts}, indent=2))
    return out_dir


def training_label_counts(model_dir: str | Path) -> dict[str, int] | None:
    """Training images with each label present, as saved with the pipeline (None for models saved without)."""
    path = Path(model_dir).expanduser()
    for candidate in (path / PIPELINE_DIR / LABELS_FILE, path / LABELS_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("training_positives")
    return None


def find_adapter(path: str | Path) -> Path | None:
    """The adapter folder (LoRA weights or textual-inversion embeddings) of a fine-tuning run, if it is one."""
    path = Path(path).expanduser()
    for candidate in (path, *(path / name for name in ADAPTER_DIRS)):
        if (candidate / ADAPTER_FILE).is_file():
            return candidate
    return None


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a run directory (holding pipeline/, lora/ or textual_inversion/), a pipeline folder or an adapter
    folder; fail with one actionable line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MeddiffError(f"model directory {path} does not exist; pass a run directory written by `meddiff train`")
    adapter = find_adapter(path)
    if adapter is not None and not (path / PIPELINE_DIR).is_dir():
        return adapter
    candidate = path / PIPELINE_DIR if (path / PIPELINE_DIR).is_dir() else path
    for required in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (candidate / required).is_file():
            raise MeddiffError(
                f"model directory {path} is incomplete: {required} is missing; "
                "train one with `meddiff train` (or finish the run with --resume latest)"
            )
    unet_dir = candidate / "unet"
    if not any(unet_dir.glob("*.safetensors")) and not any(unet_dir.glob("*.bin")):
        raise MeddiffError(f"model directory {path} is incomplete: no U-Net weights in {unet_dir}")
    return candidate


def run_directory(path: str | Path) -> Path:
    """The run directory of a model given as its run directory or its pipeline folder (checked as resolve_model_dir
    checks it): where config.yaml, metrics.json and privacy/ live."""
    folder = resolve_model_dir(path)
    if folder.name == PIPELINE_DIR:
        return folder.parent
    # a fine-tuning run's adapter (RUN/lora, RUN/textual_inversion): its run holds the privacy records
    if folder.name in ADAPTER_DIRS and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return folder


def model_guidance(path: str | Path, default: float = 2.0) -> float:
    """The guidance scale a model was trained and reported with (its run's config.yaml), else `default`: what
    sampling uses when no scale is asked for. A 3D latent run samples best at a higher scale (the demo: 8), an
    LCM-LoRA student has its guidance distilled in (1)."""
    import yaml

    folder = Path(path).expanduser()
    runs = [folder]
    if folder.name == PIPELINE_DIR or folder.name in ADAPTER_DIRS:
        runs.append(folder.parent)
    for run in runs:
        config = run / "config.yaml"
        if config.is_file():
            try:
                value = (yaml.safe_load(config.read_text()) or {}).get("guidance")
            except yaml.YAMLError:
                return default
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    return default


def load_pipeline(path: str | Path, device: str | torch.device = "cpu") -> MedDiffusionPipeline:
    folder = resolve_model_dir(path)
    quiet_loading()
    if (folder / ADAPTER_FILE).is_file():
        return load_adapter_pipeline(folder).to(device)
    try:
        pipe = MedDiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise MeddiffError(f"could not load the model in {folder}: {str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False).eval()
    return pipe.to(device)


def load_adapter_pipeline(folder: Path) -> MedDiffusionPipeline:
    """Base Stable Diffusion + LoRA weights or textual-inversion embeddings, applied with diffusers' own loaders
    (load_lora_weights / load_textual_inversion), as a MedDiffusionPipeline."""
    import json

    from diffusers import StableDiffusionPipeline

    note = json.loads((folder / ADAPTER_FILE).read_text())
    weights = folder / note["weights"]
    if not weights.is_file():
        raise MeddiffError(f"{folder} is incomplete: {note['weights']} is missing")
    parts = load_stable_diffusion(note["base"])
    sd = StableDiffusionPipeline(
        unet=parts.unet,
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,  # type: ignore[arg-type]  # any CLIP tokenizer works, the fast one too
        scheduler=parts.scheduler,  # type: ignore[arg-type]  # diffusers annotates an enum of scheduler names
        safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates it as required; None is supported
        feature_extractor=None,  # type: ignore[arg-type]  # likewise
        requires_safety_checker=False,
    )
    try:
        if note["kind"] == "lora":
            sd.load_lora_weights(str(folder), weight_name=note["weights"])
        elif note["kind"] == "textual-inversion":
            sd.load_textual_inversion(str(weights), token=note["token"])
        else:
            raise MeddiffError(f"{folder}: unknown adapter kind {note['kind']!r}")
    except (OSError, ValueError, KeyError) as exc:
        raise MeddiffError(f"could not apply {weights} to {note['base']}: {str(exc).splitlines()[0]}") from None
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    sd.unet.register_to_config(sample_size=int(note["resolution"]) // factor)
    sd.vae.register_to_config(sample_size=int(note["resolution"]))
    pipe = MedDiffusionPipeline(
        unet=sd.unet,
        scheduler=sd.scheduler,
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        tokenizer=sd.tokenizer,
        label_names=note.get("label_names") or [],
    )
    pipe.set_progress_bar_config(disable=True)
    sd.text_encoder.requires_grad_(False).eval()
    return pipe
