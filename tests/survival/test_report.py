"""meddiff.survival.report: survival.md from the report dictionary of `meddiff survival`."""

import pytest

from meddiff.survival.report import write_markdown


def row(first_key, first, model, accuracy):
    return {
        first_key: first,
        "model": model,
        "accuracy": accuracy,
        "accuracy_std": 0.0125,
        "mse": 123456.7,
        "median_se": 2500.0,
        "std_se": 99999.4,
        "spearman_r": -0.1234,
        "features_kept": 12.5,
    }


@pytest.fixture
def report():
    return {
        "data": "/data/brats",
        "cases_used": 40,
        "cases_skipped": {"case9": "no segmentation", "case2": "no age"},
        "skip_summary": {"no segmentation": 1, "no age": 1},
        "features": {
            "count": 321,
            "classes": ["shape", "firstorder"],
            "regions": {"wt": "whole tumour (labels 1, 2)"},
            "modalities": ["t1ce", "flair"],
            "location": "tumour centroid",
            "normalisation": "z-score",
            "bin_width": 0.25,
        },
        "survival_classes": {
            "definition": "short < 300 days",
            "counts": {"short": 10, "mid": 20, "long": 10},
            "chance_accuracy": 0.5,
        },
        "validation": {"folds": 5, "repeats": 3, "seed": 7, "note": "fitted on training folds only"},
        "threshold_table": [row("filter", ">|0.10|", "random forest", 0.55)],
        "modality_table": [row("inputs", "T1CE", "linear", 0.4567)],
        "modality_table_rule": ">|0.10|",
        "kept_features": [
            {"rule": ">|0.10|", "count": 17, "features": [{"name": f"f{i}", "rho": 0.3 - i / 100} for i in range(17)]}
        ],
    }


def test_markdown_holds_every_table_and_number(report, tmp_path):
    text = write_markdown(tmp_path / "survival.md", report).read_text()
    assert text.startswith("# Overall survival from radiomic features\n") and text.endswith("\n")
    assert "40 cases used, 2 left out (no segmentation: 1, no age: 1)" in text
    assert "321 per case" in text and "T1CE, FLAIR" in text and "bin width 0.25" in text
    assert "5-fold cross-validation repeated 3 times (seed 7)" in text and "scores 0.500" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| filter | model |"))
    assert lines[header + 1] == "|" + "---|" * 8
    # a filter label with '|' is escaped so the table keeps its columns; numbers in their formats
    assert lines[header + 2] == (
        "| >\\|0.10\\| | random forest | 0.550 ± 0.013 | 123,457 | 2,500 | 99,999 | -0.123 | 12.5 |"
    )
    assert "| T1CE | linear | 0.457 ± 0.013 |" in text
    assert "- **>|0.10|**: 17 kept: f0 (+0.300)" in text and "f14 (+0.160), and 2 more" in text
    assert "f15" not in text
    cases = text.split("## Cases left out", 1)[1]
    assert cases.index("case2: no age") < cases.index("case9: no segmentation")  # sorted


def test_no_skipped_cases_no_section(report, tmp_path):
    report.update(cases_skipped={}, skip_summary={})
    text = write_markdown(tmp_path / "s.md", report).read_text()
    assert "40 cases used, 0 left out." in text and "Cases left out" not in text
