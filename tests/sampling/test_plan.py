"""meddiff.sampling.plan: what `meddiff generate` makes, one condition per image, from labels, a prompt, nothing
(unconditional) or a conditions CSV; bad input is a one-line MeddiffError."""

import pytest
import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.errors import MeddiffError
from meddiff.sampling.plan import _repeat, make_plan

NAMES = ["Cardiomegaly", "Edema", "Pneumothorax"]


@pytest.fixture
def codec():
    return LabelCodec(NAMES)


def write_csv(tmp_path, text, name="c.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_repeat_cycles_rows_and_repeats_each():
    assert _repeat(3, None, None) == [0, 1, 2]
    assert _repeat(3, None, 2) == [0, 0, 1, 1, 2, 2]
    assert _repeat(3, 7, None) == [0, 1, 2, 0, 1, 2, 0]
    assert _repeat(2, 5, 2) == [0, 0, 1, 1, 0]
    assert _repeat(4, 2, None) == [0, 1]


def test_balance_gives_every_label_alone_in_equal_counts(codec):
    plan = make_plan(codec, balance=True, n=7)
    assert len(plan) == 7 and plan.source == "balanced over 3 labels" and plan.known.all()
    keys = [plan.key(i, NAMES) for i in range(7)]
    assert keys == ["Cardiomegaly", "Edema", "Pneumothorax"] * 2 + ["Cardiomegaly"]
    each = make_plan(codec, balance=True, per_condition=4)
    assert len(each) == 12 and each.labels.sum(0).tolist() == [4.0, 4.0, 4.0] and (each.labels.sum(1) == 1).all()
    with pytest.raises(MeddiffError, match="--balance needs a label-conditioned model"):
        make_plan(LabelCodec([]), balance=True, n=4)


def test_labels_give_n_identical_conditions(codec):
    plan = make_plan(codec, labels_text="edema, Pneumothorax", n=5)
    assert len(plan) == 5 and plan.source == "labels edema, Pneumothorax"
    assert plan.labels.tolist() == [[0.0, 1.0, 1.0]] * 5
    assert plan.known.all()  # unspecified labels are known-absent by default
    assert plan.prompts == [None] * 5
    assert plan.key(0, NAMES) == "Edema+Pneumothorax"
    unknown = make_plan(codec, labels_text="Edema", n=1, unspecified="unknown")
    assert unknown.known.tolist() == [[False, True, False]]


def test_default_count_is_16(codec):
    assert len(make_plan(codec, unconditional=True)) == 16
    assert len(make_plan(codec, labels_text="Edema", per_condition=3)) == 3


def test_unconditional_and_prompt_plans(codec):
    plan = make_plan(codec, unconditional=True, n=2)
    assert not plan.known.any() and plan.key(1, NAMES) == "unconditional" and plan.source == "unconditional"
    text = make_plan(codec, prompt="chest x-ray with edema", n=3)
    assert text.prompts == ["chest x-ray with edema"] * 3 and text.key(2, NAMES) == "chest x-ray with edema"
    assert not text.known.any()


def test_conditions_csv_mirrors_rows_and_keeps_missing_labels_unknown(codec, tmp_path):
    path = write_csv(tmp_path, "Path,cardiomegaly,Edema,Site\na.png,1.0,,x\nb.png,-1.0,0.0,y\nc.png,0.0,1,z\n")
    plan = make_plan(codec, conditions=path)
    assert len(plan) == 3 and plan.source == f"conditions {path}"  # one image per row unless n is given
    # Cardiomegaly: 1, uncertain (ignored -> unknown), 0; Edema: blank = absent, 0, 1; Pneumothorax: no column
    assert plan.labels.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert plan.known.tolist() == [[True, True, False], [False, True, False], [True, True, False]]
    assert [plan.key(i, NAMES) for i in range(3)] == ["Cardiomegaly", "none of the labels", "Edema"]
    ones = make_plan(codec, conditions=path, uncertain="ones")
    assert ones.labels[1, 0] == 1.0 and ones.known[1, 0]
    cycled = make_plan(codec, conditions=path, n=5)
    assert torch.equal(cycled.labels[3:], plan.labels[:2])


def test_conditions_csv_prompt_column(codec, tmp_path):
    path = write_csv(tmp_path, "Prompt\nchest x-ray\nchest x-ray with edema\n")
    plan = make_plan(codec, conditions=path, per_condition=2)
    assert plan.prompts == ["chest x-ray", "chest x-ray", "chest x-ray with edema", "chest x-ray with edema"]
    assert not plan.known.any()


def test_fingerprint_follows_the_conditions(codec):
    a = make_plan(codec, labels_text="Edema", n=4)
    assert a.fingerprint() == make_plan(codec, labels_text="Edema", n=4).fingerprint()
    assert a.fingerprint() != make_plan(codec, labels_text="Cardiomegaly", n=4).fingerprint()
    assert a.fingerprint() != make_plan(codec, labels_text="Edema", n=5).fingerprint()
    assert make_plan(codec, prompt="a", n=1).fingerprint() != make_plan(codec, prompt="b", n=1).fingerprint()


@pytest.mark.parametrize(
    "csv_text, kwargs, message",
    [
        (None, {}, "say what to generate"),
        (None, {"prompt": "  "}, "--prompt is empty"),
        (None, {"labels_text": "Edema,Nope"}, "unknown label 'Nope'"),
        (None, {"labels_text": " , "}, "--labels is empty"),
        ("Path,Site\na.png,x\n", {}, "no column matching the model's labels"),
        ("Path,Edema\n", {}, "has no rows"),
        ("Path,Edema\na.png,1\nb.png,2\n", {}, "line 3: label value '2' is not 1, 0, -1 or blank"),
    ],
)
def test_bad_input_is_one_line(codec, tmp_path, csv_text, kwargs, message):
    if csv_text is not None:
        kwargs = {**kwargs, "conditions": write_csv(tmp_path, csv_text)}
    with pytest.raises(MeddiffError, match=message) as info:
        make_plan(codec, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_conditions_file(codec, tmp_path):
    with pytest.raises(MeddiffError, match="not found"):
        make_plan(codec, conditions=str(tmp_path / "absent.csv"))
