"""End-to-end workflows used by the CLI: train -> export -> sample grids -> label fidelity -> model card."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from meddiff.conditioning.labels import LabelCodec
from meddiff.data.spec import DatasetSpec, load_dataset, parse_spec
from meddiff.devices import run_device
from meddiff.evaluation.fidelity import default_prompts, label_fidelity, prompt_response
from meddiff.evaluation.report import write_model_card
from meddiff.models.storage import load_pipeline
from meddiff.sampling.generate import SamplingSettings, conditions_for, sample
from meddiff.sampling.grid import save_grid, upscale_for
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train

logger = logging.getLogger(__name__)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def label_grids(pipe, settings: SamplingSettings, n: int, out_dir: Path, progress: bool = False) -> dict[str, Path]:
    """One grid per label (that label present, the others absent) and one unconditional grid."""
    codec = LabelCodec(pipe.label_names)
    paths = {}
    for name in [*codec.label_names, None]:
        cond, _, _ = conditions_for(codec, name, name is None, n)
        images = sample(pipe, cond, settings, progress=progress)
        key = name or "unconditional"
        paths[key] = save_grid(out_dir / f"grid_{slug(key)}.png", images, columns=min(n, 8),
                               upscale=upscale_for(images.shape[-1]))
    return paths


def train_and_report(config: TrainConfig, progress: bool = True) -> dict | None:
    """`meddiff train`: everything a run directory should hold when it is done (None on the non-main processes of a
    multi-process run: only the main one samples, evaluates and reports)."""
    timings = {}
    t = time.perf_counter()
    spec: DatasetSpec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    timings["load_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:  # the other processes of a multi-process run stop here
        return None
    timings["train_s"] = time.perf_counter() - t
    run_dir = Path(config.out)
    pipe = load_pipeline(result.pipeline_dir, device=run_device())  # grids and fidelity on the run's device
    settings = SamplingSettings(steps=config.sample_steps, guidance=config.guidance, seed=config.seed,
                                precision=config.precision)
    t = time.perf_counter()
    grids = label_grids(pipe, settings, config.eval.grid_per_label, run_dir / "samples")
    timings["grids_s"] = time.perf_counter() - t
    fidelity = None
    if config.eval.fidelity and dataset.label_names and (pipe.supports_labels or pipe.supports_prompts):
        t = time.perf_counter()
        heldout = load_dataset(spec.heldout(), config.resolution)
        fid = label_fidelity(pipe, dataset, heldout, config.eval.fidelity_samples, settings,
                             classifier_epochs=config.eval.classifier_epochs, seed=config.seed, progress=progress)
        fidelity = fid.to_dict()
        logger.info("%s", fid.table())
        if pipe.supports_prompts:  # do prompts naming two findings give both, and one finding only that one?
            response = prompt_response(pipe, fid.classifier, default_prompts(dataset.label_names),
                                       dataset.label_names, config.eval.prompt_samples, settings, progress=progress,
                                       heldout=heldout)
            fidelity["prompt_response"] = response.to_dict()
            logger.info("%s", response.table())
        timings["fidelity_s"] = time.perf_counter() - t
    summary = {
        "data": config.data, "dataset": dataset.summary(), "label_names": dataset.label_names,
        "method": config.method, "conditioning": config.conditioning, "resolution": config.resolution,
        "latent": _latent_summary(pipe), "parameters": result.parameters,
        "steps": result.steps, "batch_size": config.batch_size, "train_minutes": result.train_seconds / 60,
        "images_per_second": result.images_per_second, "precision": result.precision,
        "prediction_type": config.model.prediction_type, "cond_dropout": config.cond_dropout,
        "fidelity": fidelity, "timings": {k: round(v, 1) for k, v in timings.items()},
        "grids": {k: str(v) for k, v in grids.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_model_card(run_dir, summary)
    summary["loss_history"] = result.loss_history
    return summary


def _latent_summary(pipe) -> dict | None:
    if not pipe.is_latent:
        return None
    vae = pipe.vae
    return {"autoencoder": type(vae).__name__, "latent_channels": vae.config.latent_channels,
            "latent_size": pipe.unet.config.sample_size, "scaling_factor": vae.config.scaling_factor}


def train_autoencoder_and_report(config: TrainConfig, progress: bool = True) -> dict | None:
    """`meddiff train-autoencoder`: train, measure the latent scaling factor, report held-out reconstructions."""
    from meddiff.evaluation.autoencoder_report import autoencoder_report
    from meddiff.models.autoencoder import load_autoencoder

    spec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:  # the other processes of a multi-process run stop here
        return None
    vae = load_autoencoder(result.pipeline_dir)
    heldout = load_dataset(spec.heldout(), config.resolution)
    training = {"dataset": dataset.summary(), "steps": result.steps, "train_minutes": result.train_seconds / 60,
                "images_per_second": result.images_per_second, "precision": result.precision,
                "parameters": result.parameters, "config": config.to_dict()["autoencoder"],
                "loss_history": result.loss_history}
    report = autoencoder_report(vae, heldout, Path(config.out), training)
    write_autoencoder_card(Path(config.out), config, report, training)
    return report


def write_autoencoder_card(run_dir: Path, config: TrainConfig, report: dict, training: dict) -> Path:
    kind = "VQ-VAE (diffusers VQModel)" if report["kind"] == "vq" else "KL autoencoder (diffusers AutoencoderKL)"
    lines = ["---", "library_name: diffusers", "tags: [meddiff, medical-imaging, autoencoder]", "---", "",
             f"# meddiff autoencoder: {config.data}", "", f"- {kind}, 1 channel, {config.resolution} px -> latent "
             f"{'x'.join(map(str, report['latent_shape']))} (downsample {report['downsample']})",
             f"- latent scaling factor {report['scaling_factor']:.4f}, measured on the training images (in config.json)",
             f"- {training['dataset']}", f"- {training['steps']} steps, {training['train_minutes']:.1f} min", "",
             f"Held-out reconstruction ({report['heldout_images']} images): MSE {report['mse']:.5f}, "
             f"PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}"
             + (f", MS-SSIM {report['ms_ssim']:.4f}" if report.get("ms_ssim") is not None else ""), "",
             "Use it for a latent diffusion model:", "```bash",
             f"meddiff train --method latent --autoencoder {run_dir} --data {config.data} --resolution "
             f"{config.resolution} --out RUN", "```", "With plain diffusers: "
             f"`{'VQModel' if report['kind'] == 'vq' else 'AutoencoderKL'}.from_pretrained('{run_dir}/autoencoder')`."]
    path = run_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


FINETUNE_LEARNING_RATES = {"unet": 1e-5, "unet+text": 1e-5, "text": 1e-5, "dreambooth": 5e-6, "lora": 1e-4,
                           "textual-inversion": 5e-4}


def finetune_and_report(config: TrainConfig, progress: bool = True) -> dict | None:
    """`meddiff finetune`: train with the chosen fine-tuning method, export, validation grid, model card."""
    from meddiff.models.stable_diffusion import check_pretrained

    check_pretrained(config.finetune.pretrained)  # an unreachable hub id fails before the data is read
    spec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:  # the other processes of a multi-process run stop here
        return None
    summary = {"method": config.finetune.method, "pretrained": config.finetune.pretrained, "dataset": dataset.summary(),
               "steps": result.steps, "train_minutes": round(result.train_seconds / 60, 2),
               "images_per_second": round(result.images_per_second, 2), "precision": result.precision,
               "trainable_parameters": result.parameters, "export": str(result.pipeline_dir)}
    run_dir = Path(config.out)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_finetune_card(run_dir, config, summary)
    return summary


def write_finetune_card(run_dir: Path, config: TrainConfig, summary: dict) -> Path:
    ft = config.finetune
    export = Path(summary["export"])
    if ft.method == "lora":
        use = ["pipe = StableDiffusionPipeline.from_pretrained(BASE)", f"pipe.load_lora_weights('{export}')"]
    elif ft.method == "textual-inversion":
        use = ["pipe = StableDiffusionPipeline.from_pretrained(BASE)",
               f"pipe.load_textual_inversion('{export / 'learned_embeds.safetensors'}', token='{ft.placeholder_token}')"]
    else:
        use = [f"pipe = StableDiffusionPipeline.from_pretrained('{export}', safety_checker=None)"]
    lines = ["---", "library_name: diffusers", "tags: [meddiff, medical-imaging, stable-diffusion, " + ft.method + "]",
             f"base_model: {ft.pretrained}", "---", "", f"# meddiff fine-tune ({ft.method}) of {ft.pretrained}", "",
             f"- data: {summary['dataset']}", f"- {summary['steps']} steps at {config.resolution} px, batch "
             f"{config.batch_size} x {config.gradient_accumulation} accumulation, {summary['train_minutes']} min, "
             f"{summary['images_per_second']} img/s, {summary['precision']}",
             f"- text encoder: {ft.text_encoder or 'the pretrained CLIP'}"
             + (f"; placeholder {ft.placeholder_token} ({ft.num_vectors} vectors)" if ft.method == "textual-inversion"
                else "") + (f"; instance prompt '{ft.instance_prompt}', class prompt '{ft.class_prompt}'"
                            if ft.method == "dreambooth" else ""),
             "- grayscale: 1-channel images enter the RGB autoencoder as three equal channels; meddiff returns the "
             "mean of the decoded channels", f"- validation grid: validation/final.png (rows: validation/final.txt)",
             "", "Use it:", "```bash", f"meddiff generate --model {run_dir} --prompt \"chest x-ray with pleural "
             "effusion\" --out DIR", f"meddiff serve --model {run_dir}", "```", "With plain diffusers (BASE = "
             f"{ft.pretrained}):", "```python", "from diffusers import StableDiffusionPipeline", *use, "```", "",
             "Synthetic images from this model are not real patients and are not for diagnosis."]
    path = run_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
