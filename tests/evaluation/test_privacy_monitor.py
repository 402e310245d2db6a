"""The memorisation monitor: a model that returns training images is caught (copy rate near 1, the training images
it copies counted) and warned about on the second check in a row, with a stop when asked; a model that draws new
images is not; images are compared at the configured size."""

import numpy as np
import pytest

import meddiff.sampling.generate as generate
from meddiff.data.spec import load_dataset
from meddiff.evaluation import privacy_monitor
from meddiff.evaluation.privacy_monitor import PrivacyMonitor, compare_images
from meddiff.training.config import PrivacyMonitorConfig


@pytest.fixture(scope="module")
def data():
    return load_dataset("phantom:?n=600&seed=5", 32), load_dataset("phantom:?n=600&seed=5&split=valid", 32)


class Pipe:
    label_names: list = []

    def __init__(self):
        from meddiff.models.factory import ModelConfig, build_noise_scheduler

        self.scheduler = build_noise_scheduler(ModelConfig())


def monitor_with(monkeypatch, data, images, stop=False, size=16, descriptor_steps=0):
    train, held = data
    config = PrivacyMonitorConfig(
        every=10, samples=len(images), alpha=0.05, stop=stop, compare_size=size, descriptor_steps=descriptor_steps
    )
    monitor = PrivacyMonitor(config, train, held)
    monkeypatch.setattr(generate, "sample", lambda *a, **k: images)
    monkeypatch.setattr(PrivacyMonitor, "loss_gap", lambda self, pipe, method: {"loss_gap": 0.0})
    return monitor


def test_a_copying_model_is_warned_about_on_the_second_check_and_stopped(monkeypatch, data):
    train, _ = data
    copies = ((train.images[:40].numpy()[:, 0] + 1) / 2).astype(np.float32)
    copies[20:] = copies[:20]  # 40 samples, 20 distinct training images
    monitor = monitor_with(monkeypatch, data, copies, stop=True)
    assert monitor.size == 16 and monitor.index.images.shape[1:] == (16, 16)
    first = monitor(10, Pipe(), None, [])
    assert first["copy_rate"] == 1.0 and first["training_images_hit"] == 20 and first["above_alpha"]
    assert "warning" not in first and not first.get("stop")  # one check is not yet a trend
    second = monitor(20, Pipe(), None, [first])
    assert "memorising" in second["warning"] and second["stop"] is True


def test_new_images_are_not_flagged(monkeypatch, data):
    new = ((load_dataset("phantom:?n=100&seed=9", 32).images.numpy()[:, 0] + 1) / 2).astype(np.float32)
    monitor = monitor_with(monkeypatch, data, new, size=32)
    result = monitor(10, Pipe(), None, [])
    assert result["copy_rate"] <= 0.1 and not result["above_alpha"] and "warning" not in result
    again = monitor(20, Pipe(), None, [result])
    assert "warning" not in again


def test_compare_images_downsizes_in_blocks():
    x = np.linspace(-1, 1, 5 * 32 * 32, dtype=np.float32).reshape(5, 1, 32, 32)
    out = compare_images(x, 16, block=2)
    assert out.shape == (5, 16, 16) and 0 <= out.min() and out.max() <= 1
    assert np.allclose(compare_images(x, 64)[:, 0, 0], (x[:, 0, 0, 0] + 1) / 2)
    assert privacy_monitor.NAME == "privacy"


def test_the_checks_sample_with_a_sampler_that_shows_copies():
    from meddiff.evaluation.privacy_monitor import revealing_sampler
    from meddiff.models.factory import ModelConfig, build_noise_scheduler

    class P:
        def __init__(self, objective):
            self.scheduler = build_noise_scheduler(ModelConfig(objective=objective))

    assert revealing_sampler(P("diffusion")) == "ddim" and revealing_sampler(P("flow")) == "euler"


def test_with_a_copy_descriptor_moved_and_renoised_copies_are_caught_and_new_images_are_not(monkeypatch, data):
    """privacy.descriptor_steps: the check trains the export gate's copy descriptor on the training images and fuses
    it with the pixel detectors."""
    from meddiff.evaluation.privacy_gate import augmented_copies

    train, _ = data
    originals = ((train.images[:30].numpy()[:, 0] + 1) / 2).astype(np.float32)
    moved = np.concatenate([augmented_copies(originals[:15], "shift", 1), augmented_copies(originals[15:], "noise", 2)])
    monitor = monitor_with(monkeypatch, data, moved, size=32, descriptor_steps=40)
    assert monitor.index.descriptor is not None and "descriptor" in monitor.calibration.detectors
    caught = monitor(10, Pipe(), None, [])
    assert caught["copy_rate"] >= 0.8 and caught["above_alpha"] and caught["training_images_hit"] >= 20
    new = ((load_dataset("phantom:?n=60&seed=9", 32).images.numpy()[:, 0] + 1) / 2).astype(np.float32)
    monkeypatch.setattr(generate, "sample", lambda *a, **k: new)
    assert monitor(20, Pipe(), None, [])["copy_rate"] <= 0.1
    assert "descriptor" not in monitor_with(monkeypatch, data, new, size=32).calibration.detectors  # off by default
