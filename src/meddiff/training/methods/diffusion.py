"""From-scratch diffusion in pixel space ("pixel") and, by subclassing, in an autoencoder's latent space
("latent"). Conditioning, selectable by `config.conditioning`: labels (the U-Net's projection class embedding),
text (cross-attention to a text encoder's token features), both, or none (unconditional). Classifier-free
guidance is learned by dropping the whole condition (labels and prompt together) with `config.cond_dropout`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from meddiff.conditioning.demographics import AttributeGroups
from meddiff.conditioning.labels import LabelCodec
from meddiff.conditioning.text import PromptCache, load_text_encoder, text_width
from meddiff.errors import MeddiffError
from meddiff.models.factory import build_noise_scheduler, build_unet
from meddiff.models.pipeline import MedDiffusionPipeline, encode_prompt
from meddiff.models.storage import PIPELINE_DIR, save_pipeline
from meddiff.training.methods.base import TrainingMethod, register_method, training_noise

CONDITIONINGS = ("labels", "text", "both", "none")


@register_method
class PixelDiffusion(TrainingMethod):
    name = "pixel"
    supports_dp = True  # the loss is the mean of per-image denoising losses

    def __init__(self, config, dataset, accelerator=None):
        super().__init__(config, dataset, accelerator)
        mode = config.conditioning
        if mode not in CONDITIONINGS:
            raise MeddiffError(f"conditioning must be one of {', '.join(CONDITIONINGS)}, got {mode!r}")
        self.use_labels = mode in ("labels", "both") and bool(dataset.label_names)
        if mode in ("labels", "both") and not dataset.label_names:
            raise MeddiffError(
                f"conditioning {mode!r} needs labelled data; {dataset.source} has no labels "
                "(use conditioning none or text)"
            )
        self.use_text = mode in ("text", "both")
        self.codec = LabelCodec(dataset.label_names if self.use_labels else [])
        self.attribute_groups = AttributeGroups.of(self.codec.label_names)  # sex / age / view, when the data has them
        self.tokenizer = self.text_encoder = self.prompt_cache = None
        if self.use_text:
            self.tokenizer, self.text_encoder = load_text_encoder(config.text)
            if not config.text.train_encoder:
                self.prompt_cache = PromptCache(self.tokenizer, self.text_encoder)
        self.noise_scheduler = build_noise_scheduler(config.model)
        channels, size = self.model_space()
        self._unet = build_unet(
            config.model,
            size,
            len(self.codec.label_names),
            in_channels=channels,
            cross_attention_dim=text_width(self.text_encoder) if self.use_text else None,
        )
        self._model: torch.nn.Module
        if self.use_text and config.text.train_encoder:
            assert self.text_encoder is not None
            self._model = torch.nn.ModuleDict({"unet": self._unet, "text_encoder": self.text_encoder})
        else:
            self._model = self._unet

    def initialise_from(self, path: str) -> None:
        """The U-Net starts from the EMA weights of the pipeline at `path` (a run or its pipeline folder), e.g. a
        model trained on public data that this run fine-tunes (with DP: that data is outside the guarantee). It must
        be the same model: architecture, resolution and labels in the same order."""
        from meddiff.models.storage import load_pipeline

        pipe = load_pipeline(path)
        names = list(getattr(pipe, "label_names", []) or [])
        if names != list(self.codec.label_names):
            raise MeddiffError(
                f"--init-from {path}: its labels {names} are not this run's {list(self.codec.label_names)} "
                "(the class embedding would mean other findings)"
            )
        try:
            self._unet.load_state_dict(pipe.unet.state_dict())
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)[:200]
            raise MeddiffError(
                f"--init-from {path}: its U-Net is not this run's model ({first[:200]}); use the same model "
                "settings and resolution"
            ) from None

    @property
    def has_unused_parameters(self) -> bool:  # a trained BERT-style encoder: its pooler gets no gradient
        return self.use_text and self.config.text.train_encoder

    def model_space(self) -> tuple[int, int]:
        """(channels, size) of what the U-Net denoises."""
        return 1, self.config.resolution

    @property
    def model(self):
        return self._model

    def clean_samples(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """x0 for this batch in model space."""
        return batch["image"]

    def condition_kwargs(self, model, batch: dict, generator: torch.Generator, device) -> dict:
        b = batch["index"].shape[0]
        keep = torch.rand(b, generator=generator) >= self.config.cond_dropout
        kwargs: dict = {"encoder_hidden_states": None, "class_labels": None}
        if self.use_labels:
            known = self.attribute_groups.drop(batch["known"], self.config.attribute_dropout, generator)
            cond = self.codec.encode(batch["labels"], known)
            kwargs["class_labels"] = (cond * keep.unsqueeze(1).to(cond.dtype)).to(device)
        if self.use_text:
            shuffle = self.config.text.shuffle_findings
            prompts = [
                (self.dataset.shuffled_prompt(i, generator) if shuffle else self.dataset.prompts[i]) if k else ""
                for i, k in zip(batch["index"].tolist(), keep.tolist())
            ]
            if self.prompt_cache is not None:
                kwargs["encoder_hidden_states"] = self.prompt_cache(prompts).to(device)
            else:
                kwargs["encoder_hidden_states"] = encode_prompt(self.tokenizer, model["text_encoder"], prompts, device)
        return kwargs

    def loss(self, model, batch, generator):
        unet = model["unet"] if isinstance(model, torch.nn.ModuleDict) else model
        device = next(unet.parameters()).device
        x0 = self.clean_samples(batch, generator).to(device)
        kwargs = self.condition_kwargs(model, batch, generator, device)
        return self.denoising_loss(unet, x0, kwargs, generator).mean()

    def denoising_loss(self, unet, x0: torch.Tensor, kwargs: dict, generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss of predicting the noise (or v) of x0 at a random timestep, Min-SNR weighted when
        configured; `noise_offset` adds a per-channel constant to the noise (brighter/darker images learnable)."""
        device, b = x0.device, x0.shape[0]
        noise = training_noise(x0.shape, generator, self.config.noise_offset).to(device)
        if self.config.model.objective == "flow":
            return self.flow_loss(unet, x0, noise, kwargs, generator)
        scheduler = self.noise_scheduler
        t = torch.randint(0, scheduler.config["num_train_timesteps"], (b,), generator=generator).to(device)
        xt = scheduler.add_noise(x0, noise, t)  # type: ignore[arg-type]  # diffusers says IntTensor; any int tensor works
        if scheduler.config["prediction_type"] == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)  # type: ignore[arg-type]  # as above
        else:
            target = noise
        pred = unet(xt, t, **kwargs).sample.float()
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma:
            snr = compute_snr(self.noise_scheduler, t)
            clipped = torch.clamp(snr, max=self.config.snr_gamma)
            weight = clipped / (snr + 1) if scheduler.config["prediction_type"] == "v_prediction" else clipped / snr
            per_sample = per_sample * weight
        return per_sample

    def flow_loss(self, unet, x0: torch.Tensor, noise: torch.Tensor, kwargs: dict, generator) -> torch.Tensor:
        """Rectified flow: x_t = (1 - s) x0 + s noise at a noise level s drawn from the configured density
        (SD3's logit-normal by default) over the scheduler's shifted training sigmas; the U-Net, given the timestep
        s * T, predicts the velocity noise - x0. Min-SNR weighting does not apply (plain MSE)."""
        scheduler = self.noise_scheduler
        steps = int(scheduler.config["num_train_timesteps"])
        u = compute_density_for_timestep_sampling(
            self.config.model.flow_density,
            x0.shape[0],
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            generator=generator,
        )
        index = (u * steps).long().clamp(0, steps - 1)
        sigmas = scheduler.sigmas[index].to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        timesteps = scheduler.timesteps[index].to(x0.device)
        xt = ((1 - sigmas) * x0.float() + sigmas * noise.float()).to(x0.dtype)
        pred = unet(xt, timesteps, **kwargs).sample.float()
        target = (noise - x0).float()
        return F.mse_loss(pred, target, reduction="none").mean(dim=tuple(range(1, x0.dim())))

    def vae(self):
        return None

    def _parts(self, model) -> tuple:
        """(U-Net, text encoder or None, label names) of the trained model, as a pipeline holds them."""
        unet = model["unet"] if isinstance(model, torch.nn.ModuleDict) else model
        encoder = model["text_encoder"] if isinstance(model, torch.nn.ModuleDict) else self.text_encoder
        names = self.dataset.label_names if (self.use_labels or self.use_text) else []
        return unet, encoder, names

    def sampling_pipeline(self, model) -> MedDiffusionPipeline:
        """The pipeline on the U-Net's device (a frozen text encoder and the autoencoder are moved there for the
        check); release_sampling_pipeline() puts them, and the U-Net's attention processors, back."""
        unet, encoder, names = self._parts(model)
        vae = self.vae()
        device = next(unet.parameters()).device
        moved = [(m, next(m.parameters()).device) for m in (vae, encoder) if m is not None]
        processors = dict(getattr(unet, "attn_processors", None) or {}) or None
        self._restore = (moved, unet, processors)
        for module, _ in moved:
            module.to(device)
        pipe = MedDiffusionPipeline(
            unet=unet,
            scheduler=self.noise_scheduler,
            vae=vae,
            text_encoder=encoder,
            tokenizer=self.tokenizer,
            label_names=names,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def release_sampling_pipeline(self) -> None:
        moved, unet, processors = getattr(self, "_restore", ([], None, None))
        for module, device in moved:
            module.to(device)
        if unet is not None and processors is not None:
            unet.set_attn_processor(processors)  # sample() may have chosen another attention kernel
        self._restore = ([], None, None)

    def export(self, model, out_dir: Path) -> Path:
        unet, encoder, names = self._parts(model)
        return save_pipeline(
            Path(out_dir) / PIPELINE_DIR,
            unet,
            self.noise_scheduler,
            names,
            vae=self.vae(),
            text_encoder=encoder,
            tokenizer=self.tokenizer,
            label_counts=self.dataset.positive_counts() if names else None,
        )
