"""`meddiff survival` end to end on synthetic BraTS-like cases whose survival depends on tumour size, position
and age."""

import json

import numpy as np
import pytest

pytest.importorskip("radiomics", reason="needs the survival extra: bash scripts/install.sh survival")

from meddiff.errors import MeddiffError  # noqa: E402
from meddiff.survival.run import SurvivalConfig, modality_columns, run_survival  # noqa: E402
from meddiff.survival.synthetic import write_synthetic_brats  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = write_synthetic_brats(tmp_path_factory.mktemp("brats"), n=40, size=20, seed=0)
    lines = (root / "survival_info.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 2)[0] + ",ALIVE (361 days later),GTR"  # one censored case
    (root / "survival_info.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("survival_out")
    config = SurvivalConfig(data=str(root), out=str(out), repeats=2, forest_trees=100)
    return run_survival(config, progress=False), out, root


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_recovers_the_survival_signal(report):
    result, out, _ = report
    assert result["cases_used"] == 39 and "censored" in result["cases_skipped"]["BraTS20_Training_001"]
    assert result["skip_summary"] == {"survival censored": 1}
    chance = result["survival_classes"]["chance_accuracy"]
    rows = {(r["filter"], r["model"]): r for r in result["threshold_table"]}
    assert len(rows) == 14  # 7 thresholds x 2 models
    best = max(r["accuracy"] for r in rows.values())
    assert best > max(0.55, chance + 0.1)  # three classes: chance 1/3, majority class `chance`
    assert max(r["spearman_r"] for r in rows.values()) > 0.6
    # with far more features than cases, the filter helps the linear model (the study's point)
    filtered = max(r["accuracy"] for (rule, model), r in rows.items() if model == "linear" and rule != "without")
    assert filtered > rows[("without", "linear")]["accuracy"] + 0.1
    assert {r["inputs"] for r in result["modality_table"]} == {"T1", "T1CE", "T2", "FLAIR", "all: T1, T1CE, T2, FLAIR"}


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_filter_keeps_the_informative_features(report):
    result, _, _ = report
    kept = {entry["rule"]: {f["name"]: f["rho"] for f in entry["features"]} for entry in result["kept_features"]}
    strict = kept[">|0.12|"]
    assert strict["wt_shape_VoxelVolume"] < -0.5  # bigger tumours, shorter survival
    assert strict["age"] < -0.2
    assert all(rho < -0.01 for rho in kept["<-0.01"].values())
    assert "wt_shape_VoxelVolume" in kept["<-0.10"] and "wt_location_CentroidDistance" not in kept["<-0.10"]


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_outputs_are_written(report):
    result, out, _ = report
    assert json.loads((out / "survival.json").read_text())["cases_used"] == 39
    md = (out / "survival.md").read_text()
    assert "| >\\|0.10\\| | linear |" in md and "## By input modality" in md and "300 days" in md
    header = (out / "features.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["case", "survival_days", "age"] and len(header) == result["features"]["count"] + 2
    assert len(list((out / "features").glob("*.json"))) == 39  # per-case cache


def test_modality_rows_use_their_own_intensity_features():
    names = ["age", "wt_shape_VoxelVolume", "wt_t1_firstorder_Mean", "wt_t2_glcm_Contrast", "et_location_OffsetX"]
    assert modality_columns(names, "t1").tolist() == [True, True, True, False, True]
    assert modality_columns(names, None).all()


def test_bad_options_are_one_line(tmp_path):
    root = write_synthetic_brats(tmp_path / "brats", n=6, size=20, seed=0)
    with pytest.raises(MeddiffError, match="unknown model"):
        run_survival(SurvivalConfig(data=str(root), out=str(tmp_path), models=("deep",)), progress=False)
    with pytest.raises(MeddiffError, match="cannot read filter threshold"):
        run_survival(SurvivalConfig(data=str(root), out=str(tmp_path), rules=("big",)), progress=False)
    with pytest.raises(MeddiffError, match="no usable case"):
        run_survival(SurvivalConfig(data=str(root), out=str(tmp_path), resection="biopsy"), progress=False)


def test_missing_extra_names_it(monkeypatch):
    import builtins

    from meddiff.survival import features

    real_import = builtins.__import__

    def no_radiomics(name, *args, **kwargs):
        if name == "radiomics":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_radiomics)
    with pytest.raises(MeddiffError, match=r"meddiff\[survival\]"):
        features.require_pyradiomics()


def test_broken_cases_are_counted_not_fatal(tmp_path, capsys):
    import nibabel as nib

    from meddiff.cli import main

    root = write_synthetic_brats(tmp_path / "brats", n=14, size=16, seed=3)
    seg = root / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.uint8), np.eye(4)), str(seg))
    t2 = root / "BraTS20_Training_003" / "BraTS20_Training_003_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 10), np.float32), np.eye(4)), str(t2))
    (root / "BraTS20_Training_004" / "BraTS20_Training_004_t1ce.nii.gz").unlink()
    out = tmp_path / "out"
    code = main(
        [
            "survival",
            "--data",
            str(root),
            "--out",
            str(out),
            "--thresholds",
            "none,|0.2|",
            "--model",
            "ridge",
            "--folds",
            "3",
            "--repeats",
            "1",
        ]
    )
    assert code == 0
    result = json.loads((out / "survival.json").read_text())
    assert result["cases_used"] == 11
    assert result["cases_skipped"] == {
        "BraTS20_Training_002": "empty segmentation",
        "BraTS20_Training_003": "mismatched shapes: seg (16, 16, 16), t1 (16, 16, 16), "
        "t1ce (16, 16, 16), t2 (16, 16, 10), flair (16, 16, 16)",
        "BraTS20_Training_004": "missing modality: t1ce",
    }
    assert "best: filter" in capsys.readouterr().out
    assert main(["survival", "--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meddiff: error:") and len(err.splitlines()) == 1
