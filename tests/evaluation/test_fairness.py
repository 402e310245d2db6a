"""The fairness table: finding AUC and FID per demographic subgroup, real held-out vs generated."""

import numpy as np
import pytest

from meddiff.evaluation.fairness import fairness_lines, fairness_table, subgroups

NAMES = ["Effusion", "Female", "Age 18-39", "Age 60-79"]


def side(n, seed, faithful_for_women=True):
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 4), np.float32)
    labels[:, 0] = rng.random(n) < 0.5
    labels[:, 1] = np.arange(n) % 2  # alternate women and men
    young = rng.random(n) < 0.5
    labels[:, 2], labels[:, 3] = young, ~young
    known = np.ones((n, 4), bool)
    known[::10, 2:] = False  # some ages unknown
    probs = np.where(labels[:, :1] > 0.5, 0.8, 0.2) + rng.normal(0, 0.05, (n, 1))
    if not faithful_for_women:  # the finding is not shown in women's images
        women = labels[:, 1] > 0.5
        probs[women, 0] = rng.random(int(women.sum()))
    features = rng.normal(0, 1, (n, 8)) + labels[:, 1:2] * 2
    return np.repeat(probs, 4, axis=1), labels, known, features


def test_subgroups_come_from_demographic_labels_only():
    assert subgroups(NAMES) == {"female": (1, 1.0), "male": (1, 0.0), "Age 18-39": (2, 1.0), "Age 60-79": (3, 1.0)}
    assert subgroups(["Effusion", "Edema"]) == {}
    assert fairness_table(["Effusion"], side(10, 0)[:4], side(10, 1)[:4]) is None


def test_a_subgroup_the_generator_fails_stands_out():
    table = fairness_table(NAMES, side(200, 0), side(200, 1, faithful_for_women=False))
    assert table["female"]["n_real"] == 100 and table["male"]["n_synthetic"] == 100
    assert table["Age 18-39"]["n_real"] + table["Age 60-79"]["n_real"] == 180  # unknown ages belong to neither
    assert table["male"]["mean_synthetic_auc"] == pytest.approx(1.0)
    assert table["female"]["mean_synthetic_auc"] < 0.7 < table["female"]["mean_real_auc"]
    assert list(table["female"]["synthetic_auc"]) == ["Effusion"]  # findings only
    assert table["female"]["fid"] >= 0 and table["male"]["fid"] >= 0
    lines = fairness_lines(table)
    assert len(lines) == 2 + 4 and lines[2].startswith("| female | 100 | 100 |")


def test_small_subgroups_get_no_fid():
    table = fairness_table(NAMES, side(12, 0), side(12, 1))
    assert table["female"]["fid"] is None  # 6 images per side


def test_the_model_card_shows_the_fairness_table():
    from meddiff.evaluation.cards import _fidelity_lines
    from meddiff.evaluation.results import FidelityReport

    table = fairness_table(NAMES, side(60, 0), side(60, 1))
    report = FidelityReport(
        real_auc={"Effusion": 0.9},
        synthetic_auc={"Effusion": 0.8},
        mean_real_auc=0.9,
        mean_synthetic_auc=0.8,
        n_real_heldout=60,
        n_synthetic=60,
        sampling={},
        seconds=1.0,
        subgroups=table,
    )
    text = "\n".join(_fidelity_lines(report))
    assert "Per demographic subgroup (fairness)" in text and "| female | 30 | 30 |" in text
    assert report.to_dict()["subgroups"]["male"]["n_real"] == 30
    plain = FidelityReport(**{**report.__dict__, "subgroups": None})
    assert "subgroups" not in plain.to_dict() and "fairness" not in "\n".join(_fidelity_lines(plain))
