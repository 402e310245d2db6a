"""Batch order (a function of seed and samples consumed), per-process shards, the DataLoader path, and resuming
with another process count."""

import json

import numpy as np
import torch

from meddiff.data.spec import load_dataset
from meddiff.data.store import raw_to_model_range
from meddiff.training.batches import StreamBatchSampler, auto_workers, make_loader, stream_positions
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train


def test_stream_is_epochs_of_permutations_and_continues_across_batch_sizes():
    first = stream_positions(10, 3, 0, 25)
    for e in range(2):
        assert sorted(first[e * 10 : (e + 1) * 10].tolist()) == list(range(10))  # every image once per epoch
    assert not np.array_equal(first[:10], first[10:20])
    # two processes x 4 = the single-process batches of 8, dealt round robin; then resumed by one process
    sampler = [list(StreamBatchSampler(30, 4, 7, 0, 3, rank, 2)) for rank in range(2)]
    whole = list(StreamBatchSampler(30, 8, 7, 0, 3))
    for step in range(3):
        assert sorted(sampler[0][step] + sampler[1][step]) == sorted(whole[step])
        assert not set(sampler[0][step]) & set(sampler[1][step])
    resumed = list(StreamBatchSampler(30, 6, 7, 24, 2))  # a run that had consumed 24 samples, now batch 6
    assert resumed[0] + resumed[1] == stream_positions(30, 7, 24, 12).tolist()


def test_loader_workers_give_the_same_batches(phantom_dir):
    ds = load_dataset(f"phantom:{phantom_dir}", 32)
    assert auto_workers(ds, "cpu") >= 1 and auto_workers(load_dataset("phantom:?n=8", 32), "cuda") == 0
    sampler = StreamBatchSampler(len(ds), 5, 1, 0, 4)
    serial = [b["image"] for b in make_loader(ds, sampler, torch.device("cpu"), 0)]
    parallel = [b["image"] for b in make_loader(ds, sampler, torch.device("cpu"), 2)]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel)) and serial[0].dtype == torch.uint8
    idx = next(iter(sampler))
    assert torch.equal(raw_to_model_range(serial[0]), ds.images[idx])


def test_resume_with_another_batch_size_continues_the_stream(phantom_dir, tmp_path):
    ds = load_dataset(f"phantom:{phantom_dir}", 32)
    base = dict(
        data=f"phantom:{phantom_dir}",
        out=str(tmp_path / "run"),
        resolution=32,
        checkpoint_every=2,
        log_every=1,
        loader_workers=0,
    )
    from meddiff.models.factory import ModelConfig

    small = ModelConfig(block_out_channels=[16, 32], layers_per_block=1)
    train(TrainConfig(**base, batch_size=4, max_steps=2, model=small), ds, progress=False)
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["samples"] == 8
    result = train(TrainConfig(**base, batch_size=8, max_steps=3, model=small, resume="latest"), ds, progress=False)
    assert result.steps == 3
    state = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["samples"] == 16
