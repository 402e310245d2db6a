"""Several training processes (what `accelerate launch` / `torchrun` start, one per GPU), run here as two CPU
processes with gloo: each global batch is split between them, they stay in sync for every kind of method
(pixel diffusion, VQ autoencoder with a discriminator and dead-code resets, Stable Diffusion fine-tuning with a
trained text encoder, LoRA), the main process alone exports, and checkpoints resume at another process count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meddiff.data.spec import load_dataset
from meddiff.models.factory import ModelConfig
from meddiff.models.storage import load_pipeline
from meddiff.testing import build_tiny_stable_diffusion
from meddiff.training.config import TrainConfig, load_config
from meddiff.training.loop import batch_indices, rank_batch_indices, train

PROBE = Path(__file__).with_name("ddp_probe.py")


def torchrun(*args, timeout=600):
    # --standalone: a free port, as other tests may launch at the same time (pytest-xdist workers)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )


def test_ranks_split_the_global_batch():
    for step in range(5):
        shards = [rank_batch_indices(30, 4, 7, step, rank, 2) for rank in range(2)]
        whole = batch_indices(30, 8, 7, step)
        assert sorted(shards[0].tolist() + shards[1].tolist()) == sorted(whole.tolist())
        assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 4
    assert rank_batch_indices(30, 4, 7, 3).tolist() == batch_indices(30, 4, 7, 3).tolist()  # one process: unchanged


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    base = build_tiny_stable_diffusion(out / "tiny_sd")
    proc = torchrun(str(PROBE), str(out), str(base))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("run", ["pixel", "autoencoder", "unet_text", "lora"])
def test_processes_stay_in_sync_and_split_batches(probed, run):
    out, stdout = probed
    ranks = [json.loads((out / run / f"probe-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"], "the processes' weights diverged"
    for a, b in zip(ranks[0]["indices"], ranks[1]["indices"]):
        assert not set(a) & set(b), "both processes trained on the same images"
    assert stdout.count(f"{run.replace('unet_text', 'unet+text')}: exported") == 1  # the main process alone
    summary = json.loads((out / run / "training.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 8


@pytest.mark.slow
def test_multi_process_checkpoint_resumes_in_one_process(probed, tmp_path):
    out, _ = probed
    ckpt = out / "pixel" / "checkpoints" / "step-0000004" / "model.safetensors"
    keys = set(load_file(ckpt))
    assert keys and not any(k.startswith(("module.", "model.")) for k in keys)  # the U-Net's own names
    ref = train(
        TrainConfig(
            data="phantom:?n=24&seed=5",
            out=str(tmp_path / "single"),
            max_steps=1,
            batch_size=8,
            checkpoint_every=1,
            model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
            precision="fp32",
        ),
        load_dataset("phantom:?n=24&seed=5", 32),
        progress=False,
    )
    assert keys == set(load_file(ref.run_dir / "checkpoints" / "step-0000001" / "model.safetensors"))
    # continue the two-process run in one process (method name: the probe's parent, same weights)
    config = load_config(out / "pixel" / "config.yaml", {})
    config.method, config.max_steps, config.resume = "pixel", 6, "latest"
    result = train(config, load_dataset(config.data, 32), progress=False)
    assert result.steps == 6 and result.processes == 1
    before, after = load_file(ckpt), load_file(out / "pixel" / "checkpoints" / "step-0000006" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_cli_train_under_torchrun(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  block_out_channels: [16, 32]\n  layers_per_block: 1\ncheckpoint_every: 0\n")
    run = tmp_path / "run"
    proc = torchrun(
        "-m",
        "meddiff",
        "train",
        "--data",
        "phantom:?n=24&seed=5",
        "--resolution",
        "32",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--config",
        str(config),
        "--no-eval",
        "--out",
        str(run),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: 3 steps") == 1  # one report, from the main process
    assert json.loads((run / "training.json").read_text())["processes"] == 2
    pipe = load_pipeline(run / "pipeline")
    assert pipe.unet.config.sample_size == 32
