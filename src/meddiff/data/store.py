"""The prepared image store: every image of a dataset decoded once, preprocessed to R x R and written as
memory-mapped shards of uint8 (8-bit sources) or uint16 (16-bit PNG/TIFF, DICOM, NIfTI), plus an index of labels,
known-masks, prompts, patient ids and source paths. Training reads batches straight from the maps, so memory
grows with the batch and the loader's workers, not with the number of images.

    STORE/
      store.json              what it holds: key, spec, resolution, fit, count, shards, label names, skipped files
      shard-00000.npy ...     (n, R, R) uint8 or uint16, one dtype per shard
      labels.npy known.npy    (N, K) float32 / bool
      index.json              prompts (unique texts + one id per image), patients, source paths

Writing is parallel (a process pool decodes; JPEGs decode at reduced DCT scale), resumable (finished shards of an
interrupted run are kept in STORE.partial/ and reused when the key matches) and atomic (the folder appears
only when complete, by one rename; a kill or a full disk never leaves a store a later run would trust). One
writer at a time per store (a lock file); under `accelerate launch`/`torchrun` the first process of each node
writes while the others wait, then everyone maps it."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data.decode import always_8bit, decode, decode_into, tasks_for
from meddiff.errors import MeddiffError

logger = logging.getLogger(__name__)
STORE_VERSION = 2
STORE_FILE = "store.json"
SHARD_BYTES = 256 * 2**20  # about 256 MB of pixels per shard


# ----------------------------------------------------------------------------------------------------------------
# reading


OPEN_SHARDS_MAX = 64  # file descriptors a process keeps open for shard reads (least recently used closed first)
_open_shards: OrderedDict[str, int] = OrderedDict()


def _shard_fd(path: str) -> int:
    fd = _open_shards.pop(path, None)
    if fd is None:
        if len(_open_shards) >= OPEN_SHARDS_MAX:
            os.close(_open_shards.popitem(last=False)[1])
        fd = os.open(path, os.O_RDONLY)
    _open_shards[path] = fd
    return fd


class ShardFile:
    """One shard file (.npy of uint8/uint16 images), read by rows without holding a memory map or a descriptor:
    rows are fetched with positioned reads (one per run of consecutive rows) into a fresh array. Reading through a
    memory map instead would leave the pages around each image mapped into the process (the kernel maps
    neighbouring cached pages on each fault), so resident memory would grow with the store, not with the batch; and
    a map per shard holds a descriptor, which a store of thousands of shards would exhaust. A process keeps at most
    OPEN_SHARDS_MAX shard files open. Pickles as its path and header (DataLoader workers)."""

    def __init__(self, path: Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or len(shape) != 3:
            raise ValueError(f"{path}: not a C-ordered (n, R, R) array")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(shape[1]) * int(shape[2]) * self.dtype.itemsize
        if os.path.getsize(self.path) < self.offset + self.row_bytes * int(shape[0]):
            raise ValueError(f"{path}: shorter than its header says")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        if not hasattr(os, "preadv"):  # no positioned reads on this platform: a read-only map
            return np.load(self.path, mmap_mode="r")[rows]
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        flat = out.reshape(-1).view(np.uint8).data  # a writable byte view of `out`
        fd = _shard_fd(self.path)
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and rows[j] == rows[j - 1] + 1:
                j += 1
            start, stop, offset = i * self.row_bytes, j * self.row_bytes, self.offset + int(rows[i]) * self.row_bytes
            while start < stop:  # short reads (very large runs) continue where they stopped
                got = os.preadv(fd, [flat[start:stop]], offset)
                if got <= 0:
                    raise MeddiffError(f"{self.path} ended early: the store is damaged; prepare it again")
                start, offset = start + got, offset + got
            i = j
        return out


class MappedImages:
    """(N, 1, R, R) images in [-1, 1], read on demand from uint8/uint16 arrays (memory maps or in-memory arrays).

    Indexing with an int, a slice, an index array/tensor or a tuple whose first element is one of those returns a
    float32 torch tensor, like indexing the float tensor it stands for; `raw(indices)` returns the stored integers
    (what the data loader ships to the accelerator, 4x smaller than floats)."""

    def __init__(self, shards: Sequence[np.ndarray | ShardFile]):
        self.shards = list(shards)  # in-memory arrays, or shard files (pickled as paths: workers read the files)
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        side = self.shards[0].shape[-1] if self.shards else 0
        self.shape = torch.Size((int(self.offsets[-1]), 1, side, side))
        self.ndim = 4
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def _positions(self, index) -> np.ndarray:
        n = len(self)
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, slice):
            return np.arange(n)[index]
        arr = np.asarray(index)
        if arr.dtype == bool:
            return np.nonzero(arr)[0]
        arr = arr.astype(np.int64)
        if arr.size and (arr.max() >= n or arr.min() < -n):
            raise IndexError(f"index out of range for {n} images")
        return np.where(arr < 0, arr + n, arr)

    def raw(self, index) -> np.ndarray:
        """Stored values (uint8 or uint16; mixed shards give uint16 scaled to 16 bits) of the images at `index`."""
        scalar = isinstance(index, (int, np.integer))
        pos = np.atleast_1d(self._positions(index))
        shard_of = np.searchsorted(self.offsets, pos, side="right") - 1
        dtypes = {self.shards[s].dtype for s in np.unique(shard_of)} or {np.dtype(np.uint8)}
        out_dtype = np.uint16 if np.dtype(np.uint16) in dtypes else np.uint8
        side = self.shape[-1]
        out = np.empty((len(pos), side, side), out_dtype)
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = pos[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")  # ascending reads: sequential on disk
            block = self.shards[s][local[order]]
            if block.dtype == np.uint8 and out_dtype == np.uint16:
                block = block.astype(np.uint16) * 257
            out[sel[order]] = block
        return out[0] if scalar else out

    def __getitem__(self, index) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, torch.Tensor) and index.ndim == 0:
            index = int(index)
        scalar = isinstance(index, (int, np.integer))
        out = raw_to_model_range(torch.from_numpy(np.ascontiguousarray(self.raw(index))))
        out = out.unsqueeze(0) if scalar else out.unsqueeze(1)  # (1, R, R) or (n, 1, R, R), as a tensor's
        if not rest:
            return out
        return out[rest] if scalar else out[(slice(None),) + rest]

    def __array__(self, dtype=None, copy=None):
        arr = self[:].numpy()
        return arr.astype(dtype) if dtype is not None else arr

    def numpy01(self, index=slice(None)) -> np.ndarray:
        """(n, R, R) float32 in [0, 1]."""
        raw = self.raw(index)
        return raw.astype(np.float32) / (65535.0 if raw.dtype == np.uint16 else 255.0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]


def raw_to_model_range(raw: torch.Tensor) -> torch.Tensor:
    """Stored integers (uint8 / uint16, any shape) or floats in [-1, 1] -> float32 in [-1, 1] on the same device."""
    if raw.dtype == torch.uint8:
        return raw.float() * (2.0 / 255.0) - 1.0
    if raw.dtype in (torch.int32, torch.int64) or str(raw.dtype) == "torch.uint16":
        return raw.to(torch.float32) * (2.0 / 65535.0) - 1.0
    return raw.float()


@dataclass
class StoreIndex:
    """What a store says about its images (one row per stored image)."""

    label_names: list[str]
    labels: np.ndarray  # (N, K) float32
    known: np.ndarray  # (N, K) bool
    prompt_texts: list[str]  # unique prompts
    prompt_ids: np.ndarray  # (N,) int32 into prompt_texts
    patients: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    multiclass: bool = False
    prompts_from_labels: bool = True

    @classmethod
    def build(
        cls,
        label_names,
        labels,
        known,
        prompts: list[str],
        patients=(),
        paths=(),
        multiclass=False,
        prompts_from_labels=True,
    ) -> StoreIndex:
        texts: dict[str, int] = {}
        ids = np.fromiter((texts.setdefault(p, len(texts)) for p in prompts), np.int32, count=len(prompts))
        return cls(
            list(label_names),
            np.asarray(labels, np.float32),
            np.asarray(known, bool),
            list(texts),
            ids,
            list(patients),
            list(paths),
            multiclass,
            prompts_from_labels,
        )


class Prompts(Sequence[str]):
    """A list-like view of per-image prompts stored as ids into unique texts (label-built prompts repeat a lot)."""

    def __init__(self, texts: list[str], ids: np.ndarray):
        self.texts, self.ids = texts, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.texts[j] for j in self.ids[i]]
        return self.texts[int(self.ids[i])]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __add__(self, other) -> list[str]:  # concatenates like the list it stands for
        return list(self) + list(other)

    def __radd__(self, other) -> list[str]:
        return list(other) + list(self)


@dataclass
class ImageStore:
    folder: Path
    meta: dict
    images: MappedImages

    @property
    def key(self) -> str:
        return self.meta["key"]

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [tuple(p) for p in self.meta.get("problems", [])]

    @property
    def keep(self) -> np.ndarray:
        """For each stored image, the position of its record in the table it was prepared from."""
        return np.load(self.folder / "keep.npy", mmap_mode="r")

    def index(self) -> StoreIndex | None:
        if not (self.folder / "index.json").is_file():
            return None
        data = json.loads((self.folder / "index.json").read_text())
        return StoreIndex(
            data["label_names"],
            np.load(self.folder / "labels.npy"),
            np.load(self.folder / "known.npy"),
            data["prompt_texts"],
            np.load(self.folder / "prompt_ids.npy"),
            data.get("patients", []),
            data.get("paths", []),
            data.get("multiclass", False),
            data.get("prompts_from_labels", True),
        )


def open_store(folder: Path, key: str | None = None) -> ImageStore | None:
    """The complete store in `folder` (None when absent, incomplete, of another key, or damaged)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / STORE_FILE).read_text())
        if meta.get("version") != STORE_VERSION or (key is not None and meta.get("key") != key):
            return None
        side = int(meta["resolution"])
        shards = []
        for entry in meta["shards"]:
            shard = ShardFile(folder / entry["file"])
            if shard.shape != (entry["count"], side, side) or shard.dtype != np.dtype(entry["dtype"]):
                return None
            shards.append(shard)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of descriptors is not a damaged store
            raise MeddiffError(
                f"too many open files while opening the store in {folder}; raise the limit (ulimit -n)"
            ) from None
        return None
    except (ValueError, KeyError, TypeError):
        return None
    if sum(len(s) for s in shards) != meta["count"]:
        return None
    return ImageStore(folder, meta, MappedImages(shards))


