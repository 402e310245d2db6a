"""meddiff.sampling.animate: one GIF per image from the denoising steps; latent models show the decoded image
beside the latent's channels (a stand-in pipeline, no model)."""

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.sampling.animate import DenoisingRecorder


class StandInPipe:
    """decode_latents: the mean over channels, upsampled 2x (pixel models: the sample itself)."""

    def __init__(self, is_latent):
        self.is_latent = is_latent

    def decode_latents(self, sample):
        if not self.is_latent:
            return sample
        return torch.nn.functional.interpolate(sample.mean(1, keepdim=True), scale_factor=2)


def frames_of(path):
    with Image.open(path) as gif:
        out = []
        for k in range(gif.n_frames):
            gif.seek(k)
            out.append((np.asarray(gif.convert("L"), np.float32) / 255, gif.info.get("duration")))
    return out


def test_pixel_frames_go_from_noise_to_image(tmp_path):
    recorder = DenoisingRecorder(StandInPipe(False), display_size=16)
    steps = [torch.full((2, 1, 8, 8), v) for v in (-1.0, 0.0, 1.0)]  # model range: dark, grey, white
    for step, sample in enumerate(steps):
        recorder(offset=4, step=step, timestep=999 - step, sample=sample)
    assert sorted(recorder.frames) == [4, 5] and len(recorder.frames[4]) == 3
    path = recorder.save(5, tmp_path / "anim" / "0000005.gif", frame_ms=50, hold_ms=500)
    frames = frames_of(path)
    assert len(frames) == 3 and frames[0][0].shape == (16, 16)
    assert [round(float(f.mean()), 2) for f, _ in frames] == [0.0, 0.5, 1.0]
    assert [d for _, d in frames] == [50, 50, 500]  # the last frame is held


def test_latent_frames_show_the_image_beside_each_channel(tmp_path):
    recorder = DenoisingRecorder(StandInPipe(True), display_size=16)
    latent = torch.zeros(1, 4, 4, 4)
    latent[0, 1] = torch.arange(16.0).reshape(4, 4)  # one channel with a ramp, the others flat
    recorder(offset=0, step=0, timestep=999, sample=latent)
    [panel] = recorder.frames[0]
    assert panel.shape == (16, 16 + 4 + 16)  # decoded image | 4-px gap | 2x2 tiles of the 4 channels
    assert np.all(panel[:, 16:20] == 1.0)
    tiles = panel[:, 20:]
    ramp = tiles[:8, 8:]  # channel 1: top right tile, normalised to its 1st..99th percentile
    assert ramp.min() == pytest.approx(0.0, abs=0.01) and ramp.max() == pytest.approx(1.0, abs=0.01)
    assert np.all(tiles[:8, :8] == 0.0)  # a flat channel stays flat
