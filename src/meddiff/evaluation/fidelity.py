"""Label fidelity: does an image generated for a label show that label? A classifier trained on real
training images scores generated images against the labels they were generated with (per-label ROC AUC),
next to its AUC on held-out real images (the ceiling)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.data.dataset import ImageLabelDataset
from meddiff.evaluation.classifier import per_label_auc, predict
from meddiff.evaluation.fairness import fairness_table, subgroups
from meddiff.evaluation.results import FidelityReport, PromptResponseReport
from meddiff.models.pipeline import MedDiffusionPipeline
from meddiff.sampling.generate import SamplingSettings, sample


@dataclass
class FidelityResult:
    real_auc: dict[str, float | None]
    synthetic_auc: dict[str, float | None]
    n_real: int
    n_synthetic: int
    settings: dict
    seconds: float
    images: np.ndarray  # the generated images (N, H, W) in [0, 1]
    labels: np.ndarray
    classifier: object = None  # the real-trained classifier (for further checks such as prompt_response)
    known: np.ndarray | None = None  # (N, K) which generation labels were specified
    subgroups: dict | None = None  # fairness table (evaluation/fairness.py) for demographically conditioned models

    def report(self, prompt_response: PromptResponse | None = None) -> FidelityReport:
        """What is saved (fidelity.json; "fidelity" in a run's metrics.json)."""

        def mean(d):
            vals = [v for v in d.values() if v is not None]
            return float(np.mean(vals)) if vals else None

        return FidelityReport(
            real_auc=self.real_auc,
            synthetic_auc=self.synthetic_auc,
            mean_real_auc=mean(self.real_auc),
            mean_synthetic_auc=mean(self.synthetic_auc),
            n_real_heldout=self.n_real,
            n_synthetic=self.n_synthetic,
            sampling=self.settings,
            seconds=round(self.seconds, 1),
            prompt_response=prompt_response.report() if prompt_response is not None else None,
            subgroups=self.subgroups,
        )

    def to_dict(self) -> dict:
        return self.report().to_dict()

    def table(self) -> str:
        lines = [f"{'label':<22}{'real AUC':>10}{'synthetic AUC':>15}"]
        fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
        for name in self.real_auc:
            lines.append(f"{name:<22}{fmt(self.real_auc[name]):>10}{fmt(self.synthetic_auc[name]):>15}")
        return "\n".join(lines)


def at_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, R, R) images -> (N, 1, size, size) by area averaging when the classifier works at a smaller size
    (eval.classifier_size), unchanged otherwise."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="area")


