"""The benchmark commands run and write JSON (their numbers are reported on issues, never asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_train_throughput_bench_writes_json(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--resolutions", "28", "--precisions",
                           "fp32", "--steps", "2", "--batch-size", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["resolution"] == 28 and rows[0]["img_per_s"] > 0 and rows[0]["peak_rss_MB"] > 0
    assert "img_per_s" in proc.stdout


def test_sampling_bench_writes_json(tmp_path, tiny_run):
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, str(BENCH / "sampling.py"), "--model", str(tiny_run), "--n", "4",
                           "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["scheduler"] for r in rows} == {"ddpm", "ddim", "pndm", "dpm++"}
    assert all(r["s_per_image"] > 0 for r in rows)


def test_peer_bench_sizes_peers_to_meddiff_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--resolutions", "32", "--peers", "meddiff",
                           "diffusers-example", "--steps", "2", "--batch-size", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["peer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"meddiff", "diffusers-example"}
    assert abs(rows["diffusers-example"]["params_vs_meddiff"] - 1) <= 0.10  # equal size within 10 %
    assert rows["meddiff"]["meddiff_speedup"] == 1.0 and rows["diffusers-example"]["img_per_s"] > 0
