"""`meddiff env`: what it reports on this CPU machine, its JSON, and the advice it gives for known problems."""

import json
import os
import subprocess
import sys
from dataclasses import replace

from meddiff import environment as env


def run_env(*args, extra_env=None):
    environ = dict(os.environ, HF_HUB_OFFLINE="1", **(extra_env or {}))
    return subprocess.run(
        [sys.executable, "-m", "meddiff.cli", "env", *args], capture_output=True, text=True, env=environ, timeout=300
    )


def test_env_json_reports_versions_devices_precision_distributed_extras_hub_and_caches(tmp_path):
    proc = run_env(
        "--json",
        extra_env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MEDDIFF_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    import torch

    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["packages"]["diffusers"]
    assert r["devices"]["cuda_available"] == torch.cuda.is_available()
    assert r["devices"]["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert r["precision"]["auto"] in ("fp32", "bf16", "fp16") and isinstance(r["precision"]["tf32"], bool)
    assert r["attention"]["sdpa"] is True
    assert r["distributed"] == {**r["distributed"], "launched": True, "world_size": 2, "rank": 1, "local_rank": 1}
    assert "gloo" in r["distributed"]["backends"]
    assert set(r["extras"]) == {"serve", "survival", "bench", "test"} and r["extras"]["test"] is True
    assert r["hub"]["hf_hub_offline"] == "1"
    assert r["storage"]["meddiff_cache"] == str(tmp_path / "cache") and r["storage"]["meddiff_cache_free_gb"] > 0
    assert r["torchvision"]["version"] is None
    if not torch.cuda.is_available():
        assert r["devices"]["accelerator"] == "cpu" and any("no GPU" in line for line in r["advice"])


def test_env_text_report_has_one_line_per_topic():
    proc = run_env()
    assert proc.returncode == 0, proc.stderr
    starts = [line.split(":")[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]
    for topic in (
        "versions",
        "devices",
        "precision",
        "attention",
        "distributed",
        "extras",
        "hub",
        "caches",
        "torchvision",
        "advice",
    ):
        assert topic in starts, proc.stdout
    assert "distributed: not launched" in proc.stdout or "WORLD_SIZE" in os.environ


def test_advice_names_each_problem_with_what_to_do():
    report = env.collect()
    cpu_torch_with_driver = replace(
        report,
        devices=replace(report.devices, nvidia_smi=True, accelerator="cpu", cuda_available=False),
        versions=replace(report.versions, torch_build="cpu"),
    )
    assert any("MEDDIFF_TORCH=" in line for line in env.advice(cpu_torch_with_driver))
    cuda_no_gpu = replace(
        report,
        devices=replace(report.devices, nvidia_smi=False, cuda_available=False),
        versions=replace(report.versions, torch_build="cuda 12.6"),
    )
    assert any("MEDDIFF_TORCH=cpu" in line for line in env.advice(cuda_no_gpu))
    full_disk = replace(report, storage=replace(report.storage, meddiff_cache_free_gb=1.0))
    assert any("MEDDIFF_CACHE" in line for line in env.advice(full_disk))
    online_missing = replace(
        report,
        hub=replace(report.hub, resolves=False, hf_hub_offline=None, transformers_offline=None, detail="gaierror"),
    )
    assert any("HF_HUB_OFFLINE=1" in line for line in env.advice(online_missing))
    broken_tv = replace(report, torchvision=env.Torchvision("0.29.1", False, "RuntimeError: nms"))
    assert any("uninstall -y torchvision" in line for line in env.advice(broken_tv))
    many = replace(
        report,
        distributed=replace(report.distributed, launched=True, world_size=4),
        devices=replace(report.devices, accelerator="cpu"),
    )
    assert any("4 processes on the CPU" in line for line in env.advice(many))
