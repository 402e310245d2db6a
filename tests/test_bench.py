"""The benchmark commands run and write JSON (their numbers are reported on issues, never asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
RUN = {"capture_output": True, "text": True}


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_train_throughput_bench_writes_json(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "train_throughput.py"),
            "--resolutions",
            "28",
            "--precisions",
            "fp32",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["resolution"] == 28 and rows[0]["img_per_s"] > 0 and rows[0]["peak_rss_MB"] > 0
    assert "img_per_s" in proc.stdout


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_sampling_bench_writes_json(tmp_path, tiny_run, phantom_dir):
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "sampling.py"),
            "--model",
            str(tiny_run),
            "--n",
            "4",
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["scheduler"] for r in rows} == {"ddpm", "ddim", "pndm", "dpm++"}
    assert all(r["s_per_image"] > 0 for r in rows)
    # scored against real data: fidelity, domain FID and KID per setting, all at the same count
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "sampling.py"),
            "--model",
            str(tiny_run),
            "--data",
            f"phantom:{phantom_dir}",
            "--n",
            "12",
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert all(r["n"] == 12 and r["domain_fid"] > 0 and r["fid_floor_same_n"] > 0 and "kid" in r for r in rows)
    assert all(0 <= r["mean_fidelity_auc"] <= 1 for r in rows if r["mean_fidelity_auc"] is not None)


@pytest.mark.parametrize(
    "script, options",
    [
        ("peers.py", ["--peers", "--resolutions", "--steps", "--out"]),
        ("latent_throughput.py", ["--factors", "--kinds", "--conditioning", "--precision", "--out"]),
        ("data_scale.py", ["--quick", "--work", "--out"]),
        ("privacy_monitor.py", ["--train", "--heldout", "--steps", "--every", "--samples", "--workdir", "--out"]),
    ],
)
def test_extended_lane_bench_scripts_start_and_list_their_options(script, options):
    """The default lane's check of the benchmark scripts whose runs are in the extended lane: each starts
    (its imports resolve) and parses its options; `pytest -m extended` runs them."""
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(option in proc.stdout for option in options), proc.stdout


@pytest.mark.extended  # MONAI's tutorial recipe as a peer: minutes on a slow CPU
@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_peer_bench_sizes_peers_to_meddiff_and_writes_json(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "peers.py"),
            "--resolutions",
            "32",
            "--peers",
            "meddiff",
            "diffusers-example",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["peer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"meddiff", "diffusers-example"}
    assert abs(rows["diffusers-example"]["params_vs_meddiff"] - 1) <= 0.10  # equal size within 10 %
    assert rows["meddiff"]["meddiff_speedup"] == 1.0 and rows["diffusers-example"]["img_per_s"] > 0


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_speedups_bench_counts_flops_and_profiles(tmp_path):
    out = tmp_path / "e.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "speedups.py"),
            "--variants",
            "fp32",
            "bf16 SDPA attention",
            "bf16 attention <=16 px",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "4",
            "--profile-steps",
            "2",
            "--images",
            "32",
            "--resolution",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"fp32", "bf16 SDPA attention", "bf16 attention <=16 px"}
    # the default U-Net costs about 0.8 GFLOP per 16 px training image (2.3 at 28 px); attention at 16 px adds to it
    assert 0.2 < data["gflops_per_training_image"] < 3
    assert rows["bf16 attention <=16 px"]["gflops_per_image"] > rows["fp32"]["gflops_per_image"]
    assert all(r["of_matmul_peak"] > 0 and r["img_per_s"] > 0 for r in rows.values())
    from meddiff.devices import cpu_has_fast_bf16

    # against a peak measured in the same dtype; without bf16 units the bf16 matmul is emulated (~20x slower than
    # fp32) while oneDNN's bf16 convolutions are not, so only fp32 (and bf16 on a bf16 CPU) is bounded
    bounded = [r for name, r in rows.items() if "bf16" not in name or cpu_has_fast_bf16()]
    assert bounded and all(r["of_matmul_peak"] < 1.5 for r in bounded), rows
    limits = data["cpu_limits"]
    assert limits["matmul_fp32_gflops"] > 0 and limits["matmul_bf16_gflops"] > 0
    assert 256 <= limits["matmul_bf16_n"] <= limits["matmul_fp32_n"] <= 2048  # the matrix size each peak used
    shares = data["profile"]["share"]
    assert abs(sum(shares.values()) - 1) < 0.01 and shares.get("convolution", 0) > 0
    assert (out.parent / "e-profile.txt").read_text().strip()


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_time_to_quality_bench_resumes_between_marks(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "time_to_quality.py"),
            "--data",
            "phantom:?n=96&seed=0",
            "--minutes",
            "0.05",
            "0.2",  # far enough apart that a loaded machine still takes more steps for the second mark
            "--n",
            "16",
            "--epochs",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            "model.block_out_channels=[16,32]",
            "--set",
            "batch_size=8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    first, second = data["rows"]
    assert 0 < first["steps"] < second["steps"] and second["train_minutes"] >= 0.2
    assert "resumed from" in proc.stderr  # the second mark continued the first mark's run (logged)
    for row in data["rows"]:
        assert 0 <= row["fidelity_auc"] <= 1 and 0 <= row["synthetic_only_auc"] <= 1 and row["domain_fid"] >= 0
    assert data["overrides"]["batch_size"] == 8 and out.with_suffix(".png").stat().st_size > 1000
    assert (tmp_path / "w" / "default" / "snapshots" / "0.2min" / "pipeline").is_dir()


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_time_to_quality_bench_marks_at_steps_and_reports_the_worst_label(tmp_path):
    out = tmp_path / "s.json"
    command = [sys.executable, str(BENCH / "time_to_quality.py"), "--data", "phantom:?n=96&seed=0"]
    command += ["--steps", "6", "3", "--n", "16", "--epochs", "1", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    command += ["--set", "model.block_out_channels=[16,32]", "--set", "batch_size=8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["steps"] for r in data["rows"]] == [3, 6]  # exactly the marks, on any machine
    assert "resumed from" in proc.stderr
    for row in data["rows"]:
        assert row["fidelity_min"] == min(row["fidelity_per_label"].values()) <= row["fidelity_auc"]
    assert data["first_mark_reaching"]["unit"] == "steps"
    assert (tmp_path / "w" / "default" / "snapshots" / "6steps" / "pipeline").is_dir()


@pytest.mark.extended  # several latent trainings: minutes on a slow CPU
@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_latent_throughput_bench_writes_json(tmp_path):
    out = tmp_path / "l.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "latent_throughput.py"),
            "--resolutions",
            "32",
            "--factors",
            "4",
            "--kinds",
            "vq",
            "--conditioning",
            "labels",
            "text",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    stages = [(r["stage"], r["kind"], r["conditioning"]) for r in rows]
    assert stages == [("autoencoder", "vq", ""), ("latent", "kl", "labels"), ("latent", "kl", "text")]
    assert all(r["img_per_s"] > 0 for r in rows)
    assert rows[1]["latent"] == "4x8x8" and rows[1]["sample_img_per_s"] > 0 and rows[2]["sample_img_per_s"] > 0


def test_timed_seconds_excludes_warmup_steps():
    sys.path.insert(0, str(BENCH))
    from common import timed_seconds

    history = [[1, 0.9, 5.0], [2, 0.8, 6.0], [3, 0.7, 7.5], [4, 0.6, 9.5]]
    assert timed_seconds(history, 1, 3) == 4.5  # steps 2-4: 9.5 - 5.0
    assert timed_seconds(history, 0, 1) == 5.0  # the first step, from the start


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_finetune_scale_bench_measures_each_method_and_cleans_up(tmp_path):
    from meddiff.testing import build_tiny_stable_diffusion

    base = build_tiny_stable_diffusion(tmp_path / "base")  # an existing pipeline is used as it is
    out, work = tmp_path / "f.json", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "finetune_scale.py"),
            "--configs",
            "unet",
            "lora+gc",
            "--resolution",
            "32",
            "--steps",
            "2",
            "--base",
            str(base),
            "--work",
            str(work),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["method"], r["gradient_checkpointing"]) for r in rows] == [
        ("unet", "unet", False),
        ("lora+gc", "lora", True),
    ]
    assert all(r["s_per_step"] > 0 and r["peak_rss_GB"] > 0 for r in rows)
    assert rows[1]["trainable_M"] < rows[0]["trainable_M"]
    assert not work.exists() or not any(work.iterdir())  # each run folder is deleted once measured
    one = subprocess.run(
        [sys.executable, str(BENCH / "finetune_scale.py"), "--steps", "1", "--base", str(base)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 2 and "--steps must be at least 2" in one.stderr


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_plain_diffusers_loop_trains_unet_and_lora_on_the_tiny_sd(tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from meddiff.testing import build_tiny_stable_diffusion

    base = build_tiny_stable_diffusion(tmp_path / "base")
    out = tmp_path / "d.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "plain_diffusers_loop.py"),
            "--base",
            str(base),
            "--configs",
            "unet",
            "lora",
            "--resolution",
            "32",
            "--steps",
            "2",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "s_per_step" in proc.stdout  # the printed table
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"unet", "lora"} and not any("error" in r for r in rows.values())
    for row in rows.values():
        assert row["loop"] == "plain-diffusers" and row["loss_finite"] and row["loss"] > 0
        assert row["s_per_step"] > 0 and row["img_per_s"] > 0 and row["peak_rss_GB"] > 0
        assert row["precision"] == "no" and row["resolution"] == 32 and row["batch"] == 1
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    assert rows["unet"]["trainable_params"] == sum(p.numel() for p in unet.parameters())  # the whole U-Net
    # LoRA rank 8 on every to_q/to_k/to_v/to_out.0 linear: r * (in + out) each, nothing else trains
    targets = [
        m
        for name, m in unet.named_modules()
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and isinstance(m, torch.nn.Linear)
    ]
    lora = sum(8 * (m.in_features + m.out_features) for m in targets)
    assert rows["lora"]["trainable_params"] == lora > 0


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_gpu_check_quick_mode_writes_every_stage_to_one_json(tmp_path):
    out, work = tmp_path / "g.json", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--quick",
            "--skip",
            "pytest_gpu",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gpu_check" and data["quick"] and data["complete"]
    stages = data["stages"]
    assert set(stages) == {"pytest_gpu", "pixel", "latent", "sampling", "finetune"}
    assert stages["pytest_gpu"]["status"] == "skipped"
    assert all(stages[s]["status"] == "ok" for s in ("pixel", "latent", "sampling", "finetune")), stages
    assert [(p["loop"], p["config"]) for p in stages["finetune"]["parts"]] == [
        ("meddiff", "unet"),
        ("plain-diffusers", "unet"),
        ("meddiff", "lora"),
        ("plain-diffusers", "lora"),
    ]
    rows = {(r["stage"], r.get("config")): r for r in data["rows"]}
    assert rows[("pixel", "tiny model")]["img_per_s"] > 0 and rows[("latent", "KL f=4 latent 4x8x8")]["img_per_s"] > 0
    sampling = [r for r in data["rows"] if r["stage"] == "sampling"]
    assert len(sampling) == 2 and all(r["img_per_s"] > 0 for r in sampling)
    finetune = [r for r in data["rows"] if r["stage"] == "finetune"]
    assert all(r["s_per_step"] > 0 and r["peak_rss_GB"] > 0 for r in finetune)
    assert {r["precision"] for r in finetune} == {finetune[0]["precision"]}  # both loops in the same precision
    assert "img_per_s" in proc.stdout and "results:" in proc.stdout  # the printed table
    # a budget too small for anything: every stage is skipped with a note, and the JSON still written
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--quick",
            "--budget-s",
            "1",
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads(out.read_text())["stages"]
    assert all(v["status"] == "skipped" and "budget" in v["note"] for k, v in stages.items() if k != "finetune")
    assert all(p["status"] == "skipped" for p in stages["finetune"]["parts"])


def test_gpu_check_and_multinode_scripts_parse():
    root = BENCH.parent
    for script in (BENCH / "gpu_check.sh", root / "scripts" / "slurm" / "train-multinode.sbatch"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_latent_cache_bench_second_run_encodes_nothing(tmp_path):
    out = tmp_path / "lc.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "latent_cache.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, saved = json.loads(out.read_text())["rows"]
    assert first["encoded"] == first["images"] == 64 and second["encoded"] == 0
    assert (
        first["setup_s"] > 0
        and second["setup_s"] >= 0
        and saved["setup_s"] == round(first["setup_s"] - second["setup_s"], 2)
    )
    assert "saved" in proc.stdout and "results:" in proc.stdout


@pytest.mark.extended  # prepares and trains at two dataset sizes: about 4 minutes on a slow CPU
@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_data_scale_bench_fits_memory_against_n_and_compares_workers(tmp_path):
    out = tmp_path / "ds.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "data_scale.py"), "--quick", "--work", str(tmp_path / "w"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["images"] for r in data["rows"]] == [60, 120]
    assert all(r["peak_rss_mb"] > 50 and r["train_img_per_s"] > 0 and r["prepare_img_per_s"] > 0 for r in data["rows"])
    s = data["summary"]
    assert s["prepare_1_worker_img_per_s"] > 0 and s["prepare_2_workers_img_per_s"] > 0
    assert s["loader_2_workers_img_per_s_64px"] > 0 and s["train_img_per_s_64px"] > 0
    assert "fit_b_bytes_per_image" in s and "targets:" in proc.stdout


@pytest.mark.slow  # trains three tiny models and samples every row family in a subprocess
def test_few_step_bench_counts_evaluations_and_writes_json(tmp_path, phantom_dir):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("resolution: 32\nbatch_size: 8\nmodel:\n  block_out_channels: [16, 32]\n  layers_per_block: 1\n")
    out = tmp_path / "f.json"
    command = [
        sys.executable,
        str(BENCH / "few_step.py"),
        "--quick",
        "--quiet",
        "--data",
        f"phantom:{phantom_dir}",
        "--config",
        str(recipe),
        "--workdir",
        str(tmp_path / "w"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    # an interrupted or repeated run resumes: rows measured with the same settings are not sampled again
    again = subprocess.run([*command, "--rows", "DPM++", "distilled"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("measured before") == 2 and "training teacher" not in again.stdout
    assert [r["row"] for r in json.loads(out.read_text())["rows"]] == ["DPM++ 4", "distilled 2"]
    # and each finished seed of a row is kept, so even a row cut short resumes seed by seed
    (tmp_path / "w" / "rows.jsonl").unlink()
    parts = subprocess.run([*command, "--rows", "DPM++"], capture_output=True, text=True, timeout=900)
    assert parts.returncode == 0 and "seed 0: measured before" in parts.stdout, parts.stderr[-2000:]
    # a distillation variant never reuses a student trained with other settings: one line, not a stale row
    variant = [*command, "--rows", "distilled", "--student-set", "distill.solver_steps=10"]
    refused = subprocess.run(variant, capture_output=True, text=True, timeout=900)
    assert refused.returncode != 0 and "other settings" in refused.stderr and "Traceback" not in refused.stderr
    assert set(rows) == {"DDPM 1000", "DPM++ 4", "flow Heun 4", "distilled 2", "phased 2"}
    assert rows["phased 2"]["nfe"] == 2  # the phased student: its own 2-step DDIM grid, guidance embedded
    # counted, not assumed: guidance 2 doubles the teacher's and the flow model's passes, Heun takes 2 per step
    # except the last, the distilled student takes the guidance scale as an input
    assert rows["DPM++ 4"]["nfe"] == 8 and rows["flow Heun 4"]["nfe"] == 14 and rows["distilled 2"]["nfe"] == 2
    assert all(0 <= r["near_copy_rate"] <= 1 and r["domain_fid"] >= 0 and r["img_per_s"] > 0 for r in rows.values())
    for r in rows.values():  # the mean fidelity is the mean of the findings scored
        per = r["fidelity_per_label"]
        assert all(0 <= v <= 1 for v in per.values()) and (r["fidelity_auc"] is None) == (not per)
        assert not per or r["fidelity_auc"] == pytest.approx(sum(per.values()) / len(per), abs=1e-3)
    assert (tmp_path / "f.png").is_file()


@pytest.mark.slow  # trains a tiny generator, generates, and runs every downstream protocol in a subprocess
@pytest.mark.parametrize("synthetic", ["mirror", pytest.param("balance", marks=pytest.mark.extended)])
def test_real_data_bench_reports_every_protocol(tmp_path, phantom_dir, synthetic):
    out = tmp_path / "r.json"
    command = [sys.executable, str(BENCH / "real_data.py"), "--quick", "--data", f"phantom:{phantom_dir}"]
    command += ["--synthetic", synthetic, "--workdir", str(tmp_path / "w"), "--out", str(out)]
    if synthetic == "balance":  # a subset of protocols (the rare-class question), no fractions
        command += ["--protocols", "real+synthetic", "real-reweighted", "--fractions"]
    else:
        command += ["--fractions", "0.5"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    sets = [r["train_set"] for r in data["rows"]]
    rows = {r["train_set"]: r for r in data["rows"]}
    s = data["summary"]
    if synthetic == "balance":
        assert sets == ["real", "real+synthetic", "real-reweighted"]
        assert s["synthetic_only_gap"] is None and s["real_plus_synthetic_gain"] is not None
    else:
        assert sets == [
            "real",
            "synthetic",
            "real+synthetic",
            "synthetic->real",
            "real-reweighted",
            "real 50%",
            "real 50%+synthetic",
        ]
        assert rows["synthetic"]["n_train"] == 32
        assert s["synthetic_only_gap"] == pytest.approx(
            rows["real"]["macro_auc"] - rows["synthetic"]["macro_auc"], abs=1e-3
        )
    assert all(0 <= r["macro_auc"] <= 1 for r in data["rows"])
    assert s["generator_steps"] == 4 and s["synthetic"] == synthetic and "patient" in s["split_note"]
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.extended  # about 5 minutes on a slow CPU
@pytest.mark.slow  # trains a tiny autoencoder and latent generator at 128 px in a subprocess
def test_real_data_bench_latent_preset_trains_its_autoencoder_and_evaluates_at_64_px(tmp_path, phantom_dir):
    out, work = tmp_path / "r.json", tmp_path / "w"
    command = [sys.executable, str(BENCH / "real_data.py"), "--quick", "--dataset", "alzheimer-128"]
    command += ["--data", f"phantom:{phantom_dir}", "--workdir", str(work), "--out", str(out)]
    command += ["--synthetic", "balance", "--protocols", "real+synthetic", "--fractions"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads(out.read_text())["summary"]
    assert s["generator_resolution"] == 128 and s["evaluate_resolution"] == 64
    assert s["autoencoder"]["latent_shape"] == [4, 32, 32] and s["autoencoder"]["psnr"] > 0
    ae = work / "alzheimer-128" / "autoencoder-4steps"  # named by its steps: never taken for a full one
    assert (ae / "metrics.json").is_file() and (ae / "autoencoder").is_dir()
    assert str(ae) in (work / "alzheimer-128" / "generator-4steps-autoencoder-4steps" / "config.yaml").read_text()


@pytest.mark.slow  # renders 1,400 phantoms in a subprocess
def test_privacy_gate_bench_reports_false_flags_and_recall_per_copy_type(tmp_path):
    out = tmp_path / "p.json"
    command = [sys.executable, str(BENCH / "privacy_gate.py"), "--datasets", "phantoms", "--positives", "40"]
    command += ["--descriptor-steps", "30", "--phantoms", "600", "800", "--fusion-sources", "100"]
    proc = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    # 800 held out: 400 to calibrate (the learned fusion is fitted on half, thresholded on the other) and 400 to test
    assert row["n_train"] == 600 and row["n_calibration"] == 200 and row["n_test_negatives"] == 400
    assert row["false_flag_rate"] <= 0.05
    assert row["fusion"] == "learned" and row["fusion_fit"]["negatives"] == 200 and row["fusion_weights"]
    assert row["heldout_duplicates"] == 0 and "descriptor" in row["detectors"] and row["model"] is None
    assert row["recall exact"] == 1.0 and set(row["recall_ci"]) == {
        "exact",
        "shift",
        "rotation",
        "gamma",
        "noise",
        "crop",
    }


@pytest.mark.extended  # 1.5 minutes on a slow CPU; the monitor itself: tests/evaluation/test_privacy_monitor.py
@pytest.mark.slow  # a short training with two memorisation checks in a subprocess
def test_privacy_monitor_bench_reports_the_curve(tmp_path):
    out = tmp_path / "m.json"
    command = [sys.executable, str(BENCH / "privacy_monitor.py"), "--train", "8", "--heldout", "100", "--steps", "4"]
    command += ["--every", "2", "--samples", "16", "--sample-steps", "4"]
    proc = subprocess.run([*command, "--workdir", str(tmp_path / "work"), "--out", str(out)], **RUN, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["rows"]] == [2, 4] and result["summary"]["training_images"] == 8
    assert result["summary"]["samples_per_check"] == 16
    assert all(0 <= r["copy_rate"] <= 1 and len(r["copy_rate_ci"]) == 2 for r in result["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow  # runs a benchmark script in a subprocess
def test_dp_quality_bench_trains_each_row_and_reports_its_epsilon(tmp_path):
    pytest.importorskip("opacus")
    out = tmp_path / "dp.json"
    command = [sys.executable, str(BENCH / "dp_quality.py"), "--data", "phantom:?n=96&seed=0", "--steps", "3"]
    # a public part (no DP) and DP rows on the private part, one of them fine-tuning the public row's model
    command += [
        "--rows",
        "eps=10,k=2,init=public",
        "sigma=1",
        "--public-fraction",
        "0.25",
        "--n",
        "16",
        "--epochs",
        "1",
    ]
    command += ["--workdir", str(tmp_path / "w"), "--set", "model.block_out_channels=[16,32]", "--set", "batch_size=8"]
    command += ["--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["row"] for r in result["rows"]] == ["public", "eps=10,k=2,init=public", "sigma=1"]  # public first
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["public"]["epsilon"] is None and rows["public"]["noise_multiplier"] == 0.0
    assert rows["public"]["trained_on"] == "public" and rows["public"]["n_train"] == 24  # 25 % of 96 training images
    tuned = rows["eps=10,k=2,init=public"]
    assert 9 < tuned["epsilon"] <= 10 and tuned["multiplicity"] == 2 and tuned["init_from"] == "public"
    assert tuned["trained_on"] == "private" and tuned["n_train"] == 72 and "by image" in result["public_split"]
    training = json.loads((tmp_path / "w" / "private_eps10_k2_initpublic" / "training.json").read_text())
    assert training["differential_privacy"]["init_from"] == str(tmp_path / "w" / "public")
    assert training["differential_privacy"]["units"] == 72  # epsilon is spent on the private part only
    assert rows["sigma=1"]["noise_multiplier"] == 1.0 and rows["sigma=1"]["epsilon"] > 0  # epsilon reported
    assert rows["sigma=1"]["init_from"] is None and rows["sigma=1"]["trained_on"] == "private"
    assert all(r["steps"] == 3 and 0 <= r["fidelity_auc"] <= 1 and r["unit"] in ("image", "-") for r in rows.values())
    assert out.with_suffix(".png").stat().st_size > 1000
    other = [*command[:5], "4", *command[6:]]  # another --steps in the same workdir: refused at once, not mixed
    changed = subprocess.run(other, capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0 and "trained with another recipe" in changed.stderr


def test_dp_quality_rows_are_checked_before_anything_trains():
    sys.path.insert(0, str(BENCH))
    from dp_quality import plan_rows, split_public

    for rows, fraction, message in [
        (["k=2"], 0, "needs eps=E or sigma=S"),
        (["eps=1,sigma=1"], 0, "not both"),
        (["eps=0"], 0, "must be above 0"),
        (["eps=abc"], 0, "not a number"),
        (["eps=1,k=100"], 0, "multiplicity"),
        (["public"], 0, "need --public-fraction"),
        (["eps=1,init=public"], 0, "need --public-fraction"),
        (["eps=1,init=private"], 0.5, "or init=public"),
        (["none"], 1.0, "from 0 to below 1"),
    ]:
        with pytest.raises(SystemExit, match=message):
            plan_rows(rows, fraction)
    plans = plan_rows(["none", "eps=1,init=public", "sigma=2"], 0.5)  # the public row is added, and trained first
    assert [p.text for p in plans] == ["public", "none", "eps=1,init=public", "sigma=2"]
    assert plans[2].init and plans[2].dp == {"epsilon": 1.0} and plans[0].public and not plans[1].public
    with pytest.raises(SystemExit, match="leaves one part empty"):
        split_public(type("Two", (), {"patients": ["a", "a"], "__len__": lambda self: 2})(), 0.5)

    class Data:  # a patient's images all fall on one side
        patients = [f"p{i // 3}" for i in range(30)]

        def __len__(self):
            return 30

    public, private, how = split_public(Data(), 0.3)
    assert len(public) == 9 and len(private) == 21 and how == "by patient (3 of 10 patients public)"
    assert not {Data.patients[i] for i in public} & {Data.patients[i] for i in private}


def test_privacy_gate_holdout_moves_training_images_and_asks_for_a_model_trained_without_them(tmp_path, monkeypatch):
    """--pneumonia-holdout N: N training images (a fixed draw) move to the val split of a new file, written once;
    without a model trained on that file the bench stops with the command that trains one."""
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCH))
    import privacy_gate

    source = tmp_path / "pneumoniamnist.npz"
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        for s, n in (("train", 50), ("val", 7), ("test", 9))
    }
    arrays.update({f"{s}_labels": rng.integers(0, 2, (n, 1)) for s, n in (("train", 50), ("val", 7), ("test", 9))})
    np.savez(source, **arrays)
    monkeypatch.setattr(privacy_gate, "PNEUMONIA", source)
    monkeypatch.setattr(privacy_gate, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["privacy_gate.py", "--datasets", "pneumoniamnist", "--pneumonia-holdout", "20"])
    with pytest.raises(SystemExit, match="needs --model pneumoniamnist=RUN.*meddiff train .*holdout20.npz"):
        privacy_gate.main()
    out = tmp_path / "runs" / "privacy_holdout" / "pneumoniamnist_holdout20.npz"
    assert out.is_file()  # written before stopping: the model is trained on it
    assert privacy_gate.holdout_file(20) == out
    moved = np.load(out)
    assert len(moved["train_images"]) == 30 and len(moved["val_images"]) == 27 and len(moved["test_images"]) == 9
    np.testing.assert_array_equal(moved["val_images"][:7], arrays["val_images"])
    np.testing.assert_array_equal(moved["test_labels"], arrays["test_labels"])
    # every original training image is on exactly one side, with its label
    train_rows = {m.tobytes(): int(y) for m, y in zip(moved["train_images"], moved["train_labels"][:, 0])}
    held_rows = {m.tobytes(): int(y) for m, y in zip(moved["val_images"][7:], moved["val_labels"][7:, 0])}
    assert not set(train_rows) & set(held_rows)
    for image, label in zip(arrays["train_images"], arrays["train_labels"][:, 0]):
        assert {**train_rows, **held_rows}[image.tobytes()] == int(label)
