"""survival.md: the tables of `meddiff survival` as markdown."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("accuracy", "Accuracy", "{:.3f}"),
    ("mse", "MSE", "{:,.0f}"),
    ("median_se", "median SE", "{:,.0f}"),
    ("std_se", "std SE", "{:,.0f}"),
    ("spearman_r", "Spearman R", "{:.3f}"),
    ("features_kept", "features", "{:g}"),
]


def _table(rows: list[dict], first: str, first_title: str) -> list[str]:
    head = f"| {first_title} | model | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (2 + len(COLUMNS))]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        cells[0] += f" ± {row['accuracy_std']:.3f}"
        label = str(row[first]).replace("|", "\\|")  # filter labels such as >|0.10| inside a table
        lines.append(f"| {label} | {row['model']} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, report: dict) -> Path:
    f, s, v = report["features"], report["survival_classes"], report["validation"]
    lines = [
        "# Overall survival from radiomic features",
        "",
        f"Data: `{report['data']}`: {report['cases_used']} cases used, {len(report['cases_skipped'])} left out"
        + (
            " (" + ", ".join(f"{k}: {n}" for k, n in report["skip_summary"].items()) + ")"
            if report["skip_summary"]
            else ""
        )
        + ".",
        "",
        f"Features: {f['count']} per case: pyradiomics classes {', '.join(f['classes'])} per region "
        f"({'; '.join(f['regions'].values())}) and modality ({', '.join(m.upper() for m in f['modalities'])}); "
        f"{f['location']}; age. Intensities: {f['normalisation']}, bin width {f['bin_width']:g}.",
        "",
        f"Classes: {s['definition']}; counts {s['counts']}; always guessing the largest class scores "
        f"{s['chance_accuracy']:.3f}.",
        "",
        f"Validation: {v['folds']}-fold cross-validation repeated {v['repeats']} times (seed {v['seed']}); "
        f"{v['note']}. Metrics are means over repeats of the out-of-fold predictions; 'features' is the mean number "
        "the filter kept per fold.",
        "",
        "## By filter threshold (inputs: " + ", ".join(m.upper() for m in f["modalities"]) + ")",
        "",
        *_table(report["threshold_table"], "filter", "filter"),
        "",
        f"## By input modality (filter {report['modality_table_rule']}; shape, location and age in every row)",
        "",
        *_table(report["modality_table"], "inputs", "inputs"),
        "",
        "## Features kept (filter fitted on all cases, for reading)",
        "",
    ]
    for entry in report["kept_features"]:
        top = ", ".join(f"{x['name']} ({x['rho']:+.3f})" for x in entry["features"][:15])
        more = f", and {entry['count'] - 15} more" if entry["count"] > 15 else ""
        lines.append(f"- **{entry['rule']}**: {entry['count']} kept: {top}{more}")
    if report["cases_skipped"]:
        lines += ["", "## Cases left out", ""]
        lines += [f"- {case}: {reason}" for case, reason in sorted(report["cases_skipped"].items())]
    path.write_text("\n".join(lines) + "\n")
    return path
