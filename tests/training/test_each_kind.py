"""Training runs a few steps on every dataset kind."""

import math

import numpy as np
import pytest

from meddiff.data.spec import load_dataset
from meddiff.models.factory import ModelConfig
from meddiff.models.storage import load_pipeline
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train
from tests.data.fixtures import chexpert_small, class_folders, dicom_file, mimic_jpg


def _npz(path, labels):
    rng = np.random.default_rng(0)
    n = len(labels)
    np.savez(
        path,
        train_images=rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8),
        train_labels=np.asarray(labels),
        test_images=rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8),
        test_labels=np.asarray(labels[:2]),
    )
    return path


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    multi = np.zeros((6, 14), int)
    multi[::2, 3] = 1
    (root / "dcm").mkdir()
    rows = ["path,AD"]
    for i in range(4):
        dicom_file(
            root / "dcm" / f"{i}.dcm",
            (np.random.default_rng(i).random((24, 24)) * 4000).astype(np.uint16),
            "MONOCHROME1" if i % 2 else "MONOCHROME2",
        )
        rows.append(f"dcm/{i}.dcm,{i % 2}")
    (root / "dicom.csv").write_text("\n".join(rows) + "\n")
    return {
        "chexpert": f"chexpert:{chexpert_small(root / 'cx')}?val_fraction=0",
        "mimic": f"mimic:{mimic_jpg(root / 'mimic')}",
        "medmnist-multiclass": f"medmnist:{_npz(root / 'bloodmnist.npz', [[i % 8] for i in range(6)])}",
        "medmnist-multilabel": f"medmnist:{_npz(root / 'chestmnist.npz', multi)}",
        "folder": f"folder:{class_folders(root / 'folders', split_folders=True)}",
        "csv-dicom": f"csv:{root / 'dicom.csv'}?split=all",
    }


@pytest.mark.parametrize(
    "kind",
    ["chexpert"]  # the fast lane trains on one kind; every kind's loading is tested in tests/data
    + [
        pytest.param(k, marks=pytest.mark.slow)
        for k in ("mimic", "medmnist-multiclass", "medmnist-multilabel", "folder", "csv-dicom")
    ],
)
def test_training_runs_on_every_kind(specs, kind, tmp_path):
    data = load_dataset(specs[kind], 32)
    cfg = TrainConfig(
        data=specs[kind],
        out=str(tmp_path),
        max_steps=2,
        batch_size=4,
        checkpoint_every=0,
        model=ModelConfig(block_out_channels=[16, 32], layers_per_block=1),
    )
    result = train(cfg, data, progress=False)
    assert result.steps == 2 and (tmp_path / "pipeline" / "model_index.json").is_file()
    # the saved model is conditioned on this kind's labels, at this size, with a finite loss
    assert data.label_names and result.loss_history and all(math.isfinite(h[1]) for h in result.loss_history)
    pipe = load_pipeline(tmp_path)
    assert pipe.label_names == data.label_names
    assert pipe.unet.config.sample_size == 32 and pipe.unet.config.in_channels == 1
    assert pipe.unet.class_embedding.linear_1.in_features == 2 * len(data.label_names)
