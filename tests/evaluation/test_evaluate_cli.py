import json
import re

import pytest

from meddiff.cli import main


@pytest.mark.slow  # the fast lane (-m 'not slow') skips it; see CONTRIBUTING.md
def test_evaluate_writes_metrics_and_a_self_contained_report(tmp_path, tiny_run, phantom_dir, capsys):
    gen = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_run),
                "--conditions",
                str(phantom_dir / "valid.csv"),
                "--n",
                "24",
                "--out",
                str(gen),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--real",
                f"phantom:{phantom_dir}",
                "--synthetic",
                str(gen),
                "--out",
                str(out),
                "--seeds",
                "2",
                "--classifier-epochs",
                "2",
                "--protocols",
                "all",
                "--real-fractions",
                "0.5",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    protocols = ["real", "synthetic", "real+synthetic", "synthetic->real", "real-reweighted"]
    assert list(m["downstream"]) == [*protocols, "real 50%", "real 50%+synthetic"]
    ds = m["downstream"]
    assert (
        ds["synthetic->real"]["n_train"] == ds["real"]["n_train"] and "fine-tuned" in ds["synthetic->real"]["protocol"]
    )
    assert ds["real 50%+synthetic"]["n_train"] == ds["real 50%"]["n_train"] + 24
    assert all(0 <= v <= 1 for v in ds["real-reweighted"]["recall"].values() if v is not None)
    page = (out / "report.html").read_text()
    assert "Recall (sensitivity)" in page and "real 50%+synthetic (n=" in page

    d = m["distribution"]
    assert d["n_synthetic"] == 24 and d["fid_synthetic_vs_real_test"] > 0 and "std" in d["kid_synthetic_vs_real_test"]
    assert m["downstream"]["real"]["seeds"] == 2
    assert 0 <= m["memorization"]["rate_flagged"] <= 1
    assert "Cardiomegaly" in m["label_fidelity"]["synthetic_auc"]
    page = (out / "report.html").read_text()
    for section in ("Summary", "Label fidelity", "Downstream utility", "Diversity", "Memorization audit", "UMAP"):
        assert f"<h2>{section}</h2>" in page
    assert len(re.findall(r"data:image/png;base64,", page)) >= 4 and "http" not in page.split("</style>")[1]
    assert (out / "umap.png").stat().st_size > 1000
    assert main(["evaluate", "--real", f"phantom:{phantom_dir}", "--synthetic", str(tmp_path), "--out", str(out)]) == 2
    assert "no manifest.csv" in capsys.readouterr().err
    assert (
        main(
            [
                "evaluate",
                "--real",
                f"phantom:{phantom_dir}",
                "--synthetic",
                str(gen),
                "--out",
                str(out),
                "--features",
                "xrv",
            ]
        )
        == 2
    )
    assert "torchxrayvision" in capsys.readouterr().err
