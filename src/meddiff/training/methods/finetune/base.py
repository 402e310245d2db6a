"""Fine-tuning a pretrained Stable Diffusion on medical images with prompts built from labels or reports (method
"finetune"; `meddiff finetune --method ...`): what every strategy shares. The strategy (registry.py) chosen by
`config.finetune.method` says what trains, with which prompts, what extra loss and what is exported.

`finetune.text_encoder` swaps in a domain encoder (RadBERT, SapBERT, the packaged MiniLM...); when its width
differs from the U-Net's cross-attention width the U-Net gets diffusers' own `encoder_hid_proj` (text_proj), a
learned linear projection saved in the U-Net config, so the export still loads with plain diffusers.

Images are 1-channel: they enter the RGB autoencoder as three equal channels and are encoded once; generated
images are the mean of the decoded channels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.conditioning.text import PromptCache, TextConfig, load_text_encoder, text_width
from meddiff.errors import MeddiffError
from meddiff.models.pipeline import MedDiffusionPipeline, encode_prompt
from meddiff.models.stable_diffusion import load_stable_diffusion, to_rgb
from meddiff.models.storage import ADAPTER_FILE, PIPELINE_DIR, save_pipeline
from meddiff.training.latent_cache import encoded_latents, posterior_draw
from meddiff.training.methods.base import TrainingMethod, register_method
from meddiff.training.methods.diffusion import PixelDiffusion
from meddiff.training.methods.finetune.registry import finetune_strategy
from meddiff.training.methods.finetune.strategy import FinetuneStrategy, unet_of


@register_method
class StableDiffusionFinetune(PixelDiffusion):
    name = "finetune"
    device_keys = ("mean", "std")

    def __init__(self, config, dataset, accelerator=None):
        TrainingMethod.__init__(self, config, dataset, accelerator)
        ft = config.finetune
        self.strategy: FinetuneStrategy = finetune_strategy(ft.method)(config)
        self.uses_ema = self.strategy.uses_ema
        if not ft.pretrained:
            raise MeddiffError("fine-tuning needs --pretrained (a Stable Diffusion hub id or local diffusers folder)")
        self.strategy.check()
        parts = load_stable_diffusion(ft.pretrained)
        self.noise_scheduler = parts.scheduler
        self._vae = parts.vae.requires_grad_(False).eval()
        factor = 2 ** (len(self._vae.config["block_out_channels"]) - 1)
        if config.resolution % factor:
            raise MeddiffError(
                f"--resolution {config.resolution} is not a multiple of the autoencoder's factor {factor}"
            )
        self.tokenizer, self.text_encoder = parts.tokenizer, parts.text_encoder
        unet = parts.unet
        if ft.text_encoder:
            self.tokenizer, self.text_encoder = load_text_encoder(
                TextConfig(encoder=ft.text_encoder, max_tokens=self.tokenizer.model_max_length)
            )
            _project_text(unet, text_width(self.text_encoder))
        unet.register_to_config(sample_size=config.resolution // factor)  # exports generate at the trained size
        self._vae.register_to_config(sample_size=config.resolution)
        self.use_labels, self.use_text = False, True
        self.codec = LabelCodec([])
        self.prompt_cache = None
        self._setup_trainable(unet)
        if self.prompt_cache is not None:  # a frozen text encoder: prompts are encoded (and cached) on the device
            self.text_encoder.to(self.device)
        if ft.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if self.strategy.text_encoder_learns:
                self.text_encoder.gradient_checkpointing_enable()
        self._encode_training_images()
        self.strategy.prepare(self, unet)

    @property
    def mode(self) -> str:
        """The fine-tuning strategy's name (`--method`)."""
        return self.strategy.name

    # what trains -----------------------------------------------------------------------------------------------
    def _setup_trainable(self, unet) -> None:
        encoder: Any = self.text_encoder  # a transformers text model (set above)
        unet.requires_grad_(self.strategy.trains_unet)
        encoder.requires_grad_(self.strategy.trains_text_encoder)
        self.strategy.add_trainable(unet, self.tokenizer, encoder)
        if getattr(unet, "encoder_hid_proj", None) is not None and self.config.finetune.text_encoder:
            unet.encoder_hid_proj.requires_grad_(True)  # a new projection always learns
        if self.strategy.text_encoder_learns:
            self._model = torch.nn.ModuleDict({"unet": unet, "text_encoder": encoder})
        else:
            self.prompt_cache = PromptCache(self.tokenizer, encoder)
            self._model = (
                unet if any(p.requires_grad for p in unet.parameters()) else torch.nn.ModuleDict({"unet": unet})
            )
        if not any(p.requires_grad for p in self._model.parameters()):
            raise MeddiffError(f"method {self.mode!r} left nothing to train")

    @property
    def has_unused_parameters(self) -> bool:  # a trained text encoder has parameters the loss never reaches
        return self.strategy.text_encoder_learns

    def initialise_from(self, path: str) -> None:  # fine-tuning starts from --pretrained, not from a run
        TrainingMethod.initialise_from(self, path)

    # data ------------------------------------------------------------------------------------------------------
    def _encode_training_images(self) -> None:
        """Encoded once on the accelerator into the latent cache (three equal channels into the RGB autoencoder);
        later runs on the same images and autoencoder read the stored latents."""
        self.latents = encoded_latents(
            self._vae, self.dataset, self.config.resolution, self.accelerator, transform=to_rgb, tag="rgb3"
        )
        self.scale = float(self._vae.config["scaling_factor"])

    @property
    def supports_dp(self) -> bool:  # type: ignore[override]  # a class attribute in the base
        """DP-SGD for the U-Net and LoRA strategies; DreamBooth mixes generated class images into each batch and
        the text strategies' embedding tables make per-sample gradients of vocabulary size."""
        return self.config.finetune.method in ("unet", "lora")

    @property
    def autoencoder(self) -> torch.nn.Module:
        """The frozen pretrained autoencoder (VAE)."""
        return self._vae

    def batch_source(self):
        return self.latents

    def training_prompt(self, index: int) -> str:
        prompt = self.dataset.prompts[index] if self.dataset.prompts else ""
        return self.strategy.training_prompt(prompt)

    # the loss --------------------------------------------------------------------------------------------------
    def model_space(self):
        factor = 2 ** (len(self._vae.config["block_out_channels"]) - 1)
        return self._vae.config["latent_channels"], self.config.resolution // factor

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents drawn from encoded moments (latent.draw "mean": the posterior means)."""
        return posterior_draw(mean, std, generator, self.config.latent.draw) * self.scale

    def _prompt_features(self, model, prompts: list[str], device) -> torch.Tensor:
        if self.prompt_cache is not None:
            return self.prompt_cache(prompts).to(device)
        encoder = model["text_encoder"]
        return encode_prompt(self.tokenizer, encoder, prompts, device)

    def loss(self, model, batch, generator):
        unet = unet_of(model)
        device = next(unet.parameters()).device
        idx = batch["index"]
        keep = torch.rand(len(idx), generator=generator) >= self.config.cond_dropout
        prompts = [self.training_prompt(i) if k else "" for i, k in zip(idx.tolist(), keep.tolist())]
        x0 = self.sample_latents(batch["mean"], batch["std"], generator)
        n_batch = len(prompts)
        x0, prompts = self.strategy.extend_batch(self, x0, prompts, generator)
        states = self._prompt_features(model, prompts, device)
        per_sample = self.denoising_loss(unet, x0.to(device), {"encoder_hidden_states": states}, generator)
        return self.strategy.batch_loss(per_sample, n_batch)

    def after_step(self, model, batch, generator, step):
        self.strategy.after_step(model)
        every = self.config.finetune.validation_every
        if every and (step + 1) % every == 0 and self.is_main_process:
            self.validate(model, Path(self.config.out) / "validation" / f"step-{step + 1:07d}.png")

    # validation and export -------------------------------------------------------------------------------------
    def _pipeline(self, model) -> MedDiffusionPipeline:
        unet = unet_of(model)
        encoder = (
            model["text_encoder"]
            if isinstance(model, torch.nn.ModuleDict) and "text_encoder" in model
            else self.text_encoder
        )
        pipe = MedDiffusionPipeline(
            unet=unet,
            scheduler=self.noise_scheduler,
            vae=self._vae,
            text_encoder=encoder,
            tokenizer=self.tokenizer,
            label_names=self.dataset.label_names,
        )
        pipe.set_progress_bar_config(disable=True)
        # the frozen autoencoder and text encoder join the U-Net on the run's device (validation, export)
        return pipe.to(next(unet.parameters()).device)

    def validation_prompts(self) -> list[str]:
        return self.strategy.validation_prompts()

    @torch.no_grad()
    def validate(self, model, path: Path) -> Path:
        """A grid: one row per validation prompt, fixed seeds (comparable across steps)."""
        from meddiff.sampling.generate import SamplingSettings, sample
        from meddiff.sampling.grid import save_grid, upscale_for

        was_training = model.training
        model.eval()
        prompts = self.validation_prompts()
        k = self.config.finetune.validation_images
        rows: list[str | None] = [p for p in prompts for _ in range(k)]
        settings = SamplingSettings(
            steps=self.config.sample_steps, guidance=self.config.guidance, seed=self.config.seed, batch_size=16
        )
        images = sample(self._pipeline(model), torch.zeros(len(rows), 0), settings, prompts=rows, progress=False)
        model.train(was_training)
        save_grid(path, images, columns=k, upscale=upscale_for(self.config.resolution))
        path.with_suffix(".txt").write_text("".join(f"row {r + 1}: {p}\n" for r, p in enumerate(prompts)))
        return path

    def export(self, model, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        self.validate(model, out_dir / "validation" / "final.png")
        return self.strategy.export(self, model, out_dir)

    def export_pipeline(self, model, out_dir: Path) -> Path:
        """The whole fine-tuned pipeline in diffusers format (out_dir/pipeline), with finetune.json."""
        ft = self.config.finetune
        pipe = self._pipeline(model)
        folder = save_pipeline(
            Path(out_dir) / PIPELINE_DIR,
            pipe.unet,
            self.noise_scheduler,
            self.dataset.label_names,
            vae=self._vae,
            text_encoder=pipe.text_encoder,
            tokenizer=self.tokenizer,
        )
        (folder / ADAPTER_FILE).unlink(missing_ok=True)
        (folder / "finetune.json").write_text(
            json.dumps(
                {"pretrained": ft.pretrained, "method": self.mode, "text_encoder": ft.text_encoder or "pretrained CLIP"}
            )
        )
        return folder

    def extra_state(self) -> dict:
        return self.strategy.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.strategy.load_extra_state(state)


def _project_text(unet, width: int) -> None:
    """Give the U-Net diffusers' text_proj (encoder_hid_proj) from `width` to its cross-attention width."""
    target = unet.config.cross_attention_dim
    if width == target:
        return
    unet.register_to_config(encoder_hid_dim=width, encoder_hid_dim_type="text_proj")
    unet.encoder_hid_proj = torch.nn.Linear(width, target)