def label_fidelity(
    pipe: MedDiffusionPipeline,
    train: ImageLabelDataset,
    heldout: ImageLabelDataset,
    n_samples: int,
    settings: SamplingSettings,
    classifier_epochs: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> FidelityResult:
    t0 = time.perf_counter()
    # the same real-trained classifier as `meddiff evaluate`, cached by data spec: reruns and other models on the
    # same data do not train it again
    from meddiff.evaluation.features import domain_classifier, embed

    classifier = domain_classifier(
        train, train.source or "unnamed", epochs=classifier_epochs, seed=seed, progress=progress, device=pipe.device
    )  # beside the model (--device)
    names = train.label_names
    real_probs = predict(classifier, heldout.images)
    real_auc = per_label_auc(real_probs, heldout.labels.numpy(), heldout.known.numpy(), names)
    # condition rows mirror the held-out label distribution (co-occurrences included)
    rows = np.random.default_rng(seed).choice(len(heldout), size=n_samples, replace=n_samples > len(heldout))
    labels, known = heldout.labels[rows], heldout.known[rows]
    conditions = LabelCodec(names).encode(labels, known)
    images = sample(pipe, conditions, settings, progress=progress)
    scaled = at_size(torch.from_numpy(images).unsqueeze(1) * 2 - 1, train.resolution)
    probs = predict(classifier, scaled)
    synthetic_auc = per_label_auc(probs, labels.numpy(), known.numpy(), names)
    table = None
    if subgroups(names):  # demographic conditions: the same numbers per subgroup
        real_side = (real_probs, heldout.labels.numpy(), heldout.known.numpy(), embed(classifier, heldout.images))
        table = fairness_table(names, real_side, (probs, labels.numpy(), known.numpy(), embed(classifier, scaled)))
    return FidelityResult(
        real_auc,
        synthetic_auc,
        len(heldout),
        n_samples,
        {"steps": settings.steps, "guidance": settings.guidance, "scheduler": settings.scheduler},
        time.perf_counter() - t0,
        images,
        labels.numpy(),
        classifier,
        known.numpy(),
        table,
    )


@dataclass
class PromptResponse:
    """For each prompt, the fraction of its generated images the real-trained classifier calls positive per label."""

    prompts: list[str]
    label_names: list[str]
    positive_rate: np.ndarray  # (P, K)
    mean_probability: np.ndarray  # (P, K)
    n_per_prompt: int
    # the same classifier on held-out real images showing what the prompt names (the reachable rate; NaN where the
    # held-out split has no such image), and how many there were
    real_positive_rate: np.ndarray | None = None  # (P, K)
    real_count: list[int] | None = None

    def report(self) -> PromptResponseReport:
        def per_prompt(rates: np.ndarray) -> dict[str, dict[str, float | None]]:
            return {
                p: dict(zip(self.label_names, [None if np.isnan(v) else float(v) for v in r]))
                for p, r in zip(self.prompts, rates)
            }

        real_rate, real_count = self.real_positive_rate, self.real_count
        return PromptResponseReport(
            n_per_prompt=self.n_per_prompt,
            label_names=self.label_names,
            real_positive_rate=per_prompt(real_rate) if real_rate is not None else None,
            real_count=dict(zip(self.prompts, real_count))
            if real_rate is not None and real_count is not None
            else None,
            positive_rate=per_prompt(self.positive_rate),
            mean_probability=per_prompt(self.mean_probability),
        )

    def to_dict(self) -> dict:
        return self.report().to_dict()

    def table(self) -> str:
        short = [n[:10] for n in self.label_names]
        lines = [f"{'prompt':<58}" + "".join(f"{s:>11}" for s in short)]
        real_rate, real_count = self.real_positive_rate, self.real_count
        for i, (p, row) in enumerate(zip(self.prompts, self.positive_rate)):
            lines.append(f"{p[:57]:<58}" + "".join(f"{v:>11.2f}" for v in row))
            if real_rate is not None and real_count is not None and real_count[i]:
                lines.append(
                    f"{'  real held-out images with these findings (n=' + str(real_count[i]) + ')':<58}"
                    + "".join(f"{v:>11.2f}" for v in real_rate[i])
                )
        return "\n".join(lines)


def default_prompts(names: list[str], pairs: int = 3) -> list[str]:
    """One prompt per finding, a few two-finding prompts, and the normal prompt."""
    from meddiff.data.prompts import NORMAL_NAMES, prompt_from_labels

    findings = [n for n in names if n.lower() not in NORMAL_NAMES]
    prompts = [prompt_from_labels([n]) for n in findings]
    combos = [(findings[i], findings[j]) for i in range(len(findings)) for j in range(i + 1, len(findings))]
    prompts += [prompt_from_labels(list(c)) for c in combos[:pairs]]
    normal = [n for n in names if n.lower() in NORMAL_NAMES]
    if normal:
        prompts.append(prompt_from_labels(normal))
    return prompts


def prompt_findings(prompt: str, names: list[str]) -> list[str]:
    """The label names a prompt mentions (case-insensitive); [] for a normal / no-finding prompt."""
    from meddiff.data.prompts import NORMAL_NAMES

    text = prompt.lower()
    return [n for n in names if n.lower() not in NORMAL_NAMES and n.lower() in text]


def matching_rows(heldout: ImageLabelDataset, findings: list[str]) -> np.ndarray:
    """Held-out rows showing exactly `findings` among the known findings (none of them for a normal prompt)."""
    from meddiff.data.prompts import NORMAL_NAMES

    labels, known = heldout.labels.numpy() > 0.5, heldout.known.numpy()
    keep = np.ones(len(heldout), dtype=bool)
    for k, name in enumerate(heldout.label_names):
        if name.lower() in NORMAL_NAMES:
            continue
        want = name in findings
        keep &= known[:, k] & (labels[:, k] == want) if want else ~(known[:, k] & labels[:, k])
    return np.flatnonzero(keep)


def prompt_response(
    pipe,
    classifier,
    prompts: list[str],
    names: list[str],
    n_per_prompt: int,
    settings: SamplingSettings,
    threshold: float = 0.5,
    progress: bool = True,
    heldout: ImageLabelDataset | None = None,
) -> PromptResponse:
    """Does "cardiomegaly and pleural effusion" give both findings, and "cardiomegaly" only the one? With `heldout`,
    each prompt is set beside real held-out images showing the same findings: a classifier that calls only 40 % of
    real effusions positive cannot be expected to call 90 % of generated ones positive."""
    all_prompts = [p for p in prompts for _ in range(n_per_prompt)]
    conditions = torch.zeros(len(all_prompts), 2 * len(pipe.label_names))
    images = sample(pipe, conditions, settings, prompts=all_prompts, progress=progress)
    size = heldout.resolution if heldout is not None else images.shape[-1]
    generated = at_size(torch.from_numpy(images).unsqueeze(1) * 2 - 1, size)
    probs = predict(classifier, generated).reshape(len(prompts), n_per_prompt, -1)
    real_rate, real_count = None, None
    if heldout is not None:
        real_probs = predict(classifier, heldout.images)
        real_rate = np.full((len(prompts), len(names)), np.nan)
        real_count = []
        for i, prompt in enumerate(prompts):
            rows = matching_rows(heldout, prompt_findings(prompt, names))
            real_count.append(int(len(rows)))
            if len(rows):
                real_rate[i] = (real_probs[rows] > threshold).mean(0)
    return PromptResponse(
        list(prompts), list(names), (probs > threshold).mean(1), probs.mean(1), n_per_prompt, real_rate, real_count
    )
