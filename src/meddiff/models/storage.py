"""Saving and loading models in diffusers format (plus meddiff's own run metadata)."""

from __future__ import annotations

import shutil
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.models.pipeline import MedDiffusionPipeline

PIPELINE_DIR = "pipeline"


def save_pipeline(out_dir: Path, unet, scheduler, label_names: list[str], vae=None, text_encoder=None,
                  tokenizer=None) -> Path:
    """Write a diffusers pipeline folder (unet/, scheduler/, [vae/, text_encoder/, tokenizer/,] model_index.json)
    plus pipeline.py so that plain diffusers can load it with custom_pipeline=<folder>. Weights are safetensors."""
    out_dir = Path(out_dir)
    pipe = MedDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                label_names=label_names)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    shutil.copyfile(Path(__file__).with_name("pipeline.py"), out_dir / "pipeline.py")
    return out_dir


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a run directory (holding pipeline/) or a pipeline folder; fail with one actionable line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MeddiffError(f"model directory {path} does not exist; pass a run directory written by `meddiff train`")
    candidate = path / PIPELINE_DIR if (path / PIPELINE_DIR).is_dir() else path
    for required in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (candidate / required).is_file():
            raise MeddiffError(f"model directory {path} is incomplete: {required} is missing; "
                               "train one with `meddiff train` (or finish the run with --resume latest)")
    unet_dir = candidate / "unet"
    if not any(unet_dir.glob("*.safetensors")) and not any(unet_dir.glob("*.bin")):
        raise MeddiffError(f"model directory {path} is incomplete: no U-Net weights in {unet_dir}")
    return candidate


def load_pipeline(path: str | Path, device: str = "cpu") -> MedDiffusionPipeline:
    folder = resolve_model_dir(path)
    quiet_loading()
    try:
        pipe = MedDiffusionPipeline.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise MeddiffError(f"could not load the model in {folder}: {str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False).eval()
    return pipe.to(device)


def quiet_loading() -> None:
    """No per-component progress bars when loading and saving (the CLI shows its own progress)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
