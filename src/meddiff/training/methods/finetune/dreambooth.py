"""DreamBooth: an instance prompt on every training image, the U-Net (optionally the text encoder) learning, and
prior preservation on class images the base model generates first (cached in RUN/class_images)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import encode_moments
from meddiff.models.pipeline import MedDiffusionPipeline
from meddiff.models.stable_diffusion import to_rgb
from meddiff.training.methods.finetune.strategy import FinetuneRun, FinetuneStrategy


class DreamBoothFinetune(FinetuneStrategy):
    name = "dreambooth"
    default_learning_rate = 5e-6

    class_mean: torch.Tensor | None = None  # encoded class images (unscaled latent moments), once prepared
    class_std: torch.Tensor | None = None

    def check(self) -> None:
        if not self.ft.instance_prompt:
            raise MeddiffError('dreambooth needs --instance-prompt (e.g. "chest x-ray with sks pleural effusion")')

    @property
    def trains_unet(self) -> bool:
        return True

    @property
    def trains_text_encoder(self) -> bool:
        return self.ft.train_text_encoder

    @property
    def prior_preservation(self) -> bool:
        return bool(self.ft.class_prompt) and self.ft.prior_loss_weight > 0

    def card_details(self) -> str:
        return f"; instance prompt '{self.ft.instance_prompt}', class prompt '{self.ft.class_prompt}'"

    def training_prompt(self, prompt: str) -> str:
        return self.ft.instance_prompt

    def validation_prompts(self) -> list[str]:
        return [self.ft.instance_prompt] + ([self.ft.class_prompt] if self.ft.class_prompt else [])

    # prior preservation ----------------------------------------------------------------------------------------
    def prepare(self, run: FinetuneRun, unet: Any) -> None:
        """Class images from the base model, generated once and cached under RUN/class_images, then encoded."""
        if not self.prior_preservation:
            return
        from accelerate import PartialState

        from meddiff.data.io import read_image

        folder = Path(self.config.out) / "class_images"
        key = {
            "pretrained": self.ft.pretrained,
            "class_prompt": self.ft.class_prompt,
            "resolution": self.config.resolution,
        }
        meta = folder / "class_images.json"
        n = self.ft.num_class_images
        if meta.is_file() and json.loads(meta.read_text()).get("key") != key:
            raise MeddiffError(f"{folder} holds class images of another model or prompt; use a new --out")
        with PartialState().main_process_first():  # several processes: the main one generates, the others read
            self._generate_class_images(run, unet, folder, meta, key, n)
        files = sorted(folder.glob("*.png"))[:n]
        stack = torch.from_numpy(np.stack([read_image(f) for f in files])).float()[:, None] * 2 - 1
        self.class_mean, self.class_std = encode_moments(run.autoencoder, to_rgb(stack))

    def _generate_class_images(self, run: FinetuneRun, unet: Any, folder: Path, meta: Path, key: dict, n: int) -> None:
        from meddiff.data.io import write_png
        from meddiff.sampling.generate import SamplingSettings, sample

        have = sorted(folder.glob("*.png"))
        if len(have) >= n:
            return
        folder.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"key": key}))
        pipe = MedDiffusionPipeline(
            unet=unet,
            scheduler=run.noise_scheduler,
            vae=run.autoencoder,
            text_encoder=run.text_encoder,
            tokenizer=run.tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(run.device)  # the base model samples on the run's device
        todo = list(range(len(have), n))
        settings = SamplingSettings(steps=25, guidance=self.config.guidance, seed=self.config.seed + 7919, batch_size=8)
        images = sample(
            pipe,
            torch.zeros(len(todo), 0),
            settings,
            indices=todo,
            prompts=[self.ft.class_prompt] * len(todo),
            progress=True,
        )
        for i, image in zip(todo, images):
            write_png(folder / f"{i:05d}.png", image)

    def extend_batch(
        self, run: FinetuneRun, latents: torch.Tensor, prompts: list[str], generator: torch.Generator
    ) -> tuple[torch.Tensor, list[str]]:
        if self.class_mean is None or self.class_std is None:
            return latents, prompts
        pick = torch.randint(0, len(self.class_mean), (len(prompts),), generator=generator)
        device = latents.device
        class_latents = run.sample_latents(self.class_mean[pick].to(device), self.class_std[pick].to(device), generator)
        return torch.cat([latents, class_latents]), prompts + [self.ft.class_prompt] * len(pick)

    def batch_loss(self, per_sample: torch.Tensor, n_batch: int) -> torch.Tensor:
        loss = per_sample[:n_batch].mean()
        if self.class_mean is not None:
            loss = loss + self.ft.prior_loss_weight * per_sample[n_batch:].mean()
        return loss
