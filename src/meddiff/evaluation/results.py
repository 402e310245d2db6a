"""Typed results of the evaluation layer, each serialised to the JSON it has always been written as:
label fidelity (fidelity.json, and "fidelity" in a trained run's metrics.json), the prompt response, the autoencoder
reconstruction report, `meddiff evaluate`'s metrics.json, and the trained run's summary (`meddiff train`'s
metrics.json, which also feeds its model card)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meddiff.results import JsonResult, json_field

AUC = dict[str, float | None]  # label name -> ROC AUC (None where a class is missing)
PerPromptRates = dict[str, dict[str, float | None]]  # prompt -> label name -> rate


@dataclass(kw_only=True)
class PromptResponseReport(JsonResult):
    """Share of each prompt's images that the real-trained classifier calls positive per label."""

    n_per_prompt: int
    label_names: list[str]
    real_positive_rate: PerPromptRates | None = json_field(None, omit_none=True)  # real held-out images
    real_count: dict[str, int] | None = json_field(None, omit_none=True)
    positive_rate: PerPromptRates
    mean_probability: PerPromptRates


@dataclass(kw_only=True)
class FidelityReport(JsonResult):
    """Label fidelity: per-label AUC of the real-trained classifier on held-out real and on generated images."""

    real_auc: AUC
    synthetic_auc: AUC
    mean_real_auc: float | None
    mean_synthetic_auc: float | None
    n_real_heldout: int
    n_synthetic: int
    sampling: dict[str, Any]  # steps, guidance, scheduler
    seconds: float
    prompt_response: PromptResponseReport | None = json_field(None, omit_none=True)  # text-conditioned models
    subgroups: dict[str, Any] | None = json_field(None, omit_none=True)  # demographic conditions: fairness table


@dataclass(kw_only=True)
class AutoencoderReport(JsonResult):
    """Held-out reconstruction quality of a trained autoencoder (its run's metrics.json, less "training")."""

    heldout_images: int
    mse: float
    psnr: float
    ssim: float
    ms_ssim: float | None  # None below the size MS-SSIM needs
    kind: str  # "kl" or "vq"
    downsample: int
    latent_shape: list[int]  # channels, size, size
    scaling_factor: float
    codebook_used: int | None = json_field(None, omit_none=True)  # VQ models only
    codebook_size: int | None = json_field(None, omit_none=True)
    perplexity: float | None = json_field(None, omit_none=True)


@dataclass(kw_only=True)
class LatentSummary(JsonResult):
    """The latent space of a latent diffusion model."""

    autoencoder: str  # the diffusers class
    latent_channels: int
    latent_size: int
    scaling_factor: float


@dataclass(kw_only=True)
class DistillationSummary(JsonResult):
    """`meddiff distill`: what the student was distilled from, and how fast it samples."""

    teacher: str
    method: str
    network_evaluations_per_image: int  # the student's steps: guidance is an input, not a second pass
    teacher_network_evaluations_per_image: int  # the teacher at its run's sampler steps, guidance counted
    solver_steps: int
    guidance_range: list[float]
    teacher_mean_fidelity_auc: float | None  # from the teacher run's metrics.json, where it measured one
    sampler: str = "LCMScheduler"  # the diffusers scheduler the student samples with


@dataclass(kw_only=True)
class RunSummary(JsonResult):
    """`meddiff train`: the run's metrics.json and what its model card says."""

    data: str
    dataset: str
    label_names: list[str]
    method: str
    conditioning: str
    resolution: int
    latent: LatentSummary | None
    parameters: int
    steps: int
    batch_size: int
    train_minutes: float
    images_per_second: float
    precision: str
    prediction_type: str
    cond_dropout: float
    fidelity: FidelityReport | None
    timings: dict[str, float]
    grids: dict[str, str]  # label (or "unconditional") -> PNG path
    evaluation_note: str | None = None  # what evaluation skipped or reduced for a short run, and why
    distillation: DistillationSummary | None = None  # students of `meddiff distill`
    init_from: str | None = None  # the run whose trained U-Net this one started from (--init-from)
    loss_history: list[list[float]] = json_field(default_factory=list, saved=False)  # in training.json


# `meddiff evaluate` -------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class KidEstimate(JsonResult):
    mean: float
    std: float


@dataclass(kw_only=True)
class DistributionMetrics(JsonResult):
    features: str  # domain, inception or xrv
    n_real_test: int
    n_real_train: int
    n_synthetic: int
    fid_synthetic_vs_real_test: float
    fid_real_train_vs_real_test: float
    kid_synthetic_vs_real_test: KidEstimate
    kid_real_train_vs_real_test: KidEstimate
    precision: float
    recall: float
    density: float
    coverage: float


@dataclass(kw_only=True)
class LabelFidelityAUC(JsonResult):
    real_test_auc: AUC
    synthetic_auc: AUC


@dataclass(kw_only=True)
class SimilarityGroup(JsonResult):
    """Mean pairwise similarity within one condition."""

    n: int
    similarity: float | None
    metric: str  # SSIM or MS-SSIM


@dataclass(kw_only=True)
class Diversity(JsonResult):
    real_test: dict[str, SimilarityGroup]
    synthetic: dict[str, SimilarityGroup]


@dataclass(kw_only=True)
class MemorizationSummary(JsonResult):
    pixel_threshold: float
    feature_threshold: float
    rate_pixel: float
    rate_feature: float
    rate_knn_ratio: float
    knn_ratio_threshold: float
    median_knn_ratio: float | None
    rate_flagged: float
    max_pixel_similarity: float
    median_pixel_similarity: float
    rate_pixel_above_095: float = json_field(key="rate_pixel_above_0.95")
    rate_pixel_above_099: float = json_field(key="rate_pixel_above_0.99")


@dataclass(kw_only=True)
class AucInterval(JsonResult):
    auc: float
    ci95: list[float]  # bootstrap 95 % interval


@dataclass(kw_only=True)
class DownstreamResult(JsonResult):
    """A classifier recipe trained on one set (real, synthetic, real+synthetic, or another protocol of
    evaluation/downstream.py), tested on the real test split."""

    n_train: int
    seeds: int
    auc: dict[str, AucInterval | None]
    # newer files (older metrics.json files read back without them)
    recall: dict[str, float | None] | None = json_field(None, omit_none=True)  # at probability 0.5, seed mean
    mean_auc: float | None = json_field(None, omit_none=True)
    protocol: str | None = json_field(None, omit_none=True)


@dataclass(kw_only=True)
class EvaluationResult(JsonResult):
    """`meddiff evaluate`'s metrics.json."""

    real: str
    synthetic: str
    resolution: int
    distribution: DistributionMetrics
    label_fidelity: LabelFidelityAUC
    diversity: Diversity
    memorization: MemorizationSummary
    downstream: dict[str, DownstreamResult]  # real, synthetic, real+synthetic
    seconds: float
