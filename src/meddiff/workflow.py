"""End-to-end workflows used by the CLI: train -> export -> sample grids -> label fidelity -> model card."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from meddiff.conditioning.labels import LabelCodec
from meddiff.data.spec import DatasetSpec, load_dataset, parse_spec
from meddiff.devices import run_device
from meddiff.evaluation.cards import write_autoencoder_card, write_finetune_card, write_model_card
from meddiff.evaluation.fidelity import default_prompts, label_fidelity, prompt_response
from meddiff.evaluation.results import AutoencoderReport, FidelityReport, LatentSummary, RunSummary
from meddiff.models.storage import load_pipeline
from meddiff.sampling.generate import SamplingSettings, conditions_for, sample
from meddiff.sampling.grid import save_grid, upscale_for
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train
from meddiff.training.methods.finetune import FINETUNE_METHODS, default_learning_rate
from meddiff.training.summary import AutoencoderTraining, FinetuneSummary

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
        paths[key] = save_grid(
            out_dir / f"grid_{slug(key)}.png", images, columns=min(n, 8), upscale=upscale_for(images.shape[-1])
        )
    return paths


def train_and_report(config: TrainConfig, progress: bool = True) -> RunSummary | None:
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
    assert result.pipeline_dir is not None  # the main process exported the model
    timings["train_s"] = time.perf_counter() - t
    run_dir = Path(config.out)
    pipe = load_pipeline(result.pipeline_dir, device=run_device())  # grids and fidelity on the run's device
    settings = SamplingSettings(
        steps=config.sample_steps, guidance=config.guidance, seed=config.seed, precision=config.precision
    )
    t = time.perf_counter()
    grids = label_grids(pipe, settings, config.eval.grid_per_label, run_dir / "samples")
    timings["grids_s"] = time.perf_counter() - t
    fidelity: FidelityReport | None = None
    if config.eval.fidelity and dataset.label_names and (pipe.supports_labels or pipe.supports_prompts):
        t = time.perf_counter()
        heldout = load_dataset(spec.heldout(), config.resolution)
        fid = label_fidelity(
            pipe,
            dataset,
            heldout,
            config.eval.fidelity_samples,
            settings,
            classifier_epochs=config.eval.classifier_epochs,
            seed=config.seed,
            progress=progress,
        )
        logger.info("%s", fid.table())
        response = None
        if pipe.supports_prompts:  # do prompts naming two findings give both, and one finding only that one?
            response = prompt_response(
                pipe,
                fid.classifier,
                default_prompts(dataset.label_names),
                dataset.label_names,
                config.eval.prompt_samples,
                settings,
                progress=progress,
                heldout=heldout,
            )
            logger.info("%s", response.table())
        fidelity = fid.report(response)
        timings["fidelity_s"] = time.perf_counter() - t
    summary = RunSummary(
        data=config.data,
        dataset=dataset.summary(),
        label_names=dataset.label_names,
        method=config.method,
        conditioning=config.conditioning,
        resolution=config.resolution,
        latent=_latent_summary(pipe),
        parameters=result.parameters,
        steps=result.steps,
        batch_size=config.batch_size,
        train_minutes=result.train_seconds / 60,
        images_per_second=result.images_per_second,
        precision=result.precision,
        prediction_type="flow" if config.model.objective == "flow" else config.model.prediction_type,
        cond_dropout=config.cond_dropout,
        fidelity=fidelity,
        timings={k: round(v, 1) for k, v in timings.items()},
        grids={k: str(v) for k, v in grids.items()},
        loss_history=result.loss_history,
    )
    summary.write_json(run_dir / "metrics.json")
    write_model_card(run_dir, summary)
    return summary


def _latent_summary(pipe) -> LatentSummary | None:
    if not pipe.is_latent:
        return None
    vae = pipe.vae
    return LatentSummary(
        autoencoder=type(vae).__name__,
        latent_channels=vae.config.latent_channels,
        latent_size=pipe.unet.config.sample_size,
        scaling_factor=vae.config.scaling_factor,
    )


def train_autoencoder_and_report(config: TrainConfig, progress: bool = True) -> AutoencoderReport | None:
    """`meddiff train-autoencoder`: train, measure the latent scaling factor, report held-out reconstructions."""
    from meddiff.evaluation.autoencoder_report import autoencoder_report
    from meddiff.models.autoencoder import load_autoencoder

    spec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:  # the other processes of a multi-process run stop here
        return None
    assert result.pipeline_dir is not None  # the main process exported the autoencoder
    vae = load_autoencoder(result.pipeline_dir)
    heldout = load_dataset(spec.heldout(), config.resolution)
    training = AutoencoderTraining(
        dataset=dataset.summary(),
        steps=result.steps,
        train_minutes=result.train_seconds / 60,
        images_per_second=result.images_per_second,
        precision=result.precision,
        parameters=result.parameters,
        config=config.to_dict()["autoencoder"],
        loss_history=result.loss_history,
    )
    report = autoencoder_report(vae, heldout, Path(config.out), training)
    write_autoencoder_card(Path(config.out), config, report, training)
    return report


FINETUNE_LEARNING_RATES = {method: default_learning_rate(method) for method in FINETUNE_METHODS}


def finetune_and_report(config: TrainConfig, progress: bool = True) -> FinetuneSummary | None:
    """`meddiff finetune`: train with the chosen fine-tuning method, export, validation grid, model card."""
    from meddiff.models.stable_diffusion import check_pretrained

    check_pretrained(config.finetune.pretrained)  # an unreachable hub id fails before the data is read
    spec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:  # the other processes of a multi-process run stop here
        return None
    summary = FinetuneSummary(
        method=config.finetune.method,
        pretrained=config.finetune.pretrained,
        dataset=dataset.summary(),
        steps=result.steps,
        train_minutes=round(result.train_seconds / 60, 2),
        images_per_second=round(result.images_per_second, 2),
        precision=result.precision,
        trainable_parameters=result.parameters,
        export=str(result.pipeline_dir),
    )
    run_dir = Path(config.out)
    summary.write_json(run_dir / "metrics.json")
    write_finetune_card(run_dir, config, summary)
    return summary
