"""Demographic conditions on the model side: per-group dropout, --sex/--age/--view checked against what the model
saw, demographic groups left open unless asked for, and a model trained with them generating to order."""

import csv
import json

import pytest
import torch

from meddiff.conditioning.demographics import AttributeGroups, condition_values
from meddiff.conditioning.labels import LabelCodec
from meddiff.errors import MeddiffError
from meddiff.sampling.plan import make_plan, with_attributes

NAMES = ["Cardiomegaly", "Female", "Age 18-39", "Age 40-59", "Age 60-79", "Age 80+", "View PA", "View AP"]
COUNTS = {"Cardiomegaly": 5, "Female": 9, "Age 18-39": 4, "Age 40-59": 6, "Age 60-79": 0, "Age 80+": 0}
COUNTS |= {"View PA": 7, "View AP": 3}


def test_groups_are_found_by_name_and_dropped_each_on_its_own():
    groups = AttributeGroups.of(NAMES)
    assert groups.groups == {"sex": (1,), "age": (2, 3, 4, 5), "view": (6, 7)}
    assert not AttributeGroups.of(["Cardiomegaly"])
    known = torch.ones(4000, len(NAMES), dtype=torch.bool)
    dropped = groups.drop(known, 0.3, torch.Generator().manual_seed(0))
    assert dropped[:, 0].all()  # findings are never dropped here (cond_dropout drops whole conditions)
    for columns in groups.groups.values():
        cols = dropped[:, list(columns)]
        assert (cols.all(1) | ~cols.any(1)).all()  # a group goes as a whole
        assert 0.25 < (~cols[:, 0]).float().mean() < 0.35
    sex_off, age_off = ~dropped[:, 1], ~dropped[:, 2]
    assert 0.05 < (sex_off & age_off).float().mean() < 0.13  # independently (0.09 expected)
    assert groups.drop(known, 0.0, torch.Generator()) is known


def test_condition_values_set_whole_groups():
    v = condition_values(NAMES, sex="f", age=45, view="AP", counts=COUNTS)
    assert v == {
        "Female": 1.0,
        "Age 18-39": 0.0,
        "Age 40-59": 1.0,
        "Age 60-79": 0.0,
        "Age 80+": 0.0,
        "View PA": 0.0,
        "View AP": 1.0,
    }
    assert condition_values(NAMES, sex="M")["Female"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"age": 70}, r"age 70 is outside the ages this model was trained on \(18-59\)"),
        ({"age": 12}, r"age 12 is outside the ages this model was trained on \(18-59\)"),
        ({"sex": "x"}, "--sex must be F or M"),
        ({"view": "Lateral"}, r"--view 'Lateral' is not a view this model was trained on \(PA, AP\)"),
    ],
)
def test_values_the_model_never_saw_are_one_line_errors(kwargs, message):
    with pytest.raises(MeddiffError, match=message):
        condition_values(NAMES, counts=COUNTS, **kwargs)


def test_a_model_without_the_group_says_how_to_get_it():
    with pytest.raises(MeddiffError, match="no age condition .* demographics=age"):
        condition_values(["Cardiomegaly"], age=50)


def test_labels_leave_demographic_groups_open_unless_named():
    codec = LabelCodec(NAMES)
    plan = make_plan(codec, labels_text="Cardiomegaly", n=2)
    assert plan.known[:, 0].all() and not plan.known[:, 1:].any()  # not "male, no age, no view"
    named = make_plan(codec, labels_text="Cardiomegaly,Age 40-59", n=1)
    assert named.known[0, 2:6].all() and named.labels[0, 2:6].tolist() == [0, 1, 0, 0] and not named.known[0, 1]
    balanced = make_plan(codec, balance=True, n=3)
    assert balanced.labels[:, 0].tolist() == [1, 1, 1] and not balanced.known[:, 1:].any()  # findings only
    ordered = with_attributes(plan, NAMES, condition_values(NAMES, sex="M", age=30))
    assert ordered.known[:, :6].all() and not ordered.known[:, 6:].any()
    assert ordered.labels[0, :6].tolist() == [1, 0, 1, 0, 0, 0] and "male" in ordered.source


def test_a_model_trained_with_demographics_generates_to_order(tmp_path, capsys):
    from meddiff.cli import main
    from meddiff.data.spec import load_dataset
    from meddiff.models.factory import ModelConfig
    from meddiff.models.storage import training_label_counts
    from meddiff.training.config import TrainConfig
    from meddiff.training.loop import train

    config = TrainConfig(
        data="phantom:?n=64&seed=3&demographics=sex,age",
        out=str(tmp_path / "run"),
        max_steps=2,
        batch_size=8,
        checkpoint_every=0,
        lr_warmup_steps=1,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    train(config, load_dataset(config.data, 32), progress=False)
    counts = training_label_counts(tmp_path / "run")
    assert counts["Age 0-17"] == 0 and counts["Female"] > 0  # saved with the pipeline
    out = tmp_path / "gen"
    command = ["generate", "--model", str(tmp_path / "run"), "--labels", "Edema", "--n", "2", "--steps", "1"]
    assert main([*command, "--sex", "F", "--age", "72", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["Female"] for r in rows] == ["1.0", "1.0"] and rows[0]["Age 60-79"] == "1.0"
    assert rows[0]["Sex"] == "Female"  # CheXpert's own column too
    assert rows[0]["Edema"] == "1.0" and rows[0]["Age 18-39"] == "0.0"
    assert main([*command, "--age", "10", "--out", str(tmp_path / "g2")]) == 2
    assert "age 10 is outside the ages this model was trained on (18+)" in capsys.readouterr().err
    assert main([*command, "--view", "PA", "--out", str(tmp_path / "g3")]) == 2
    assert "no view condition" in capsys.readouterr().err
    # the fairness table: fidelity and FID per subgroup
    fi = tmp_path / "fi"
    data = "phantom:?n=64&seed=3&demographics=sex,age"
    args = ["fidelity", "--model", str(tmp_path / "run"), "--data", data, "--n", "32", "--steps", "1"]
    assert main([*args, "--out", str(fi)]) == 0
    report = json.loads((fi / "fidelity.json").read_text())
    table = report["subgroups"]
    assert {"female", "male", "Age 18-39", "Age 80+"} <= set(table)
    assert table["female"]["n_synthetic"] + table["male"]["n_synthetic"] == 32
    assert set(table["female"]["synthetic_auc"]) == {
        "No Finding",
        "Cardiomegaly",
        "Pleural Effusion",
        "Pneumothorax",
        "Consolidation",
        "Edema",
    }
