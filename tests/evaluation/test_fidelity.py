import numpy as np
import pytest

from meddiff.data.spec import load_dataset
from meddiff.evaluation.classifier import per_label_auc, predict, train_classifier


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_classifier_recognises_phantom_findings():
    train = load_dataset("phantom:?n=600&seed=21", 32)
    valid = load_dataset("phantom:?n=600&seed=21&split=valid", 32)
    model = train_classifier(train, epochs=6, seed=0)
    auc = per_label_auc(predict(model, valid.images), valid.labels.numpy(), valid.known.numpy(), valid.label_names)
    assert auc["Cardiomegaly"] > 0.9 and auc["Pleural Effusion"] > 0.85, auc


def test_auc_is_none_for_a_single_class():
    probs = np.array([[0.1], [0.9]])
    assert per_label_auc(probs, np.array([[1.0], [1.0]]), np.ones((2, 1), bool), ["A"]) == {"A": None}
    assert per_label_auc(probs, np.array([[0.0], [1.0]]), np.ones((2, 1), bool), ["A"]) == {"A": 1.0}


def test_prompt_findings_and_matching_real_rows():
    import torch

    from meddiff.data.dataset import ImageLabelDataset
    from meddiff.evaluation.fidelity import matching_rows, prompt_findings

    names = ["No Finding", "Cardiomegaly", "Pleural Effusion"]
    assert prompt_findings("chest x-ray with cardiomegaly and pleural effusion", names) == [
        "Cardiomegaly",
        "Pleural Effusion",
    ]
    assert prompt_findings("normal chest x-ray", names) == []
    labels = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    known = torch.ones_like(labels, dtype=torch.bool)
    known[3, 2] = False  # effusion unknown: not a "both" image, but counts as "cardiomegaly (no known effusion)"
    data = ImageLabelDataset(torch.zeros(5, 1, 8, 8), labels, known, names)
    assert matching_rows(data, ["Cardiomegaly", "Pleural Effusion"]).tolist() == [0]
    assert matching_rows(data, ["Cardiomegaly"]).tolist() == [1, 3]
    assert matching_rows(data, []).tolist() == [2]


def test_prompt_response_sets_prompts_beside_real_images():
    """PromptResponse with a real reference serialises it and prints it under the prompt's row."""
    from meddiff.evaluation.fidelity import PromptResponse

    r = PromptResponse(
        ["a", "b"],
        ["X", "Y"],
        np.array([[0.5, 0.0], [1.0, 1.0]]),
        np.zeros((2, 2)),
        4,
        np.array([[0.9, 0.1], [np.nan, np.nan]]),
        [10, 0],
    )
    d = r.to_dict()
    assert d["real_positive_rate"]["a"] == {"X": 0.9, "Y": 0.1} and d["real_positive_rate"]["b"]["X"] is None
    assert d["real_count"] == {"a": 10, "b": 0}
    table = r.table().splitlines()
    assert len(table) == 4 and "n=10" in table[2]


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_text_model_report_has_prompt_response_with_real_reference(tmp_path):
    import json

    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import EvalConfig, TrainConfig
    from meddiff.workflow import train_and_report

    config = TrainConfig(
        data="phantom:?n=160&seed=3",
        out=str(tmp_path),
        conditioning="text",
        resolution=32,
        batch_size=8,
        max_steps=2,
        checkpoint_every=0,
        sample_steps=2,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
        eval=EvalConfig(fidelity_samples=8, classifier_epochs=1, grid_per_label=1, prompt_samples=2, min_steps=0),
    )
    train_and_report(config, progress=False)
    response = json.loads((tmp_path / "metrics.json").read_text())["fidelity"]["prompt_response"]
    combo = "chest x-ray with cardiomegaly and pleural effusion"
    assert combo in response["positive_rate"] and combo in response["real_positive_rate"]
    counts = response["real_count"]
    assert sum(counts.values()) > 0 and all(c >= 0 for c in counts.values())
    shown = max(counts, key=counts.get)
    rates = [v for v in response["real_positive_rate"][shown].values() if v is not None]
    assert rates and all(0 <= v <= 1 for v in rates)
    assert "real held-out images with these findings" in (tmp_path / "README.md").read_text()
    # `meddiff fidelity` on the text model: the prompt-response table for the prompts asked for
    from meddiff.cli import main

    out = tmp_path / "fid"
    assert (
        main(
            [
                "fidelity",
                "--model",
                str(tmp_path),
                "--data",
                "phantom:?n=160&seed=3",
                "--out",
                str(out),
                "--n",
                "8",
                "--steps",
                "2",
                "--prompt",
                "chest x-ray with edema",
                "--prompt-samples",
                "2",
            ]
        )
        == 0
    )
    report = json.loads((out / "fidelity.json").read_text())
    assert list(report["prompt_response"]["positive_rate"]) == ["chest x-ray with edema"]
    count = report["prompt_response"]["real_count"]["chest x-ray with edema"]
    rates = report["prompt_response"]["real_positive_rate"]["chest x-ray with edema"].values()
    assert count >= 0 and (all(v is None for v in rates) if count == 0 else all(0 <= v <= 1 for v in rates))


def test_fidelity_prompt_on_a_label_model_is_one_line(tiny_run, tmp_path, capsys):
    from meddiff.cli import main

    assert (
        main(
            [
                "fidelity",
                "--model",
                str(tiny_run),
                "--data",
                "phantom:?n=64",
                "--out",
                str(tmp_path),
                "--prompt",
                "chest x-ray with edema",
            ]
        )
        == 2
    )
    assert "needs a text-conditioned model" in capsys.readouterr().err


def test_a_smaller_classifier_size_measures_downsized_samples(tmp_path, monkeypatch):
    """eval.classifier_size: the fidelity classifier is trained on real images at that size and the generated ones
    (label fidelity and the prompt-response table) are downsized to it."""
    import json

    import meddiff.evaluation.features as features
    from meddiff.evaluation.fidelity import at_size
    from meddiff.models.factory import ModelConfig
    from meddiff.training.config import EvalConfig, TrainConfig
    from meddiff.workflow import train_and_report

    x = __import__("torch").rand(3, 1, 32, 32)
    assert at_size(x, 32) is x and tuple(at_size(x, 16).shape) == (3, 1, 16, 16)
    assert float(at_size(x, 16)[0, 0, 0, 0]) == pytest.approx(float(x[0, 0, :2, :2].mean()), abs=1e-6)
    seen, real = [], features.domain_classifier

    def recording(train, *args, **kwargs):
        seen.append(train.resolution)
        return real(train, *args, **kwargs)

    monkeypatch.setattr(features, "domain_classifier", recording)
    config = TrainConfig(
        data="phantom:?n=160&seed=3", out=str(tmp_path), conditioning="text", resolution=32, batch_size=8,
        max_steps=2, checkpoint_every=0, sample_steps=2,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
        eval=EvalConfig(
            fidelity_samples=8, classifier_epochs=1, grid_per_label=1, prompt_samples=2, min_steps=0,
            classifier_size=16,
        ),
    )  # fmt: skip
    train_and_report(config, progress=False)
    assert seen == [16]
    fidelity = json.loads((tmp_path / "metrics.json").read_text())["fidelity"]
    assert fidelity["prompt_response"]["positive_rate"] and fidelity["synthetic_auc"]
