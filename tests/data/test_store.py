"""The prepared image store: contents, bit depth, parallel = serial, resume after a kill, atomicity, refusals,
one writer among several processes, and memory-mapped reading."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.cli import main
from meddiff.data import store as store_module
from meddiff.data.cache import cache_root
from meddiff.data.spec import load_dataset
from meddiff.data.store import MappedImages, open_store
from meddiff.errors import MeddiffError


def _class_folder(root: Path, n: int = 24, size=(80, 64), corrupt: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("AD", "NC"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2):
            arr = (rng.random(size[::-1]) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{cls} ({i}).jpg", quality=90)
    for i in range(corrupt):
        (root / "AD" / f"broken {i}.jpg").write_bytes(b"not a jpeg")
    return root


def test_prepare_store_contents_and_store_kind(tmp_path):
    src = _class_folder(tmp_path / "src")
    out = tmp_path / "store"
    assert (
        main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "32", "--workers", "2"])
        == 0
    )
    store = open_store(out)
    assert store is not None and len(store.images) == 24 and len(store.problems) == 1
    assert not list(out.glob("*.direct"))  # the workers' scratch file went after the copy around the hole
    assert store.meta["shards"][0]["dtype"] == "uint8"  # 8-bit JPEGs stay 8-bit
    assert "broken 0.jpg" in store.problems[0][0]
    index = store.index()
    assert index.label_names == ["AD", "NC"] and index.labels.shape == (24, 2)
    assert all(p.endswith(".jpg") for p in index.paths) and len(set(index.patients)) == 24
    ds = load_dataset(f"store:{out}", 32)
    direct = load_dataset(f"folder:{src}?split=all&cache=0", 32)
    assert torch.equal(ds.images[:], direct.images[:])  # workers give what one process gives
    assert torch.equal(ds.labels, direct.labels) and ds.skipped == direct.skipped == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 24 and summary["skipped"] == 1 and summary["dtypes"] == ["uint8"]
    with pytest.raises(MeddiffError, match="prepared at 32 px, not 64 px"):
        load_dataset(f"store:{out}", 64)
    with pytest.raises(MeddiffError, match="is not a prepared store"):
        load_dataset(f"store:{tmp_path / 'nothing'}", 32)


def test_sixteen_bit_sources_keep_sixteen_bits(tmp_path):
    (tmp_path / "src" / "A").mkdir(parents=True)
    (tmp_path / "src" / "B").mkdir(parents=True)
    ramp = (np.arange(32 * 32, dtype=np.float64).reshape(32, 32) * 60).astype(np.uint16)
    for cls in ("A", "B"):
        Image.fromarray(ramp).save(tmp_path / "src" / cls / "x.png")
    ds = load_dataset(f"folder:{tmp_path / 'src'}?split=all", 32)
    store = open_store(cache_root() / "stores" / ds.store_key)
    assert store.meta["shards"][0]["dtype"] == "uint16"
    values = (ds.images[0, 0].numpy() + 1) / 2 * 65535
    assert np.abs(values - ramp).max() < 1.5  # not rounded to 8 bits (that would be off by up to 128)


def test_killed_preparation_resumes_and_is_never_trusted(tmp_path, monkeypatch):
    src = _class_folder(tmp_path / "src", n=40, corrupt=0)
    out = tmp_path / "store"
    monkeypatch.setattr(store_module, "_shard_size", lambda resolution: 8)  # 5 shards
    calls = {"n": 0}
    real = store_module._write_shard

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "_write_shard", dies_on_third)
    assert main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "16"]) != 0
    assert not out.exists() and open_store(out) is None  # nothing a later run would trust
    assert len(list((tmp_path / "store.partial").glob("shard-*.npy"))) == 2
    with pytest.raises(MeddiffError, match="interrupted preparation"):
        load_dataset(f"store:{out}", 16)
    calls["n"] = 10  # the rerun must write only the 3 missing shards
    written = []
    monkeypatch.setattr(store_module, "_write_shard", lambda *a, **k: written.append(a[1]) or real(*a, **k))
    assert main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "16"]) == 0
    assert written == ["shard-00002", "shard-00003", "shard-00004"]
    ds = load_dataset(f"store:{out}", 16)
    direct = load_dataset(f"folder:{src}?split=all&cache=0", 16)
    assert torch.equal(ds.images[:], direct.images[:]) and not (tmp_path / "store.partial").exists()


def test_store_of_other_sources_is_rebuilt_and_foreign_folder_refused(tmp_path, capsys):
    a = _class_folder(tmp_path / "a", n=8, corrupt=0)
    b = _class_folder(tmp_path / "b", n=12, corrupt=0)
    out = tmp_path / "store"
    assert main(["data", "prepare", f"folder:{a}?split=all", "--out", str(out), "--resolution", "16"]) == 0
    assert main(["data", "prepare", f"folder:{b}?split=all", "--out", str(out), "--resolution", "16"]) == 0
    assert "it was rebuilt" in capsys.readouterr().err  # a library message: logged, on stderr under the CLI
    assert len(load_dataset(f"store:{out}", 16)) == 12
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["data", "prepare", f"folder:{a}?split=all", "--out", str(tmp_path / "other")]) == 2
    assert "not a prepared store" in capsys.readouterr().err


def test_full_disk_is_one_line_and_leaves_no_store(tmp_path, monkeypatch, capsys):
    src = _class_folder(tmp_path / "src", n=8, corrupt=0)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.np.lib.format, "open_memmap", full)
    assert main(["data", "prepare", f"folder:{src}?split=all", "--out", str(tmp_path / "s"), "--resolution", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0]
    assert open_store(tmp_path / "s") is None


def test_damaged_shard_is_not_trusted(tmp_path):
    src = _class_folder(tmp_path / "src", n=8, corrupt=0)
    out = tmp_path / "s"
    assert main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "16"]) == 0
    shard = out / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert open_store(out) is None
    with pytest.raises(MeddiffError, match="damaged"):
        load_dataset(f"store:{out}", 16)


def test_one_writer_among_processes_of_a_node(tmp_path):
    """Two processes of one launch (local ranks 0 and 1) ask for the same store: rank 0 writes, rank 1 waits and
    maps the same files."""
    src = _class_folder(tmp_path / "src", n=16, corrupt=0)
    script = (
        "import sys; from meddiff.data import store, decode\n"
        "calls = []\n"
        "real = store.decode\n"
        "store.decode = lambda job: calls.append(1) or real(job)\n"
        "from meddiff.data.spec import load_dataset\n"
        f"ds = load_dataset('folder:{src}?split=all', 16)\n"
        "print('decoded', len(calls), 'images', len(ds), 'key', ds.store_key)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "MEDDIFF_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    lines = [[ln for ln in o.splitlines() if ln.startswith("decoded")][0].split() for o in outs]
    assert lines[0][1] == "0" and lines[1][1] == "16"  # rank 1 decoded nothing
    assert lines[0][5] == lines[1][5] and lines[0][3] == lines[1][3] == "16"
    assert "waiting for local rank 0" in outs[0] or lines[0][1] == "0"


def test_mapped_images_index_like_a_tensor_and_pickle_as_paths(tmp_path):
    src = _class_folder(tmp_path / "src", n=10, corrupt=0)
    ds = load_dataset(f"folder:{src}?split=all", 16)
    images = ds.images
    assert isinstance(images, MappedImages)
    full = images[:]
    assert full.shape == (10, 1, 16, 16) and full.dtype == torch.float32
    assert -1 <= float(full.min()) and float(full.max()) <= 1
    assert torch.equal(images[3], full[3]) and torch.equal(images[torch.tensor([4, 1])], full[[4, 1]])
    assert torch.equal(images[2:5, 0], full[2:5, 0]) and torch.equal(images[-1], full[-1])
    blob = pickle.dumps(images)
    assert len(blob) < 2000  # file names, not pixels
    assert torch.equal(pickle.loads(blob)[:], full)
    batch = ds.__getitems__([0, 7, 3])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 1, 16, 16)
    assert batch["index"].tolist() == [0, 7, 3]
    part = ds.subset([7, 2])  # a split (e.g. public / private): floats in memory, labels and prompts follow
    assert torch.equal(part.images, full[[7, 2]]) and part.labels.tolist() == ds.labels[[7, 2]].tolist()
    assert (
        part.prompts == [ds.prompts[7], ds.prompts[2]] and part.store_key == "" and part.label_names == ds.label_names
    )
    assert part.__getitems__([1])["image"].dtype == torch.float32  # the loader takes in-memory floats as they are
    with pytest.raises(IndexError, match="within 0..9"):
        ds.subset([10])


def test_subset_keeps_patient_ids():
    from meddiff.data.dataset import ImageLabelDataset

    labels = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    ds = ImageLabelDataset(torch.zeros(6, 1, 8, 8), labels, torch.ones(6, 1, dtype=torch.bool), ["Edema"])
    ds.patients = ["p0", "p0", "p1", "p2", "p2", "p3"]
    part = ds.subset(torch.tensor([5, 0, 5]))
    assert list(part.patients) == ["p3", "p0", "p3"] and part.labels[:, 0].tolist() == [0, 0, 0]
    other = ds.subset([4, 1])
    assert (
        list(other.patients) == ["p2", "p0"]
        and other.labels[:, 0].tolist() == [1, 1]
        and other.prompts == [ds.prompts[4], ds.prompts[1]]
    )
    with pytest.raises(TypeError, match="not a mask"):
        ds.subset(np.ones(6, bool))


def test_workers_write_jpeg_shards_in_place_and_mixed_shards_are_copied(tmp_path):
    """All-JPEG shards are written by the workers straight into the shard file (no pixels sent back); a shard that
    also holds a 16-bit PNG goes the copying way; both equal what one process decodes."""
    src = _class_folder(tmp_path / "src", n=16, corrupt=0)
    out = tmp_path / "store"
    assert (
        main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "32", "--workers", "2"])
        == 0
    )
    assert not list(out.glob("*.direct")) and not list(out.glob("*.part"))
    direct = load_dataset(f"folder:{src}?split=all&cache=0", 32)
    assert torch.equal(load_dataset(f"store:{out}", 32).images[:], direct.images[:])
    assert open_store(out).meta["prepare_workers"] == 2 and open_store(out).meta["prepare_seconds"] > 0
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)).save(src / "NC" / "deep.png")
    mixed = tmp_path / "mixed"
    assert (
        main(
            ["data", "prepare", f"folder:{src}?split=all", "--out", str(mixed), "--resolution", "32", "--workers", "2"]
        )
        == 0
    )
    store = open_store(mixed)
    assert store.meta["shards"][0]["dtype"] == "uint16" and len(store.images) == 17
    assert torch.allclose(
        load_dataset(f"store:{mixed}", 32).images[:],
        load_dataset(f"folder:{src}?split=all&cache=0", 32).images[:],
        atol=1e-6,
    )


def test_many_shards_keep_few_descriptors_and_read_the_same(tmp_path, monkeypatch):
    """Shards are read with positioned reads, at most OPEN_SHARDS_MAX files open per process (a store of thousands
    of shards must not run out of descriptors), and give what one process decodes."""
    src = _class_folder(tmp_path / "src", n=24, corrupt=0)
    monkeypatch.setattr(store_module, "_shard_size", lambda resolution: 4)
    monkeypatch.setattr(store_module, "OPEN_SHARDS_MAX", 2)
    out = tmp_path / "store"
    assert main(["data", "prepare", f"folder:{src}?split=all", "--out", str(out), "--resolution", "16"]) == 0
    store = open_store(out)
    assert len(store.meta["shards"]) == 6
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    images = store.images[torch.randperm(24)]  # every shard, in random order
    assert fds() - before <= 2
    direct = load_dataset(f"folder:{src}?split=all&cache=0", 16).images[:]
    assert torch.equal(store.images[:], direct)
    assert images.shape == (24, 1, 16, 16) and pickle.loads(pickle.dumps(store.images)).shape == store.images.shape


def test_a_script_without_a_main_guard_gets_the_hint_instead_of_a_hang(tmp_path):
    """Decoding workers are spawned, which imports the user's script again: without `if __name__ == "__main__":`
    each worker would prepare the store too and wait for the lock its parent holds. The script ends, with the
    hint."""
    src = _class_folder(tmp_path / "src", n=16, corrupt=0)
    script = tmp_path / "prepare_it.py"
    script.write_text(
        "from pathlib import Path\n"
        "from meddiff.data.prepare import prepare\n"
        "from meddiff.errors import MeddiffError\n"
        "try:\n"
        f"    prepare('folder:{src}?split=all', Path({str(tmp_path / 'store')!r}), 32, workers=2, progress=False)\n"
        "except MeddiffError as exc:\n"
        "    raise SystemExit(f'error: {exc}')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and 'if __name__ == "__main__":' in last, proc.stderr[-2000:]
