"""Real BraTS cases through the volume autoencoder (issue 20): two training cases at 32^3 overfit in a few dozen steps
of meddiff's training loop, round trips keep the volumes' shape, and the saved autoencoder loads again. Skipped when
../shared/data/brats-deepmedic is absent. bench/brats_roundtrip.py measures the same at 64^3 with more steps."""

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.data.spec import load_dataset
from meddiff.models.volume import VolumeModelConfig
from meddiff.models.volume_autoencoder import VolumeAutoencoder, VolumeAutoencoderConfig
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train
from meddiff.workflow_volume import reconstruction_metrics

BRATS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "brats-deepmedic"
SPEC = f"volumes:{BRATS}?modalities=flair&label_from_mask=OTMultiClass&brainmask=brainmask&shape=32"

NO_DATA = "real BraTS cases (../shared/data/brats-deepmedic) not present"


def _errors(autoencoder: VolumeAutoencoder, images) -> tuple[float, float, torch.Tensor]:
    """(PSNR dB, mean absolute error on voxels in [0, 1], the round trips) of whole volumes."""
    trips: list[torch.Tensor] = []
    metrics = reconstruction_metrics(autoencoder, images, keep=trips)
    x, y = torch.as_tensor(np.asarray(images, dtype=np.float32)), torch.cat(trips)
    return metrics.psnr, float((x - y).abs().mean()) / 2, y


@pytest.mark.skipif(not BRATS.is_dir(), reason=NO_DATA)
@pytest.mark.slow  # ~25 s on 2 busy CPU cores: 2 real cases decoded, 40 training steps
def test_the_volume_autoencoder_overfits_two_real_brats_cases(tmp_path):
    train_set = load_dataset(f"{SPEC}&split=train", 32)
    assert len(train_set) == 2 and train_set.shape == (1, 32, 32, 32)
    config = TrainConfig(
        out=str(tmp_path / "ae"),
        method="volume-autoencoder",
        max_steps=40,
        batch_size=2,
        learning_rate=3e-3,
        lr_warmup_steps=2,
        checkpoint_every=0,
        log_every=10,
        precision="fp32",
        threads=1,  # 3D convolutions on a shared CPU: one thread is several times faster than two contended ones
        volume=VolumeModelConfig(size=32, autoencoder=VolumeAutoencoderConfig(channels=[8, 16, 16], scale_samples=2)),
    )
    threads = torch.get_num_threads()
    try:
        torch.manual_seed(config.seed)  # what the loop does before building the model: its initial weights
        untrained = VolumeAutoencoder(config.volume.autoencoder, 1).eval()
        psnr_before, mae_before, _ = _errors(untrained, train_set.images)
        result = train(config, train_set, progress=False)
        autoencoder = VolumeAutoencoder.from_pretrained(result.run_dir)
        psnr_after, mae_after, trips = _errors(autoencoder, train_set.images)
        heldout = load_dataset(f"{SPEC}&split=valid", 32)
        _, mae_heldout, heldout_trips = _errors(autoencoder, heldout.images)
    finally:
        torch.set_num_threads(threads)
    # measured (seeds 0-2): MAE 0.43-0.47 -> 0.06-0.07 (x0.14-0.16), PSNR 5.6-6.1 -> 18.4-19.0 dB; wide margins
    assert mae_after < 0.5 * mae_before, (mae_before, mae_after)
    assert psnr_after > psnr_before + 6, (psnr_before, psnr_after)
    assert trips.shape == (2, 1, 32, 32, 32) and torch.isfinite(trips).all()
    assert heldout_trips.shape == (2, 1, 32, 32, 32) and torch.isfinite(heldout_trips).all()
    assert mae_heldout < mae_before  # 2 cases teach a little about others too
    assert heldout.spacing == train_set.spacing  # held-out cases are resampled on the training grid
    assert autoencoder.in_channels == 1 and np.isfinite(autoencoder.scaling_factor) and autoencoder.scaling_factor > 0
    assert autoencoder.latent_shape(train_set.shape[1:]) == (4, 8, 8, 8)
    assert not any(p.requires_grad for p in autoencoder.parameters())


def test_the_bench_skips_cleanly_without_the_data(tmp_path):
    import json
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench" / "brats_roundtrip.py"
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(bench), "--data", str(tmp_path / "absent"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("skipped:") and len(proc.stdout.strip().splitlines()) == 1
    assert "skipped" in json.loads(out.read_text())
