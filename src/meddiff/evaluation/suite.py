"""`meddiff evaluate`: every number about a synthetic set against real data, in metrics.json and report.html."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.spec import load_dataset, parse_spec
from meddiff.data.store import MappedImages
from meddiff.errors import MeddiffError
from meddiff.evaluation.classifier import per_label_auc, predict
from meddiff.evaluation.distribution import fid, kid, prdc
from meddiff.evaluation.diversity import diversity_by_condition
from meddiff.evaluation.downstream import DEFAULT_PROTOCOLS, check_protocols, downstream
from meddiff.evaluation.eval_report import EvaluationArtefacts, write_eval_report
from meddiff.evaluation.features import InceptionFeatures, domain_classifier, embed, require_optional, xrv_features
from meddiff.evaluation.memorization import audit
from meddiff.evaluation.results import (
    DistributionMetrics,
    Diversity,
    DownstreamResult,
    EvaluationResult,
    KidEstimate,
    LabelFidelityAUC,
    SimilarityGroup,
)


def synthetic_spec(text: str) -> str:
    """A folder written by `meddiff generate` (its manifest), or any dataset spec."""
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "manifest.csv").is_file():
            raise MeddiffError(f"{path} has no manifest.csv; pass a folder written by `meddiff generate` or a spec")
        return f"csv:{path / 'manifest.csv'}?split=all"
    return text


def align(data: ImageLabelDataset, names: list[str]) -> ImageLabelDataset:
    """The same images with labels in `names` order (labels the set lacks are unknown)."""
    lookup = {n.lower(): k for k, n in enumerate(data.label_names)}
    missing = [n for n in names if n.lower() not in lookup]
    if len(missing) == len(names):
        raise MeddiffError(f"the synthetic set's labels {data.label_names} share none with the real labels {names}")
    labels = torch.zeros(len(data), len(names))
    known = torch.zeros(len(data), len(names), dtype=torch.bool)
    for k, n in enumerate(names):
        if n.lower() in lookup:
            labels[:, k] = data.labels[:, lookup[n.lower()]]
            known[:, k] = data.known[:, lookup[n.lower()]]
    return ImageLabelDataset(data.images, labels, known, list(names), prompts=data.prompts, source=data.source)


def condition_keys(data: ImageLabelDataset) -> list[str]:
    keys = []
    for i in range(len(data)):
        present = [n for k, n in enumerate(data.label_names) if data.known[i, k] and data.labels[i, k] > 0.5]
        keys.append("+".join(present) if present else "none")
    return keys


def to01(images: torch.Tensor | MappedImages) -> np.ndarray:
    return ((images[:, 0].numpy() + 1) / 2).astype(np.float32)


def evaluate(
    real: str,
    synthetic: str,
    resolution: int | None = None,
    features: str = "domain",
    seeds: int = 3,
    classifier_epochs: int = 10,
    max_images: int | None = None,
    progress: bool = True,
    feature_weights: str | None = None,
    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS,
    fractions: tuple[float, ...] = (),
) -> tuple[EvaluationResult, EvaluationArtefacts]:
    """features picks the network behind FID/KID/precision-recall and the UMAP; label fidelity, the memorization
    audit and downstream utility always use the domain classifier."""
    require_optional(features, feature_weights)
    check_protocols(protocols, fractions)  # before anything is read or trained
    t0 = time.perf_counter()
    spec = parse_spec(real)
    syn_spec = synthetic_spec(synthetic)
    probe = load_dataset(syn_spec, resolution or 32)
    resolution = resolution or probe.resolution  # default: the synthetic images' own size (generated files)
    if resolution != probe.resolution:
        probe = load_dataset(syn_spec, resolution)
    train = load_dataset(spec, resolution)
    test = load_dataset(spec.heldout(), resolution)
    syn = align(probe, train.label_names)
    if max_images and len(syn) > max_images:
        syn = ImageLabelDataset(
            syn.images[:max_images],
            syn.labels[:max_images],
            syn.known[:max_images],
            syn.label_names,
            prompts=syn.prompts[:max_images],
        )
    clf = domain_classifier(train, str(spec), epochs=classifier_epochs, progress=progress)
    f_train, f_test, f_syn = embed(clf, train.images), embed(clf, test.images), embed(clf, syn.images)
    d_train, d_test, d_syn = f_train, f_test, f_syn  # the distribution features
    if features != "domain":
        if features == "inception":
            assert feature_weights is not None  # require_optional checked it
            extract = InceptionFeatures(feature_weights)
        else:
            extract = xrv_features(feature_weights)
        d_train, d_test, d_syn = extract(train.images), extract(test.images), extract(syn.images)
    kid_syn, kid_ref = kid(d_test, d_syn), kid(d_test, d_train)
    dist = DistributionMetrics(
        features=features,
        n_real_test=len(test),
        n_real_train=len(train),
        n_synthetic=len(syn),
        fid_synthetic_vs_real_test=fid(d_test, d_syn),
        fid_real_train_vs_real_test=fid(d_test, d_train),
        kid_synthetic_vs_real_test=KidEstimate(mean=kid_syn[0], std=kid_syn[1]),
        kid_real_train_vs_real_test=KidEstimate(mean=kid_ref[0], std=kid_ref[1]),
        **prdc(d_test, d_syn),
    )
    fidelity = LabelFidelityAUC(
        real_test_auc=per_label_auc(
            predict(clf, test.images), test.labels.numpy(), test.known.numpy(), train.label_names
        ),
        synthetic_auc=per_label_auc(predict(clf, syn.images), syn.labels.numpy(), syn.known.numpy(), train.label_names),
    )

    def groups(data: ImageLabelDataset) -> dict[str, SimilarityGroup]:
        by_condition = diversity_by_condition(to01(data.images), condition_keys(data))
        return {key: SimilarityGroup(**group) for key, group in by_condition.items()}

    diversity = Diversity(real_test=groups(test), synthetic=groups(syn))
    mem = audit(to01(syn.images), to01(train.images), f_syn, f_train, to01(test.images), f_test)
    utility = downstream(
        train,
        syn,
        test,
        seeds=seeds,
        epochs=classifier_epochs,
        progress=progress,
        protocols=protocols,
        fractions=fractions,
    )
    metrics = EvaluationResult(
        real=str(spec),
        synthetic=syn_spec,
        resolution=resolution,
        distribution=dist,
        label_fidelity=fidelity,
        diversity=diversity,
        memorization=mem.summary(),
        downstream={k: DownstreamResult.from_dict(v) for k, v in utility.items()},
        seconds=round(time.perf_counter() - t0, 1),
    )
    return metrics, EvaluationArtefacts(train, test, syn, (d_train, d_test, d_syn), mem)


def run_evaluation(real: str, synthetic: str, out: Path, **kw) -> Path:
    metrics, artefacts = evaluate(real, synthetic, **kw)
    out.mkdir(parents=True, exist_ok=True)
    metrics.write_json(out / "metrics.json")
    return write_eval_report(out, metrics, artefacts)
