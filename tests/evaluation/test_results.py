"""Typed evaluation results serialise to the keys fidelity.json and the metrics.json files have always had, and
read back into the same types."""

import json

import numpy as np

from meddiff.evaluation.fidelity import FidelityResult, PromptResponse
from meddiff.evaluation.memorization import MemorizationAudit
from meddiff.evaluation.results import (
    AucInterval,
    AutoencoderReport,
    EvaluationResult,
    FidelityReport,
    KidEstimate,
    PromptResponseReport,
    SimilarityGroup,
)

FIDELITY_KEYS = [
    "real_auc",
    "synthetic_auc",
    "mean_real_auc",
    "mean_synthetic_auc",
    "n_real_heldout",
    "n_synthetic",
    "sampling",
    "seconds",
]


def _fidelity():
    return FidelityResult(
        {"A": 0.9, "B": None}, {"A": 0.7, "B": 0.5}, 20, 8, {"steps": 2}, 1.234, np.zeros((8, 4, 4)), np.zeros((8, 2))
    )


def _response():
    return PromptResponse(
        ["a"], ["A", "B"], np.array([[0.5, 0.25]]), np.array([[0.4, 0.3]]), 4, np.array([[np.nan, 1.0]]), [2]
    )


def test_fidelity_report_has_the_old_keys_and_the_prompt_response_when_there_is_one():
    plain = _fidelity().report()
    assert list(plain.to_dict()) == FIDELITY_KEYS and _fidelity().to_dict() == plain.to_dict()
    assert plain.mean_real_auc == 0.9 and plain.mean_synthetic_auc == 0.6 and plain.seconds == 1.2
    full = _fidelity().report(_response())
    d = json.loads(json.dumps(full.to_dict()))
    assert list(d) == [*FIDELITY_KEYS, "prompt_response"]
    assert d["prompt_response"]["real_positive_rate"] == {"a": {"A": None, "B": 1.0}}
    back = FidelityReport.from_dict(d)
    assert back == full and isinstance(back.prompt_response, PromptResponseReport)
    assert back.prompt_response.positive_rate["a"]["B"] == 0.25


def test_prompt_response_without_a_real_reference_leaves_those_keys_out():
    r = PromptResponse(["a"], ["A"], np.array([[1.0]]), np.array([[0.9]]), 2)
    assert list(r.to_dict()) == ["n_per_prompt", "label_names", "positive_rate", "mean_probability"]


def test_memorization_summary_keeps_its_dotted_keys():
    sims = np.array([0.5, 0.96, 0.995])
    audit = MemorizationAudit(sims, np.zeros(3, int), np.array([0.1, 0.2, 0.3]), np.zeros(3, int), 0.99, 0.15)
    d = audit.to_dict()
    assert d["rate_pixel_above_0.95"] == 2 / 3 and d["rate_pixel_above_0.99"] == 1 / 3
    assert d["median_knn_ratio"] is None and d["rate_flagged"] == 2 / 3
    assert audit.summary().rate_pixel_above_095 == 2 / 3 and len(d) == 12


def test_autoencoder_report_names_codebook_use_for_vq_only():
    kl = AutoencoderReport(
        heldout_images=4,
        mse=0.1,
        psnr=10.0,
        ssim=0.5,
        ms_ssim=None,
        kind="kl",
        downsample=4,
        latent_shape=[4, 8, 8],
        scaling_factor=0.9,
    )
    assert "codebook_used" not in kl.to_dict() and kl.to_dict()["ms_ssim"] is None
    kl.codebook_used, kl.codebook_size, kl.perplexity = 3, 8, 2.5
    assert kl["codebook_used"] == 3 and AutoencoderReport.from_dict(kl.to_dict()) == kl


def test_evaluation_result_reads_back_a_metrics_file():
    auc = {"auc": 0.8, "ci95": [0.7, 0.9]}
    metrics = {
        "real": "phantom:D",
        "synthetic": "csv:g/manifest.csv?split=all",
        "resolution": 32,
        "distribution": {
            "features": "domain",
            "n_real_test": 10,
            "n_real_train": 50,
            "n_synthetic": 8,
            "fid_synthetic_vs_real_test": 3.5,
            "fid_real_train_vs_real_test": 1.0,
            "kid_synthetic_vs_real_test": {"mean": 0.1, "std": 0.01},
            "kid_real_train_vs_real_test": {"mean": 0.0, "std": 0.01},
            "precision": 0.5,
            "recall": 0.6,
            "density": 0.7,
            "coverage": 0.8,
        },
        "label_fidelity": {"real_test_auc": {"A": 0.9}, "synthetic_auc": {"A": None}},
        "diversity": {
            "real_test": {"A": {"n": 3, "similarity": 0.2, "metric": "SSIM"}},
            "synthetic": {"none": {"n": 1, "similarity": None, "metric": "n/a"}},
        },
        "memorization": {
            "pixel_threshold": 0.9,
            "feature_threshold": 0.8,
            "rate_pixel": 0.0,
            "rate_feature": 0.0,
            "rate_knn_ratio": 0.0,
            "knn_ratio_threshold": 0.1,
            "median_knn_ratio": 1.0,
            "rate_flagged": 0.0,
            "max_pixel_similarity": 0.5,
            "median_pixel_similarity": 0.3,
            "rate_pixel_above_0.95": 0.0,
            "rate_pixel_above_0.99": 0.0,
        },
        "downstream": {
            s: {"n_train": 5, "seeds": 2, "auc": {"A": auc, "B": None}} for s in ("real", "synthetic", "real+synthetic")
        },
        "seconds": 12.5,
    }
    result = EvaluationResult.from_dict(metrics)
    assert result.to_dict() == metrics
    assert isinstance(result.distribution.kid_synthetic_vs_real_test, KidEstimate)
    assert isinstance(result.diversity.real_test["A"], SimilarityGroup)
    assert isinstance(result.downstream["real"].auc["A"], AucInterval) and result.downstream["real"].auc["B"] is None
    assert result.memorization.rate_pixel_above_099 == 0.0 and result["seconds"] == 12.5
