import numpy as np
import pytest

from meddiff.evaluation.reconstruction import reconstruction_metrics


def test_perfect_noisy_and_large_images():
    rng = np.random.default_rng(0)
    x = rng.random((4, 32, 32)).astype(np.float32)
    same = reconstruction_metrics(x, x)
    assert same["mse"] == 0 and same["ssim"] > 0.999 and same["psnr"] > 100 and same["ms_ssim"] is None
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    m = reconstruction_metrics(x, noisy)
    assert 0.005 < m["mse"] < 0.02 and 17 < m["psnr"] < 23 and m["ssim"] < 0.95
    big = rng.random((2, 192, 192)).astype(np.float32)
    assert reconstruction_metrics(big, big)["ms_ssim"] > 0.999
    with pytest.raises(ValueError):
        reconstruction_metrics(x, x[:, :16])
