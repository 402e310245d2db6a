"""From-scratch, label-conditioned (or unconditional) diffusion in pixel space."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from meddiff.conditioning.labels import LabelCodec
from meddiff.models.factory import build_noise_scheduler, build_unet
from meddiff.models.storage import PIPELINE_DIR, save_pipeline
from meddiff.training.methods.base import TrainingMethod, register_method


@register_method
class PixelDiffusion(TrainingMethod):
    name = "pixel"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.codec = LabelCodec(dataset.label_names)
        self.noise_scheduler = build_noise_scheduler(config.model)
        self._unet = build_unet(config.model, config.resolution, len(dataset.label_names))

    @property
    def model(self):
        return self._unet

    def loss(self, model, batch, generator):
        x0 = batch["image"]
        b = x0.shape[0]
        cond = None
        if self.codec.label_names:
            cond = self.codec.drop(self.codec.encode(batch["labels"], batch["known"]), self.config.cond_dropout,
                                   generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        pred = model(xt, t, encoder_hidden_states=None, class_labels=cond).sample.float()
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma:
            snr = compute_snr(self.noise_scheduler, t)
            clipped = torch.clamp(snr, max=self.config.snr_gamma)
            weight = clipped / (snr + 1) if self.noise_scheduler.config.prediction_type == "v_prediction" else clipped / snr
            per_sample = per_sample * weight
        return per_sample.mean()

    def export(self, model, out_dir: Path) -> Path:
        return save_pipeline(Path(out_dir) / PIPELINE_DIR, model, self.noise_scheduler, self.codec.label_names)
