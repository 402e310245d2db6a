"""meddiff.evaluation.suite (`meddiff evaluate`): its helpers, and one fast end-to-end run on in-memory phantoms
(the CLI test in test_evaluate_cli.py adds generation and the HTML report)."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.suite import align, condition_keys, evaluate, synthetic_spec, to01


def dataset(labels, known=None, names=("Cardiomegaly", "Edema")):
    labels = torch.tensor(labels, dtype=torch.float32)
    known = torch.ones_like(labels, dtype=torch.bool) if known is None else torch.tensor(known)
    return ImageLabelDataset(torch.zeros(len(labels), 1, 4, 4), labels, known, list(names))


def test_synthetic_spec_reads_a_generated_folder_or_passes_a_spec(tmp_path):
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "manifest.csv").write_text("Path\n")
    assert synthetic_spec(str(tmp_path / "gen")) == f"csv:{tmp_path / 'gen' / 'manifest.csv'}?split=all"
    assert synthetic_spec("phantom:?n=8") == "phantom:?n=8"
    with pytest.raises(MeddiffError, match="has no manifest.csv"):
        synthetic_spec(str(tmp_path))


def test_align_reorders_labels_and_marks_missing_ones_unknown():
    syn = dataset([[1, 0], [0, 1]], names=("edema", "Cardiomegaly"))
    out = align(syn, ["Cardiomegaly", "Pneumothorax", "Edema"])
    assert out.label_names == ["Cardiomegaly", "Pneumothorax", "Edema"]
    assert out.labels.tolist() == [[0, 0, 1], [1, 0, 0]]
    assert out.known.tolist() == [[True, False, True], [True, False, True]]
    assert out.images is syn.images
    with pytest.raises(MeddiffError, match="share none with the real labels"):
        align(syn, ["Fracture"])


def test_condition_keys_name_the_present_known_labels():
    data = dataset([[1, 1], [1, 0], [0, 0], [1, 1]], known=[[True, True], [True, True], [True, True], [False, True]])
    assert condition_keys(data) == ["Cardiomegaly+Edema", "Cardiomegaly", "none", "Edema"]


def test_to01_maps_model_range_to_unit_range():
    images = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    out = to01(images)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3) and out.tolist() == [[[0.0, 0.5, 1.0]]]


@pytest.fixture
def quick_bootstrap(monkeypatch):
    """20 bootstrap resamples instead of 500 (the downstream bootstrap dominates a tiny evaluation's time)."""
    from meddiff.evaluation import downstream

    monkeypatch.setattr(downstream, "bootstrap_auc", functools.partial(downstream.bootstrap_auc, n_boot=20))


def plain(result):
    """(metrics as the metrics.json dict, artefacts) from evaluate's result (typed results or the older dict)."""
    metrics, artefacts = result if isinstance(result, tuple) else (result["metrics"], result["artefacts"])
    metrics = metrics.to_dict() if hasattr(metrics, "to_dict") else metrics
    return json.loads(json.dumps(metrics)), artefacts


def test_evaluate_phantoms_end_to_end_fast(quick_bootstrap):
    """Every section of metrics.json, with values in their ranges; the synthetic set is another phantom draw,
    capped by max_images."""
    m, art = plain(
        evaluate(
            "phantom:?n=32&seed=1",
            "phantom:?n=24&seed=2",
            resolution=16,
            seeds=1,
            classifier_epochs=1,
            max_images=16,
            progress=False,
        )
    )
    d = m["distribution"]
    assert (d["n_real_train"], d["n_real_test"], d["n_synthetic"]) == (32, 8, 16) and d["features"] == "domain"
    assert d["fid_synthetic_vs_real_test"] >= 0 and d["fid_real_train_vs_real_test"] >= 0
    assert {"precision", "recall", "density", "coverage"} <= set(d)
    assert all(0 <= d[k] <= 1 for k in ("precision", "recall", "coverage"))
    assert set(m["label_fidelity"]) == {"real_test_auc", "synthetic_auc"}
    assert set(m["downstream"]) == {"real", "synthetic", "real+synthetic"}
    assert m["downstream"]["real+synthetic"]["n_train"] == 48 and m["downstream"]["real"]["seeds"] == 1
    aucs = [v["auc"] for v in m["downstream"]["real"]["auc"].values() if v is not None]
    assert all(0 <= a <= 1 and not math.isnan(a) for a in aucs)
    assert 0 <= m["memorization"]["rate_flagged"] <= 1
    assert set(m["diversity"]) == {"real_test", "synthetic"}
    assert m["resolution"] == 16 and m["real"] == "phantom:?n=32&seed=1" and m["synthetic"] == "phantom:?n=24&seed=2"
    synthetic = art.synthetic if hasattr(art, "synthetic") else art["synthetic"]
    features = art.features if hasattr(art, "features") else art["features"]
    assert len(synthetic) == 16 and [f.shape[0] for f in features] == [32, 8, 16]
