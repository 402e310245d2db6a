import csv

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.data.io import read_image, resize, write_png
from meddiff.data.spec import DatasetSpec, load_dataset, parse_spec
from meddiff.errors import MeddiffError


def test_parse_spec():
    spec = parse_spec("medmnist:data/x.npz?split=val&foo=bar")
    assert (spec.kind, spec.path, spec.options) == ("medmnist", "data/x.npz", {"split": "val", "foo": "bar"})
    assert spec.heldout().options["split"] == "test"
    assert str(parse_spec("phantom:d")) == "phantom:d"
    with pytest.raises(MeddiffError, match="unknown dataset kind 'nope'"):
        parse_spec("nope:x")
    with pytest.raises(MeddiffError, match="has no kind"):
        parse_spec("just/a/path")


def test_phantom_folder_round_trip(phantom_dir):
    train = load_dataset(f"phantom:{phantom_dir}", 32)
    valid = load_dataset(f"phantom:{phantom_dir}?split=valid", 32)
    assert len(train) == 48 and len(valid) == 12
    assert train.images.shape == (48, 1, 32, 32)
    assert -1.0 <= float(train.images[:].min()) and float(train.images[:].max()) <= 1.0
    assert train.label_names[0] == "No Finding" and "Cardiomegaly" in train.label_names
    with open(phantom_dir / "train.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:5] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    k = train.label_names.index("Cardiomegaly")
    assert [float(r["Cardiomegaly"]) for r in rows] == train.labels[:, k].tolist()
    assert rows[0]["Fracture"] == ""  # not modelled -> blank, as in CheXpert
    for i in range(len(train)):
        if train.labels[i, k] > 0.5:
            assert "cardiomegaly" in train.prompts[i]
        if train.labels[i, 0] > 0.5:
            assert train.prompts[i] == "normal chest x-ray"


def test_bad_inputs(tmp_path, phantom_dir):
    with pytest.raises(MeddiffError, match="does not exist"):
        load_dataset(f"phantom:{tmp_path / 'missing'}", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeddiffError, match="no train.csv"):
        load_dataset(f"phantom:{tmp_path / 'empty'}", 32)
    with pytest.raises(MeddiffError, match="unknown option"):
        load_dataset(f"phantom:{phantom_dir}?colour=red", 32)
    with pytest.raises(MeddiffError, match="not found"):
        load_dataset(f"medmnist:{tmp_path / 'x.npz'}", 28)


def test_corrupt_image_is_counted_not_dropped_silently(tmp_path, phantom_dir, caplog):
    import shutil

    root = tmp_path / "ph"
    shutil.copytree(phantom_dir, root)
    first = sorted((root / "train").glob("*.png"))[0]
    first.write_bytes(b"not a png")
    ds = load_dataset(f"phantom:{root}", 32)
    assert len(ds) == 47 and ds.skipped == 1
    out = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipped 1 of 48 images (1 unreadable)" in out and first.name in out
    assert ds.problems[0][0].endswith(first.name)
    assert "1 unreadable" in ds.summary()


def test_sixteen_bit_precision_is_kept(tmp_path):
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float64).reshape(64, 64)
    write_png(tmp_path / "a.png", ramp, bit_depth=16)
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    back = read_image(tmp_path / "a.png")
    assert np.abs(back - ramp).max() < 1e-4  # 8-bit would be off by up to 2e-3
    assert len(np.unique(back)) > 256
    assert resize(back, 32).shape == (32, 32)


def _npz(path, labels_train, labels_test, shape=(28, 28)):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (len(labels_train),) + shape, dtype=np.uint8),
        train_labels=np.asarray(labels_train),
        test_images=rng.integers(0, 255, (len(labels_test),) + shape, dtype=np.uint8),
        test_labels=np.asarray(labels_test),
    )


def test_medmnist_binary_and_multilabel(tmp_path):
    _npz(tmp_path / "pneumoniamnist.npz", [[0], [1], [1]], [[0], [1]])
    ds = load_dataset(f"medmnist:{tmp_path / 'pneumoniamnist.npz'}", 28)
    assert ds.label_names == ["Normal", "Pneumonia"] and ds.multiclass
    assert ds.labels.tolist() == [[1, 0], [0, 1], [0, 1]]
    assert len(load_dataset(f"medmnist:{tmp_path / 'pneumoniamnist.npz'}?split=test", 32)) == 2
    multi = np.zeros((3, 14), int)
    multi[1, 1] = 1
    _npz(tmp_path / "chestmnist.npz", multi, multi[:2])
    ds = load_dataset(f"medmnist:{tmp_path / 'chestmnist.npz'}", 28)
    assert len(ds.label_names) == 14 and ds.label_names[1] == "Cardiomegaly" and not ds.multiclass
    with pytest.raises(MeddiffError, match="no split 'val'"):
        load_dataset(f"medmnist:{tmp_path / 'chestmnist.npz'}?split=val", 28)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(MeddiffError, match="not a readable"):
        load_dataset(f"medmnist:{tmp_path / 'bad.npz'}", 28)


def test_in_memory_phantoms():
    ds = load_dataset("phantom:?n=16&seed=2", 32)
    assert len(ds) == 16 and bool(ds.known.all())
    assert torch.equal(ds.images, load_dataset("phantom:?n=16&seed=2", 32).images)
    assert len(load_dataset("phantom:?n=16&seed=2&split=valid", 32)) == 4


def test_real_pneumoniamnist_if_present():
    from tests.conftest import SHARED_NPZ

    if not SHARED_NPZ.is_file():
        pytest.skip("shared pneumoniamnist.npz not present")
    ds = load_dataset(f"medmnist:{SHARED_NPZ}", 28)
    assert ds.label_names == ["Normal", "Pneumonia"] and len(ds) > 1000
    assert DatasetSpec.parse(f"medmnist:{SHARED_NPZ}").heldout().options == {"split": "test"}
