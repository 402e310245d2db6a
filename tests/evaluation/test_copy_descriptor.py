"""The learned copy descriptor: trained on the training images alone, it tells a moved or re-noised copy of a
training image from a new patient better than pixel correlation does; deterministic, stored as safetensors, and bad
input is one line."""

import numpy as np
import pytest
import torch

from meddiff.errors import MeddiffError
from meddiff.evaluation.copy_descriptor import (
    DescriptorSettings,
    acquisition_views,
    embed,
    load_descriptor,
    save_descriptor,
    train_descriptor,
)
from meddiff.evaluation.privacy_gate import ReferenceIndex, augmented_copies

SETTINGS = DescriptorSettings(steps=200, batch_size=128, width=16, dim=64)


@pytest.fixture(scope="module")
def phantoms():
    from meddiff.data.spec import load_dataset

    to01 = lambda d: ((d.images[:].numpy()[:, 0] + 1) / 2).astype(np.float32)  # noqa: E731
    return to01(load_dataset("phantom:?n=300&seed=5", 32)), to01(load_dataset("phantom:?n=300&seed=6", 32))


@pytest.fixture(scope="module")
def descriptor(phantoms):
    return train_descriptor(phantoms[0], SETTINGS)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    return float((positive[:, None] > negative[None, :]).mean() + 0.5 * (positive[:, None] == negative[None, :]).mean())


def test_moved_copies_are_closer_than_new_patients(phantoms, descriptor):
    train, held = phantoms
    plain, learned = ReferenceIndex(train), ReferenceIndex(train, descriptor=descriptor)
    for kind in ("shift", "noise", "crop"):
        copies = augmented_copies(train[:150], kind)
        pixel_auc = auc(plain.scores(copies)["pixel"], plain.scores(held)["pixel"])
        s_copies, s_held = learned.scores(copies), learned.scores(held)
        descriptor_auc = auc(s_copies["descriptor"], s_held["descriptor"])
        assert descriptor_auc > 0.9 and descriptor_auc > pixel_auc, (kind, descriptor_auc, pixel_auc)
    # exact copies sit at similarity 1 with their own source
    z, ref = embed(descriptor, train[:10]), embed(descriptor, train)
    assert np.array_equal((z @ ref.T).argmax(1), np.arange(10)) and np.allclose((z * z).sum(1), 1, atol=1e-5)


def test_training_is_deterministic_and_round_trips_through_safetensors(tmp_path, phantoms):
    train, held = phantoms
    short = DescriptorSettings(steps=8, batch_size=32, width=16, dim=64)  # determinism needs no trained network
    descriptor, again = train_descriptor(train, short), train_descriptor(train, short)
    assert np.allclose(embed(again, held[:20]), embed(descriptor, held[:20]), atol=1e-5)
    other = train_descriptor(train, DescriptorSettings(steps=8, batch_size=32, width=16, dim=64, seed=1))
    assert not np.allclose(embed(other, held[:20]), embed(descriptor, held[:20]), atol=1e-3)  # the seed matters
    stored = save_descriptor(descriptor, short, tmp_path)
    assert (tmp_path / "descriptor.safetensors").is_file() and stored["dim"] == 64
    loaded = load_descriptor(tmp_path, stored)
    assert np.array_equal(embed(loaded, held[:20]), embed(descriptor, held[:20]))
    with pytest.raises(MeddiffError, match="not a copy descriptor of this kind"):
        load_descriptor(tmp_path, {**stored, "width": 32})
    with pytest.raises(MeddiffError, match="is missing"):
        load_descriptor(tmp_path / "nowhere", stored)


def test_views_change_images_within_range():
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    v = acquisition_views(x, torch.Generator().manual_seed(1))
    assert v.shape == x.shape and 0 <= float(v.min()) and float(v.max()) <= 1
    assert not torch.allclose(v, x) and torch.equal(v, acquisition_views(x, torch.Generator().manual_seed(1)))


def test_bad_input_is_one_line():
    with pytest.raises(MeddiffError, match="too small"):
        train_descriptor(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(MeddiffError, match="at least 2 training images"):
        train_descriptor(np.zeros((1, 32, 32), np.float32))


def blurred(images: np.ndarray) -> np.ndarray:
    """A change the acquisition views never make (a strong 5 x 5 box blur), standing in for a model's re-drawing."""
    x = torch.from_numpy(images).unsqueeze(1)
    return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)[:, 0].numpy()


def test_partners_teach_the_descriptor_what_else_counts_as_the_same_image(phantoms, descriptor):
    train, held = phantoms
    taught = train_descriptor(train, SETTINGS, partners=blurred(train))
    copies = blurred(train[:150])
    aucs = {}
    for name, net in (("plain", descriptor), ("taught", taught)):
        index = ReferenceIndex(train, descriptor=net)
        aucs[name] = auc(index.scores(copies)["descriptor"], index.scores(held)["descriptor"])
    assert aucs["taught"] > aucs["plain"] + 0.05 and aucs["taught"] > 0.9, aucs
    with pytest.raises(MeddiffError, match="partners must match"):
        train_descriptor(train, SETTINGS, partners=train[:10])
