"""The self-contained HTML report of `meddiff evaluate` (every figure embedded) plus a UMAP PNG."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.data.dataset import ImageLabelDataset
from meddiff.evaluation.memorization import MemorizationAudit
from meddiff.evaluation.report import figure, fmt, html_page, html_table
from meddiff.evaluation.results import AucInterval, EvaluationResult
from meddiff.sampling.grid import grid_png_bytes, upscale_for


@dataclass
class EvaluationArtefacts:
    """What the report draws besides the numbers."""

    train: ImageLabelDataset
    test: ImageLabelDataset
    synthetic: ImageLabelDataset
    features: tuple[np.ndarray, np.ndarray, np.ndarray]  # distribution features: train, test, synthetic
    audit: MemorizationAudit


def umap_png(
    real: np.ndarray, synthetic: np.ndarray, real_class: list[str], syn_class: list[str], name: str = "domain"
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap

    emb = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=0).fit_transform(np.concatenate([real, synthetic]))
    classes = sorted(set(real_class) | set(syn_class))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(classes)}
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    n = len(real)
    for c in classes:
        r = [i for i, k in enumerate(real_class) if k == c]
        s = [n + i for i, k in enumerate(syn_class) if k == c]
        ax.scatter(emb[r, 0], emb[r, 1], s=8, marker="o", color=colours[c], alpha=0.6, label=f"real: {c}")
        ax.scatter(emb[s, 0], emb[s, 1], s=14, marker="x", color=colours[c], alpha=0.8, label=f"synthetic: {c}")
    ax.set_title(f"UMAP of {name} features (o real, x synthetic)")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _first_class(data) -> list[str]:
    out = []
    for i in range(len(data)):
        present = [n for k, n in enumerate(data.label_names) if data.known[i, k] and data.labels[i, k] > 0.5]
        out.append(present[0] if len(present) == 1 else ("multiple" if present else "none"))
    return out


def write_eval_report(out: Path, m: EvaluationResult, art: EvaluationArtefacts) -> Path:
    train, test, syn = art.train, art.test, art.synthetic
    f_train, f_test, f_syn = art.features
    up = upscale_for(syn.resolution)
    to01 = lambda t: (t[:, 0].numpy() + 1) / 2  # noqa: E731
    d = m.distribution
    summary = html_table(
        ["metric", "value"],
        [
            ["real test / real train / synthetic images", f"{d.n_real_test} / {d.n_real_train} / {d.n_synthetic}"],
            [f"FID synthetic vs real test ({d.features} features)", d.fid_synthetic_vs_real_test],
            ["FID real train vs real test (reference)", d.fid_real_train_vs_real_test],
            [
                "KID synthetic vs real test",
                f"{d.kid_synthetic_vs_real_test.mean:.4f} ± {d.kid_synthetic_vs_real_test.std:.4f}",
            ],
            [
                "KID real train vs real test",
                f"{d.kid_real_train_vs_real_test.mean:.4f} ± {d.kid_real_train_vs_real_test.std:.4f}",
            ],
            ["precision / recall", f"{d.precision:.3f} / {d.recall:.3f}"],
            ["density / coverage", f"{d.density:.3f} / {d.coverage:.3f}"],
            ["memorization: flagged rate", m.memorization.rate_flagged],
        ],
    )
    samples = (
        "<div class='grids'>"
        + figure("real (test split)", grid_png_bytes(to01(test.images[:32]), 8, up))
        + figure("synthetic", grid_png_bytes(to01(syn.images[:32]), 8, up))
        + "</div>"
    )
    fid_rows = [[n, m.label_fidelity.real_test_auc[n], m.label_fidelity.synthetic_auc[n]] for n in train.label_names]
    fidelity = (
        "<p>ROC AUC of the classifier trained on the real training split, on the real test split and on the "
        "synthetic images against the labels they were generated with.</p>"
        + html_table(["label", "real test AUC", "synthetic AUC"], fid_rows)
    )

    def cell(entry: AucInterval | None) -> str:
        return "n/a" if entry is None else f"{entry.auc:.3f} [{entry.ci95[0]:.3f}, {entry.ci95[1]:.3f}]"

    ds = m.downstream
    sets = list(ds)
    down_rows = [[n, *(cell(ds[s].auc.get(n)) for s in sets)] for n in train.label_names]
    down_rows.append(["macro AUC", *(fmt(ds[s].mean_auc) for s in sets)])
    recall_rows = [[n, *(fmt((ds[s].recall or {}).get(n)) for s in sets)] for n in train.label_names]
    first = ds[sets[0]]
    downstream = (
        f"<p>The same classifier recipe trained on each set ({first.seeds} seeds), tested on the real "
        "test split: AUC averaged over seeds [bootstrap 95 % interval].</p>"
        + html_table(["label", *(f"{s} (n={ds[s].n_train})" for s in sets)], down_rows)
        + "<p>Recall (sensitivity) at probability 0.5, mean over seeds: where a rare class is found or missed.</p>"
        + html_table(["label", *sets], recall_rows)
        + "<ul>"
        + "".join(f"<li><b>{s}</b>: {ds[s].protocol}</li>" for s in sets if ds[s].protocol)
        + "</ul>"
    )
    div_rows = []
    for key, v in m.diversity.synthetic.items():
        r = m.diversity.real_test.get(key)
        div_rows.append([key, v.n, v.similarity, r.similarity if r else None, v.metric])
    diversity = "<p>Mean pairwise similarity within each condition (lower = more diverse).</p>" + html_table(
        ["condition", "n synthetic", "synthetic", "real test", "metric"], div_rows
    )
    mem, audit = m.memorization, art.audit
    top = audit.top(8)
    pairs = np.stack(
        [np.stack([to01(syn.images[[i]])[0], to01(train.images[[int(audit.pixel_match[i])]])[0]]) for i in top]
    ).reshape(-1, syn.resolution, syn.resolution)
    memo = (
        f"<p>Nearest training image of every synthetic image. Thresholds are the 99th percentile of the same "
        f"similarities for real held-out images: pixel correlation {mem.pixel_threshold:.4f}, feature cosine "
        f"{mem.feature_threshold:.4f}. Flagged: {fmt(mem.rate_flagged)} (pixel {fmt(mem.rate_pixel)}, "
        f"feature {fmt(mem.rate_feature)}, kNN distance ratio below {mem.knn_ratio_threshold:.3f} (the 1st "
        f"percentile of held-out real images): {fmt(mem.rate_knn_ratio)}, median ratio "
        f"{fmt(mem.median_knn_ratio)}); pixel correlation above 0.95: {fmt(mem.rate_pixel_above_095)}.</p>"
        + figure(
            "closest pairs: synthetic (left) | nearest training image (right); correlations "
            + ", ".join(f"{audit.pixel_similarity[i]:.3f}" for i in top),
            grid_png_bytes(pairs, 4, up),
        )
    )
    umap_bytes = umap_png(f_test, f_syn, _first_class(test), _first_class(syn), d.features)
    (out / "umap.png").write_bytes(umap_bytes)
    page = html_page(
        "meddiff evaluation",
        [
            ("Summary", f"<p>real: {m.real}<br>synthetic: {m.synthetic}</p>" + summary),
            ("Samples", samples),
            ("Label fidelity", fidelity),
            ("Downstream utility", downstream),
            ("Diversity", diversity),
            ("Memorization audit", memo),
            ("UMAP", figure(f"{d.features} features", umap_bytes)),
        ],
    )
    path = out / "report.html"
    path.write_text(page)
    return path
