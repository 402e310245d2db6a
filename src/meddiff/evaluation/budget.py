"""How much evaluation a finished training run gets: it scales with the run.

A 10-step smoke run should not spend ten minutes sampling 256 images for a fidelity table that cannot mean anything,
and a long run should get the full table. After training, `plan_evaluation` sizes the sample grids, the label-fidelity
sample and the prompt-response sample from what the run itself measured (steps, training seconds, training img/s):

- runs shorter than `eval.min_steps` get grids but no fidelity table, with a note saying why (too short to judge);
- the rest may spend at most `eval.time_share` x the training time (never less than a minute) on sampling; when the
  configured counts do not fit, fewer images are drawn (noted), and below `MIN_FIDELITY_IMAGES` the table is skipped;
- the estimate (an ETA) is logged before sampling starts.

Sampling cost per image is estimated from training speed: one sampled image costs `nfe` forward passes, and a forward
pass costs about half of a training image's forward + backward (`FORWARD_SPEEDUP`; measured 1.9x at 64 px on a
2-core CPU, more at 28 px, so the estimate errs towards fewer images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FORWARD_SPEEDUP = 2.0
MIN_FIDELITY_IMAGES = 64  # below this, per-label AUCs are noise: skip the table instead
MIN_GRID_PER_LABEL = 4
MIN_BUDGET_SECONDS = 60.0
GRID_SHARE = 0.25  # of the budget, at most, for the grids when it is tight


@dataclass(frozen=True)
class EvaluationPlan:
    grid_per_label: int
    fidelity_samples: int | None  # None: no fidelity table
    prompt_samples: int
    seconds_per_image: float | None  # estimated; None when training speed is unknown
    note: str | None  # what was reduced or skipped, and why (metrics.json, model card)

    @property
    def estimated_seconds(self) -> float | None:
        return None if self.seconds_per_image is None else self.seconds_per_image * self.images

    grid_count: int = 0  # grids drawn (labels + unconditional)
    prompt_count: int = 0  # prompts of the prompt-response table (text models)

    @property
    def images(self) -> int:
        fidelity = self.fidelity_samples or 0
        prompts = self.prompt_count * self.prompt_samples if self.fidelity_samples else 0
        return self.grid_count * self.grid_per_label + fidelity + prompts

    def describe(self) -> str:
        parts = [f"grids {self.grid_count} x {self.grid_per_label} images"]
        if self.fidelity_samples:
            parts.append(f"label fidelity {self.fidelity_samples} images")
            if self.prompt_count:
                parts.append(f"prompt response {self.prompt_count} x {self.prompt_samples} images")
        text = ", ".join(parts)
        eta = self.estimated_seconds
        if eta is not None:
            text += f": about {_duration(eta)} of sampling (estimated from training speed)"
        return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def plan_evaluation(
    *,
    steps: int,
    train_seconds: float,
    train_images_per_second: float,
    nfe: int,
    grid_count: int,
    grid_per_label: int,
    fidelity: bool,
    fidelity_samples: int,
    prompt_count: int,
    prompt_samples: int,
    min_steps: int,
    time_share: float,
) -> EvaluationPlan:
    """The evaluation a run of `steps` steps gets (see the module docstring). `nfe`: network evaluations per sampled
    image (guidance's second pass counted); `grid_count`: grids drawn (labels + unconditional); `prompt_count`:
    prompts of the prompt-response table (0 for label models); `fidelity`: whether the run measures it at all."""
    per_image = nfe / (FORWARD_SPEEDUP * train_images_per_second) if train_images_per_second > 0 else None
    budget = max(MIN_BUDGET_SECONDS, time_share * train_seconds) if time_share > 0 and per_image else math.inf
    notes = []
    grid = grid_per_label
    if per_image is not None and grid_count * grid * per_image > GRID_SHARE * budget:
        fits = int(GRID_SHARE * budget / (per_image * grid_count))
        grid = max(MIN_GRID_PER_LABEL, min(grid_per_label, fits))
        if grid < grid_per_label:
            notes.append(f"grids of {grid} images per label (eval.grid_per_label {grid_per_label}) to fit the budget")
    n: int | None = fidelity_samples if fidelity else None
    prompts = prompt_samples
    if fidelity and steps < min_steps:
        n = None
        notes.append(
            f"label fidelity not measured: {steps} training steps is too short to judge (eval.min_steps "
            f"{min_steps}; set it to 0 to measure anyway)"
        )
    elif fidelity and per_image is not None:
        left = budget - grid_count * grid * per_image
        wanted = fidelity_samples + prompt_count * prompt_samples
        scale = min(1.0, max(left, 0.0) / (per_image * wanted))
        if scale < 1.0:
            n = int(fidelity_samples * scale)
            prompts = max(1, int(prompt_samples * scale))
            if n < MIN_FIDELITY_IMAGES:
                notes.append(
                    f"label fidelity not measured: the evaluation budget ({time_share:g} x training time, at least "
                    f"{MIN_BUDGET_SECONDS:.0f} s) allows only {n} images, fewer than {MIN_FIDELITY_IMAGES}; train "
                    "longer or raise eval.time_share"
                )
                n = None
            else:
                notes.append(
                    f"label fidelity on {n} images instead of eval.fidelity_samples {fidelity_samples}, to keep "
                    f"evaluation within {time_share:g} x the training time (eval.time_share)"
                )
    return EvaluationPlan(
        grid_per_label=grid,
        fidelity_samples=n,
        prompt_samples=prompts,
        seconds_per_image=per_image,
        note="; ".join(notes) or None,
        grid_count=grid_count,
        prompt_count=prompt_count,
    )
