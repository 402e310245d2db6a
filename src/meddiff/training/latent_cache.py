"""Latents encoded once: latent diffusion and Stable Diffusion fine-tuning train on an autoencoder's posterior
(mean and std), which depends only on the frozen autoencoder and the images. They are encoded on the run's
accelerator, each process encoding its share (rows rank::world), stored as fp16 memory maps in the cache, keyed
by the autoencoder's weights, the images and the resolution, and read by the training loader like images. A
second run, a resume, or another method on the same data and autoencoder starts training at once.

    $MEDDIFF_CACHE/latents/KEY/
      latents.json               key, count, shape, the processes that wrote it (written last: marks it complete)
      mean-00000-of-00002.npy    (rows of process 0) fp16
      std-00000-of-00002.npy ..."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data import cache
from meddiff.data.dataset import ImageLabelDataset
from meddiff.data.store import file_lock
from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import encode_moments

logger = logging.getLogger(__name__)
LATENT_VERSION = 1


def module_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights: every tensor's name, shape, sum and first values."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            flat = t.detach().reshape(-1)
            head = flat[:16].double().cpu().numpy().tobytes()
            h.update(f"{name}|{tuple(t.shape)}|{float(flat.double().sum()) if flat.numel() else 0.0:.10e}|".encode())
            h.update(head)
    return h.hexdigest()[:20]


class LatentSource(torch.utils.data.Dataset):
    """The loader's view of stored latents: batches of (index, mean, std, labels, known)."""

    def __init__(self, folder: Path, meta: dict, labels: torch.Tensor, known: torch.Tensor):
        self.folder, self.meta = Path(folder), meta
        self.world = int(meta["world"])
        self.labels, self.known = labels, known
        self._maps: dict[str, list[np.ndarray]] | None = None

    def _open(self) -> dict[str, list[np.ndarray]]:
        if self._maps is None:  # opened lazily, so loader workers map the files themselves
            self._maps = {
                kind: [np.load(self.folder / part_name(kind, r, self.world), mmap_mode="r") for r in range(self.world)]
                for kind in ("mean", "std")
            }
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return int(self.meta["count"])

    def rows(self, kind: str, indices) -> np.ndarray:
        maps = self._open()[kind]
        idx = np.asarray(indices, np.int64)
        out = np.empty((len(idx), *self.meta["shape"]), np.float16)
        for r in range(self.world):
            sel = np.nonzero(idx % self.world == r)[0]
            if len(sel):
                out[sel] = maps[r][idx[sel] // self.world]
        return out

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {
            "index": idx,
            "mean": torch.from_numpy(self.rows("mean", indices)),
            "std": torch.from_numpy(self.rows("std", indices)),
            "labels": self.labels[idx],
            "known": self.known[idx],
        }


def part_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-{rank:05d}-of-{world:05d}.npy"


@torch.no_grad()
def encoded_latents(
    vae,
    dataset: ImageLabelDataset,
    resolution: int,
    accelerator=None,
    transform=None,
    tag: str = "gray",
    batch_size: int = 32,
    progress: bool = True,
) -> LatentSource:
    """The stored latents of `dataset` under `vae` (encoded now, on the accelerator, if not yet stored)."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    key = hashlib.sha1(
        json.dumps(
            {
                "vae": module_fingerprint(vae),
                "data": dataset.fingerprint(),
                "n": len(dataset),
                "resolution": resolution,
                "transform": tag,
                "v": LATENT_VERSION,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    folder = cache.cache_root() / "latents" / key
    main = accelerator is None or accelerator.is_main_process
    meta = _complete(folder, key)
    encoded = False
    if meta is None:
        with ExitStack() as held:
            # one job encodes a key at a time (a sweep sharing MEDDIFF_CACHE): the main process holds a lock file
            # from the check to the publication; the others learn the decision and the private folder from it
            partial = None
            if main:
                held.enter_context(file_lock(folder.parent / f".{key}.lock", f"the latents {folder}"))
                if _complete(folder, key) is None:
                    partial = folder.parent / f"{key}.partial-{os.getpid()}-{time.time_ns()}"
                    partial.mkdir(parents=True)
            if accelerator is not None and world > 1:
                from accelerate.utils import broadcast_object_list

                partial = broadcast_object_list([partial])[0]
            if partial is not None:
                t0 = time.perf_counter()
                shape = _encode_part(
                    vae, dataset, partial, rank, world, device, transform, batch_size, accelerator, progress
                )
                if accelerator is not None:
                    accelerator.wait_for_everyone()
                if main:
                    meta = {
                        "key": key,
                        "count": len(dataset),
                        "shape": list(shape),
                        "world": world,
                        "tag": tag,
                        "encode_seconds": round(time.perf_counter() - t0, 2),
                        "vae": type(vae).__name__,
                        "data": dataset.source,
                        "resolution": resolution,
                    }
                    (partial / "latents.json").write_text(json.dumps(meta))  # last: marks the folder complete
                    stale = folder.parent / f".{key}.old-{os.getpid()}"
                    if folder.exists():
                        folder.rename(stale)
                    os.replace(partial, folder)
                    shutil.rmtree(stale, ignore_errors=True)
                encoded = True
        if accelerator is not None:
            accelerator.wait_for_everyone()
        meta = _complete(folder, key)
        if meta is None:
            raise MeddiffError(
                f"the latents written to {folder} cannot be read back; is the cache on a filesystem "
                "every process shares? (set MEDDIFF_CACHE)"
            )
    if progress and main:
        if encoded:
            logger.info(
                "encoded %d images into latents %s in %s s (%d process%s); stored in %s",
                len(dataset),
                tuple(meta["shape"]),
                meta["encode_seconds"],
                world,
                "es" if world > 1 else "",
                folder,
            )
        else:
            logger.info("latents of %d images from the cache (%s); no encoding", len(dataset), folder)
    return LatentSource(folder, meta, dataset.labels, dataset.known)


def _complete(folder: Path, key: str) -> dict | None:
    try:
        meta = json.loads((folder / "latents.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    world = int(meta["world"])
    if not all((folder / part_name(k, r, world)).is_file() for k in ("mean", "std") for r in range(world)):
        return None
    return meta


def _encode_part(
    vae, dataset, partial: Path, rank: int, world: int, device, transform, batch_size, accelerator, progress
) -> tuple[int, ...]:
    """Encode rows rank, rank+world, ... into this process's part files; returns the latent shape (C, h, w)."""
    rows = np.arange(rank, len(dataset), world)
    was = next(vae.parameters()).device
    vae.to(device)
    probe_mean, _ = _encode(vae, dataset.images[[0]], transform)
    shape = tuple(probe_mean.shape[1:])
    mean_map = np.lib.format.open_memmap(
        partial / part_name("mean", rank, world), "w+", np.float16, (len(rows), *shape)
    )
    std_map = np.lib.format.open_memmap(partial / part_name("std", rank, world), "w+", np.float16, (len(rows), *shape))
    amp = accelerator is not None and device.type != "cpu"
    bar = tqdm(
        total=len(rows),
        desc="encode latents",
        unit="img",
        dynamic_ncols=True,
        leave=False,
        disable=not progress or rank != 0,
    )
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            with accelerator.autocast() if amp else nullcontext():  # a fresh context each batch (single-use)
                mean, std = _encode(vae, dataset.images[chunk], transform)
            mean_map[start : start + len(chunk)] = mean.float().cpu().numpy().astype(np.float16)
            std_map[start : start + len(chunk)] = std.float().cpu().numpy().astype(np.float16)
            bar.update(len(chunk))
        mean_map.flush()
        std_map.flush()
    finally:
        bar.close()
        vae.to(was)
    del mean_map, std_map
    return shape


def _encode(vae, images: torch.Tensor, transform) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_moments(vae, transform(images) if transform is not None else images, batch_size=len(images))


def posterior_draw(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, draw: str = "sample"
) -> torch.Tensor:
    """Unscaled KL latents from stored moments: a fresh draw (noise from the CPU generator), or with draw "mean" the
    posterior mean (LatentConfig.draw)."""
    mean = mean.float()
    if draw == "mean":
        return mean
    return mean + std.float() * torch.randn(mean.shape, generator=generator).to(mean.device)