def describe_store(folder: Path) -> dict | None:
    """store.json of a folder that holds a store (complete or not), for one-line refusals."""
    try:
        return json.loads((Path(folder) / STORE_FILE).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# writing


def fingerprint(items: Sequence[tuple[str, int | None, int]], parts: dict) -> str:
    """Key of a store: what determines its pixels (resolution, fit, and each source file's path, slice, size and
    modification time). Label options and prompts do not change pixels, so they do not change the key."""
    h = hashlib.sha1(json.dumps({**parts, "v": STORE_VERSION}, sort_keys=True, default=str).encode())
    stats: dict[str, str] = {}
    for path, sl, axis in items:
        if path not in stats:
            try:
                st = os.stat(path)
                stats[path] = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                stats[path] = "missing"
        h.update(f"{path}|{sl}|{axis}|{stats[path]}\n".encode())
    return h.hexdigest()[:20]


@contextmanager
def file_lock(path: Path, what: str):
    """An exclusive lock file (one writer per store; others wait, then find it written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the atomic rename still protects readers
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is preparing %s", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


def _disk_error(exc: OSError, where: Path) -> MeddiffError:
    if exc.errno == errno.ENOSPC:
        return MeddiffError(
            f"the disk is full while writing the image store in {where}; free space or set "
            "MEDDIFF_CACHE (or --out) to a larger disk; the finished shards are kept and reused"
        )
    return MeddiffError(f"cannot write the image store in {where}: {exc.strerror or exc}")


def _shard_size(resolution: int) -> int:
    return int(max(64, min(16384, SHARD_BYTES // (resolution * resolution * 2))))


def _check_free_space(folder: Path, n: int, resolution: int) -> None:
    need = n * resolution * resolution  # at least one byte per pixel
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise MeddiffError(
            f"{n} images at {resolution} px need at least {need / 1e9:.1f} GB but {probe} has "
            f"{free / 1e9:.1f} GB free; set MEDDIFF_CACHE (or --out) to a larger disk"
        )


MAIN_GUARD_HINT = (
    'a Python script that prepares data must keep its code under `if __name__ == "__main__":` '
    "(decoding workers are started by importing the script again)"
)


def write_store(
    folder: Path,
    key: str,
    items: Sequence[tuple[str, int | None, int]],
    resolution: int,
    fit: str,
    meta: dict,
    index_fn=None,
    workers: int = 0,
    progress: bool = True,
) -> ImageStore:
    """Decode `items` (path, slice, axis) into a store at `folder` (atomically, resumably). `index_fn(keep)` builds
    the StoreIndex of the kept records (positions into `items`); `meta` is stored as is (spec, source...)."""
    folder = Path(folder)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a decoding worker (spawned) re-ran the user's script: it would wait for the lock its parent holds, forever
        raise MeddiffError(f"{MAIN_GUARD_HINT}; this is such a worker starting the script again")
    with file_lock(folder.parent / f".{folder.name}.lock", str(folder)):
        done = open_store(folder, key)
        if done is not None:  # another process finished it while we waited
            return done
        try:
            return _write_unlocked(folder, key, items, resolution, fit, meta, index_fn, workers, progress)
        except BrokenProcessPool:
            raise MeddiffError(f"a decoding worker stopped (out of memory?); {MAIN_GUARD_HINT}") from None
        except OSError as exc:
            raise _disk_error(exc, folder) from None


def _write_unlocked(folder, key, items, resolution, fit, meta, index_fn, workers, progress) -> ImageStore:
    partial = folder.parent / f"{folder.name}.partial"
    state_file = partial / "partial.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("key") != key:
        shutil.rmtree(partial, ignore_errors=True)
        state = {"key": key}
    partial.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    per_shard = _shard_size(resolution)
    tasks, members = tasks_for(items)
    # shards cut at task boundaries (a volume stays in one shard)
    bounds, start, count = [], 0, 0
    for t, m in enumerate(members):
        count += len(m)
        if count >= per_shard:
            bounds.append((start, t + 1))
            start, count = t + 1, 0
    if start < len(tasks) or not bounds:
        bounds.append((start, len(tasks)))
    bar = tqdm(
        total=len(items),
        desc=f"prepare {resolution} px",
        unit="img",
        dynamic_ncols=True,
        disable=not progress or len(items) < 200,
    )
    started = time.perf_counter()
    # spawned workers import only numpy, Pillow and meddiff.data.io (safe next to torch's threads, on any OS)
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        if workers and workers > 1
        else None
    )
    task_rows = [len(m) for m in members]
    shard_rows = [sum(task_rows[t0:t1]) for t0, t1 in bounds]
    done: dict[int, dict] = {}
    for s in range(len(bounds)):
        record = partial / f"shard-{s:05d}.json"
        if record.is_file():  # finished by an interrupted run with the same key
            info = json.loads(record.read_text())
            if (partial / info["file"]).is_file():
                done[s] = info
                bar.update(shard_rows[s])
    todo = [s for s in range(len(bounds)) if s not in done]
    for stray in partial.glob("*.npy.direct"):  # scratch files of an interrupted run
        stray.unlink(missing_ok=True)
    rows_now = sum(shard_rows[s] for s in todo)
    _check_free_space(partial, rows_now, resolution)  # room for what is left (finished shards are kept)

    def submit(s: int):
        """Decoding of shard s, started now (in the pool: it runs while the previous shard is being written). With
        workers and only JPEGs (always 8-bit), the workers write the pixels straight into the shard file."""
        chunk = tasks[bounds[s][0] : bounds[s][1]]
        if pool is None:
            return None, map(decode, [(t, resolution, fit) for t in chunk])
        size = max(1, min(16, len(chunk) // (8 * workers)))
        if all(always_8bit(t) for t in chunk):
            target = partial / f"shard-{s:05d}.npy.direct"
            np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(shard_rows[s], resolution, resolution))
            slots = np.concatenate([[0], np.cumsum(task_rows[bounds[s][0] : bounds[s][1]])])
            jobs = [(t, resolution, fit, str(target), int(slot)) for t, slot in zip(chunk, slots)]
            return target, pool.map(decode_into, jobs, chunksize=size)
        return None, pool.map(decode, [(t, resolution, fit) for t in chunk], chunksize=size)

    try:
        upcoming = submit(todo[0]) if todo else None
        for k, s in enumerate(todo):
            results = upcoming
            upcoming = submit(todo[k + 1]) if k + 1 < len(todo) else None  # serial: lazy, decoded when read
            t0, t1 = bounds[s]
            done[s] = _write_shard(partial, f"shard-{s:05d}", results, members[t0:t1], resolution, items, bar)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    shards = [done[s] for s in range(len(bounds))]
    # what this run spent decoding and writing (start-up of the command excluded), with how many worker processes
    timing = {
        "prepare_seconds": round(time.perf_counter() - started, 2),
        "prepare_workers": max(int(workers or 0), 1),
        "prepared_now": int(rows_now),
    }
    return _finish(folder, partial, key, shards, resolution, fit, {**meta, **timing}, index_fn, len(items))


def _write_shard(partial: Path, name: str, submitted, members, resolution, items, bar) -> dict:
    """Collect one shard's decoded images (one list per task, in task order) and write the shard atomically. Where
    the workers wrote the pixels into a scratch file themselves (`submitted[0]`), that file becomes the shard when
    every image decoded; otherwise (failures leave holes, or an image was not 8-bit) the rows are copied."""
    direct, results = submitted
    written = np.load(direct, mmap_mode="r") if direct is not None else None
    arrays, keep, problems, row, fallback = [], [], [], 0, False
    for task_members, outputs in zip(members, results):
        for record, (arr, problem) in zip(task_members, outputs):
            if arr is None:
                problems.append((items[record][0], problem))
            else:
                fallback |= arr is not True
                if arr is True:  # the worker wrote this row into `direct`
                    assert written is not None
                    arr = written[row]
                arrays.append(arr)
                keep.append(record)
            row += 1
        bar.update(len(task_members))
    file = f"{name}.npy"
    if direct is not None and not problems and not fallback:
        os.replace(direct, partial / file)  # the workers' file is complete: no copy
        info = {"file": file, "count": len(arrays), "dtype": "uint8", "keep": keep, "problems": problems}
        _write_json(partial / f"{name}.json", info)
        return info
    dtype = np.uint16 if any(a.dtype == np.uint16 for a in arrays) else np.uint8
    tmp = partial / f"{name}.npy.part"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(arrays), resolution, resolution))
    for i, a in enumerate(arrays):
        out[i] = a.astype(np.uint16) * 257 if (dtype == np.uint16 and a.dtype == np.uint8) else a
    out.flush()
    count = len(arrays)
    del out, arrays, written
    os.replace(tmp, partial / file)
    if direct is not None:
        direct.unlink(missing_ok=True)  # the workers' scratch file, copied from
    info = {"file": file, "count": count, "dtype": np.dtype(dtype).name, "keep": keep, "problems": problems}
    _write_json(partial / f"{name}.json", info)
    return info


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _finish(folder, partial, key, shards, resolution, fit, meta, index_fn, n_items) -> ImageStore:
    keep = np.asarray([k for s in shards for k in s["keep"]], np.int64)
    problems = [tuple(p) for s in shards for p in s["problems"]]
    np.save(partial / "keep.npy", keep, allow_pickle=False)
    if index_fn is not None:
        index: StoreIndex = index_fn(keep)
        np.save(partial / "labels.npy", index.labels, allow_pickle=False)
        np.save(partial / "known.npy", index.known, allow_pickle=False)
        np.save(partial / "prompt_ids.npy", index.prompt_ids, allow_pickle=False)
        _write_json(
            partial / "index.json",
            {
                "label_names": index.label_names,
                "prompt_texts": index.prompt_texts,
                "patients": index.patients,
                "paths": index.paths,
                "multiclass": index.multiclass,
                "prompts_from_labels": index.prompts_from_labels,
            },
        )
    entries = [{"file": s["file"], "count": s["count"], "dtype": s["dtype"]} for s in shards]
    info = {
        **meta,
        "version": STORE_VERSION,
        "key": key,
        "resolution": resolution,
        "fit": fit,
        "count": int(len(keep)),
        "records": n_items,
        "shards": entries,
        "problems": problems,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for s in shards:
        (partial / (Path(s["file"]).stem + ".json")).unlink(missing_ok=True)
    (partial / "partial.json").unlink(missing_ok=True)
    _write_json(partial / STORE_FILE, info)  # written last: its presence marks a complete store
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)  # a stale or foreign store at the same place (under the lock: we are the only writer)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    store = open_store(folder, key)
    if store is None:  # pragma: no cover - a store we just wrote must open
        raise MeddiffError(f"the image store written to {folder} cannot be read back")
    return store


# ----------------------------------------------------------------------------------------------------------------
# several processes


def launch_ranks() -> tuple[int, int, int]:
    """(global rank, local rank, world size) of a process started by accelerate launch / torchrun (0, 0, 1 alone)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def wait_for_store(folder: Path, key: str, timeout_s: float | None = None) -> ImageStore:
    """The other processes of a node: wait until the node's writer has finished the store, then map it."""
    timeout_s = float(os.environ.get("MEDDIFF_STORE_WAIT_S", 24 * 3600)) if timeout_s is None else timeout_s
    t0, said, started = time.monotonic(), False, time.time()
    while True:
        store = open_store(folder, key)
        if store is not None:
            return store
        failed = folder.parent / f"{folder.name}.failed"
        if failed.is_file() and failed.stat().st_mtime >= started - 120:  # this launch's writer failed
            raise MeddiffError(f"the process preparing {folder} failed; see its message")
        if time.monotonic() - t0 > timeout_s:
            raise MeddiffError(
                f"gave up waiting {timeout_s:.0f} s for {folder} to be prepared by local rank 0 "
                "(set MEDDIFF_STORE_WAIT_S, or prepare it first with `meddiff data prepare`)"
            )
        if not said:
            logger.info("waiting for local rank 0 to prepare %s", folder)
            said = True
        time.sleep(1.0)


def prepare_or_wait(folder: Path, key: str, write) -> ImageStore:
    """Single process: write (or reuse) the store. Several processes: local rank 0 writes, the others wait."""
    done = open_store(folder, key)
    if done is not None:
        return done
    _, local_rank, world = launch_ranks()
    if world > 1 and local_rank != 0:
        return wait_for_store(folder, key)
    failed = folder.parent / f"{folder.name}.failed"
    failed.unlink(missing_ok=True)
    try:
        return write()
    except BaseException:
        if world > 1:
            try:
                failed.parent.mkdir(parents=True, exist_ok=True)
                failed.write_text("failed\n")
            except OSError:
                pass
        raise
