"""Which images each training step sees, and how they reach the accelerator.

The order is a function of (seed, samples consumed) only: the runs's images form one stream of epochs, each a
permutation fixed by (seed, epoch), and global batch s of G images is the stream's next G positions, dealt round
robin to the processes. So a resumed run sees exactly the batches an uninterrupted one would, and a run resumed
with another number of processes (or batch size) continues the same stream where it stopped.

Batches are read by a torch DataLoader: worker processes gather each batch from the memory-mapped store (stored
integers, 4x smaller than floats), pinned memory and non-blocking copies on CUDA; conversion to floats happens
on the accelerator (`raw_to_model_range`)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from meddiff.devices import usable_cores


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_positions(n: int, seed: int, start: int, count: int) -> np.ndarray:
    """Images at positions start .. start+count-1 of the stream (epoch e = permutation of range(n) by (seed, e))."""
    pos = np.arange(start, start + count, dtype=np.int64)
    epochs = pos // n
    out = np.empty(count, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(n, int(seed), int(e))[pos[sel] % n]
    return out


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of batch `step` of a single process drawing `batch_size` images per step."""
    return stream_positions(n, seed, step * batch_size, batch_size)


def rank_batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This process's share of global batch `step` (batch_size x world images), dealt round robin."""
    return batch_indices(n, batch_size * world, seed, step)[rank::world]


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this process's indices for `count` consecutive (micro-)batches, starting at stream position `start`."""

    def __init__(self, n: int, per_process: int, seed: int, start: int, count: int, rank: int = 0, world: int = 1):
        self.n, self.per_process, self.seed = n, per_process, seed
        self.start, self.count, self.rank, self.world = start, count, rank, world

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        size = self.per_process * self.world
        for k in range(self.count):
            yield stream_positions(self.n, self.seed, self.start + k * size, size)[self.rank :: self.world].tolist()


def _keep_batch(batch):  # the dataset's __getitems__ already returns the batch
    return batch


def auto_workers(source, device_type: str) -> int:
    """Loader processes: none for data already in memory as floats; else enough to stay ahead of the step
    (the CPU's cores shared by the processes of this node, one left for the training process itself)."""
    images = getattr(source, "images", None)
    if isinstance(images, torch.Tensor) or not hasattr(source, "__getitems__"):
        return 0
    env = os.environ.get("MEDDIFF_LOADER_WORKERS")
    if env:
        return max(int(env), 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = usable_cores() // max(local, 1)
    return int(min(8 if device_type == "cuda" else 2, max(cores - 1, 1)))


def make_loader(source, sampler: Sampler[list[int]], device: torch.device, workers: int | None = None) -> DataLoader:
    """A DataLoader over `source` (a dataset with __getitems__(indices) -> dict of tensors) in the sampler's order."""
    workers = auto_workers(source, device.type) if workers is None else workers
    return DataLoader(
        source,
        batch_sampler=sampler,
        collate_fn=_keep_batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
