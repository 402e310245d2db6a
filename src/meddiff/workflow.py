"""End-to-end workflows used by the CLI: train -> export -> sample grids -> label fidelity -> model card."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from meddiff.conditioning.labels import LabelCodec
from meddiff.data.spec import DatasetSpec, load_dataset, parse_spec
from meddiff.devices import run_device
from meddiff.errors import MeddiffError
from meddiff.evaluation.budget import EvaluationPlan, plan_evaluation
from meddiff.evaluation.cards import write_autoencoder_card, write_finetune_card, write_model_card
from meddiff.evaluation.fidelity import default_prompts, label_fidelity, prompt_response
from meddiff.evaluation.results import (
    AutoencoderReport,
    DistillationSummary,
    FidelityReport,
    LatentSummary,
    RunSummary,
)
from meddiff.models.factory import evaluations_per_image
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
    trained = _load_and_train(config, progress)
    if trained is None:  # the other processes of a multi-process run stop here
        return None
    settings = SamplingSettings(
        steps=config.sample_steps, guidance=config.guidance, seed=config.seed, precision=config.precision
    )
    return report_run(config, *trained, settings, progress)


def _load_and_train(config: TrainConfig, progress: bool) -> tuple[DatasetSpec, Any, Any, dict[str, float]] | None:
    """(spec, dataset, train result, timings), or None on the non-main processes of a multi-process run."""
    timings = {}
    t = time.perf_counter()
    spec: DatasetSpec = parse_spec(config.data)
    dataset = load_dataset(spec, config.resolution)
    logger.info("data: %s", dataset.summary())
    timings["load_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = train(config, dataset, progress=progress, checks=training_checks(config, spec, dataset))
    if not result.is_main_process:
        return None
    timings["train_s"] = time.perf_counter() - t
    return spec, dataset, result, timings


def training_checks(config: TrainConfig, spec: DatasetSpec, dataset) -> list:
    """The checks the loop runs during training: the memorisation monitor when `privacy.every` > 0 (built on the
    main process; the others only keep its schedule)."""
    if not config.privacy.every:
        return []
    from meddiff.devices import launch_rank
    from meddiff.evaluation.privacy_monitor import NAME, PrivacyMonitor, check_heldout_size
    from meddiff.training.checks import OnMainOnly

    heldout = load_dataset(spec.heldout(), config.resolution)
    check_heldout_size(config.privacy, len(heldout))  # on every process: all stop together on bad input
    if launch_rank()[0] != 0:
        return [OnMainOnly(NAME, config.privacy.every)]
    return [PrivacyMonitor(config.privacy, dataset, heldout, config.guidance, config.seed)]


def report_run(
    config: TrainConfig,
    spec: DatasetSpec,
    dataset,
    result,
    timings: dict[str, float],
    settings: SamplingSettings,
    progress: bool = True,
    distillation: DistillationSummary | None = None,
) -> RunSummary:
    """After training a diffusion model (or distilling one): grids per label, label fidelity (and the prompt-response
    table for text models), metrics.json and the model card."""
    assert result.pipeline_dir is not None  # the main process exported the model
    run_dir = Path(config.out)
    pipe = load_pipeline(result.pipeline_dir, device=run_device())  # grids and fidelity on the run's device
    plan = _evaluation_plan(config, dataset, pipe, result, settings)
    logger.info("evaluation: %s", plan.describe())
    if plan.note:
        logger.info("evaluation: %s", plan.note)
    t = time.perf_counter()
    grids = label_grids(pipe, settings, plan.grid_per_label, run_dir / "samples")
    timings["grids_s"] = time.perf_counter() - t
    fidelity: FidelityReport | None = None
    if plan.fidelity_samples:
        t = time.perf_counter()
        size = min(config.resolution, config.eval.classifier_size or config.resolution)
        heldout = load_dataset(spec.heldout(), size)
        fid = label_fidelity(
            pipe,
            dataset if size == config.resolution else load_dataset(spec, size),
            heldout,
            plan.fidelity_samples,
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
                plan.prompt_samples,
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
        prediction_type=_prediction(config, pipe),
        cond_dropout=config.cond_dropout,
        fidelity=fidelity,
        evaluation_note=plan.note,
        timings={k: round(v, 1) for k, v in timings.items()},
        grids={k: str(v) for k, v in grids.items()},
        distillation=distillation,
        init_from=config.init_from,
        loss_history=result.loss_history,
    )
    summary.write_json(run_dir / "metrics.json")
    write_model_card(run_dir, summary)
    return summary


def _evaluation_plan(config: TrainConfig, dataset, pipe, result, settings: SamplingSettings) -> EvaluationPlan:
    """Grids, fidelity and prompt-response sample sizes for this run: they scale with the run (evaluation/budget)."""
    embedded = getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None  # a student: guidance as input
    return plan_evaluation(
        steps=result.steps,
        train_seconds=result.train_seconds,
        train_images_per_second=result.images_per_second,
        nfe=evaluations_per_image(settings.scheduler, settings.steps, settings.guidance, embedded),
        grid_count=len(pipe.label_names or []) + 1,  # label_grids: one per label and an unconditional one
        grid_per_label=config.eval.grid_per_label,
        fidelity=bool(config.eval.fidelity and dataset.label_names and (pipe.supports_labels or pipe.supports_prompts)),
        fidelity_samples=config.eval.fidelity_samples,
        prompt_count=len(default_prompts(dataset.label_names)) if pipe.supports_prompts else 0,
        prompt_samples=config.eval.prompt_samples,
        min_steps=config.eval.min_steps,
        time_share=config.eval.time_share,
    )


def _prediction(config: TrainConfig, pipe) -> str:
    if config.method == "distill":  # the student keeps its teacher's parametrisation
        return f"{pipe.scheduler.config['prediction_type']} (consistency student)"
    return "flow" if config.model.objective == "flow" else config.model.prediction_type


def distill_and_report(config: TrainConfig, progress: bool = True) -> RunSummary | None:
    """`meddiff distill`: a few-step student of a trained model, on the teacher's data (its run's config.yaml)
    unless --data says otherwise; then the same grids, label fidelity and card as `meddiff train`, sampled with
    the student's step count."""
    import json

    from meddiff.models.storage import resolve_model_dir, run_directory
    from meddiff.training.config import load_config
    from meddiff.training.methods.distill import distillation_method, student_sampler_name

    d = config.distill
    if not 1 <= d.steps <= 8:
        raise MeddiffError(f"--steps must be between 1 and 8 for a distilled sampler, got {d.steps}")
    if not d.teacher:
        raise MeddiffError("meddiff distill needs --model RUN_DIR (a run of `meddiff train`)")
    teacher_dir = resolve_model_dir(d.teacher)
    run = run_directory(d.teacher)
    teacher = load_config(run / "config.yaml", {}) if (run / "config.yaml").is_file() else None
    if not config.data:
        if teacher is None:
            raise MeddiffError(f"{run} has no config.yaml to take the training data from; pass --data SPEC")
        config.data = teacher.data
    unet_config = json.loads((teacher_dir / "unet" / "config.json").read_text())
    vae_config = teacher_dir / "vae" / "config.json"
    config.resolution = int(
        json.loads(vae_config.read_text())["sample_size"] if vae_config.is_file() else unet_config["sample_size"]
    )
    config.method = "distill"
    if teacher is not None:
        config.conditioning = teacher.conditioning
    teacher_auc = None
    if (run / "metrics.json").is_file():
        fidelity = json.loads((run / "metrics.json").read_text()).get("fidelity") or {}
        teacher_auc = fidelity.get("mean_synthetic_auc")
    teacher_steps, teacher_guidance = (teacher.sample_steps, teacher.guidance) if teacher else (20, 2.0)
    distillation = DistillationSummary(
        teacher=str(run),
        method=distillation_method(d.consistency, d.steps, d.lora_rank, d.adversarial_weight, d.distribution_weight)
        + ", "
        + ("decay-0 target" if d.target_decay == 0 else f"EMA target (decay {d.target_decay:g})"),
        sampler=student_sampler_name(d.consistency),
        network_evaluations_per_image=d.steps,
        teacher_network_evaluations_per_image=evaluations_per_image("dpm++", teacher_steps, teacher_guidance),
        solver_steps=d.solver_steps,
        guidance_range=[d.guidance_min, d.guidance_max],
        teacher_mean_fidelity_auc=teacher_auc,
    )
    trained = _load_and_train(config, progress)
    if trained is None:
        return None
    settings = SamplingSettings(steps=d.steps, guidance=config.guidance, seed=config.seed, precision=config.precision)
    return report_run(config, *trained, settings, progress, distillation)


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
