"""Evaluation after training scales with the run: short runs skip the fidelity table with a note, tight budgets draw
fewer images (noted), long runs get everything they asked for."""

import pytest

from meddiff.evaluation.budget import MIN_FIDELITY_IMAGES, MIN_GRID_PER_LABEL, plan_evaluation


def plan(**overrides):
    args = dict(
        steps=2000,
        train_seconds=600.0,
        train_images_per_second=120.0,
        nfe=40,
        grid_count=7,
        grid_per_label=16,
        fidelity=True,
        fidelity_samples=384,
        prompt_count=0,
        prompt_samples=48,
        min_steps=200,
        time_share=1.0,
    )
    return plan_evaluation(**{**args, **overrides})


def test_a_long_run_gets_the_full_evaluation_and_an_eta():
    p = plan()
    assert (p.grid_per_label, p.fidelity_samples, p.note) == (16, 384, None)
    # 40 forward passes at half a training image's cost each: 1/6 s per image, (7 x 16 + 384) images
    assert p.estimated_seconds == pytest.approx((7 * 16 + 384) * 40 / 240)
    assert "label fidelity 384 images" in p.describe() and "about 83 s" in p.describe()


def test_a_run_below_min_steps_gets_grids_but_no_fidelity_with_a_note():
    p = plan(steps=10)
    assert p.fidelity_samples is None and p.grid_per_label == 16
    assert "10 training steps is too short to judge" in p.note and "eval.min_steps 200" in p.note
    assert plan(steps=10, min_steps=0).fidelity_samples == 384  # asked to measure anyway


def test_a_slow_short_run_draws_small_grids_and_skips_fidelity_it_cannot_afford():
    # the smoke run: 64 px at 5.6 img/s on the slower CPU, a minute of training; 256 images would take
    # ~15 minutes of sampling
    p = plan(steps=300, train_seconds=60.0, train_images_per_second=5.6, fidelity_samples=256)
    assert p.grid_per_label == MIN_GRID_PER_LABEL and p.fidelity_samples is None
    assert "allows only" in p.note and f"fewer than {MIN_FIDELITY_IMAGES}" in p.note and "grids of 4" in p.note


def test_a_tight_budget_draws_fewer_fidelity_images_and_says_so():
    p = plan(train_seconds=300.0, train_images_per_second=20.0)  # 1 s per image, 300 s budget
    assert MIN_FIDELITY_IMAGES <= p.fidelity_samples < 384
    assert p.estimated_seconds <= 300.0 + 1e-6  # within time_share x training time
    assert f"label fidelity on {p.fidelity_samples} images instead of eval.fidelity_samples 384" in p.note


def test_prompt_samples_shrink_with_the_fidelity_sample():
    full = plan(prompt_count=9)
    tight = plan(prompt_count=9, train_seconds=300.0, train_images_per_second=20.0)
    assert full.prompt_samples == 48 and 1 <= tight.prompt_samples < 48
    assert "prompt response 9 x" in tight.describe()


@pytest.mark.parametrize("overrides", [{"time_share": 0.0}, {"train_images_per_second": 0.0}])
def test_no_limit_when_asked_or_when_speed_is_unknown(overrides):
    p = plan(**{"train_seconds": 1.0, "train_images_per_second": 1.0, **overrides})
    assert (p.grid_per_label, p.fidelity_samples, p.note) == (16, 384, None)


def test_models_without_fidelity_only_plan_grids():
    p = plan(fidelity=False, steps=1)
    assert p.fidelity_samples is None and p.note is None and "label fidelity" not in p.describe()
