"""Training methods for 3D volumes, plugged into the one loop like the 2D ones:

- "volume-autoencoder": MONAI AutoencoderKL / VQVAE (meddiff.models.volume_autoencoder); L1 (or MSE) + KL (or the
  VQ commitment loss) + optionally a MONAI 3D PatchDiscriminator hinge loss. Exports RUN/volume_autoencoder/ with
  the latent scaling factor measured on the training volumes.
- "volume-latent": MONAI DiffusionModelUNet (meddiff.models.volume_unet) on the stored latents of a trained volume
  autoencoder (encoded once, meddiff.training.latent_cache); noise (or v) prediction MSE, Min-SNR weighting when
  configured, the condition dropped with `cond_dropout` for classifier-free guidance. Exports RUN/pipeline/, a
  VolumePipeline.

A volume dataset provides `images` ((N, C, D, H, W), indexable by an index array, values in [-1, 1] or stored
integers), `labels` and `known` ((N, K)), `label_names`, `__len__`, `__getitems__(indices)` (a batch dict with
index, image, labels, known), `fingerprint()`, `source` and `summary()`; optionally `grid` (a VolumeGrid:
spacing, affine, channel names). The model sizes come from `config.volume` (a VolumeModelConfig) when the
training config has that section, else from the `volume` argument, else the CPU defaults."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from meddiff.conditioning.labels import condition_columns
from meddiff.data.store import raw_to_model_range
from meddiff.errors import MeddiffError
from meddiff.models.discriminator import discriminator_hinge_loss, generator_adversarial_loss
from meddiff.models.pipeline import encode_condition
from meddiff.models.storage import PIPELINE_DIR
from meddiff.models.volume import VolumeModelConfig
from meddiff.models.volume_autoencoder import (
    VOLUME_AUTOENCODER_DIR,
    VolumeAutoencoder,
    measure_volume_scaling_factor,
)
from meddiff.models.volume_pipeline import VolumeGrid, VolumePipeline
from meddiff.models.volume_unet import VolumeUNet, build_volume_noise_scheduler, build_volume_sampler
from meddiff.training.adversarial import discriminator_optimizer, prepare_discriminator, update_side_network
from meddiff.training.latent_cache import encoded_latents, posterior_draw
from meddiff.training.methods.base import TrainingMethod, register_method, training_noise

logger = logging.getLogger(__name__)


BRIGHT_QUANTILE = 0.99  # bright_weight: voxels above this quantile of their crop (per channel) weigh more


def bright_voxel_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """1 for every voxel, 1 + `weight` for those above BRIGHT_QUANTILE of their own crop (or volume) and channel.
    A saturated top (1 % or more of the voxels at the maximum, e.g. a clipped CT window) is weighted as a whole."""
    values = x.detach().float()
    flat = values.flatten(2)  # (B, C, voxels)
    k = max(int(round(BRIGHT_QUANTILE * flat.shape[-1])), 1)
    shape = (*x.shape[:2], *([1] * (x.ndim - 2)))
    level = flat.kthvalue(k, dim=-1).values.view(shape)
    bright = values > level
    flat_top = ~bright.flatten(2).any(dim=-1).view(shape) & (level > flat.amin(dim=-1).view(shape))
    bright = bright | (flat_top & (values >= level))
    return 1.0 + weight * bright.float()


def autoencoder_loss(
    autoencoder: VolumeAutoencoder,
    x: torch.Tensor,
    generator: torch.Generator,
    reconstruction: str = "l1",
    bright_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(loss, reconstruction, metrics) of one batch: voxel L1/MSE + the KL term (or VQ commitment loss). With
    `bright_weight` the voxel loss is a weighted mean in which the brightest 1 % of each crop (the volume itself when
    not cropped) count 1 + bright_weight times (a thin bright finding, such as an enhancing tumour rim, is otherwise
    smoothed away)."""
    recon, regulariser = autoencoder.round_trip(x, generator)
    recon = recon.float()
    error = (recon - x.float()).abs() if reconstruction == "l1" else (recon - x.float()) ** 2
    if bright_weight > 0:
        weights = bright_voxel_weights(x, bright_weight)
        rec = (weights * error).sum() / weights.sum()
    else:
        rec = error.mean()
    return rec + regulariser, recon, {"reconstruction": rec.detach(), "regulariser": regulariser.detach()}


FOCUS_QUANTILE = 0.995  # crop_focus: crops centred near voxels above this quantile of their volume
CHANNEL_MEAN_ADVICE = 0.25  # |mean| of a model-latent channel (unit variance) above which noise_offset is advised


def random_crops(x: torch.Tensor, edge: int, generator: torch.Generator, focus: float = 0.0) -> torch.Tensor:
    """One random edge^3 crop of each volume in (B, C, X, Y, Z) (offsets from the CPU generator); edge 0 or at least
    the volume: the volumes themselves. With probability `focus` a crop is placed so that one of the volume's
    brightest voxels (above its FOCUS_QUANTILE, summed over channels) lies in its middle half."""
    size = x.shape[2:]
    if not edge or edge >= min(size):
        return x
    crops = []
    for volume in x:
        o = [int(torch.randint(0, s - edge + 1, (1,), generator=generator)) for s in size]
        if focus > 0 and float(torch.rand((), generator=generator)) < focus:
            o = _focused_offset(volume, edge, generator)
        crops.append(volume[:, o[0] : o[0] + edge, o[1] : o[1] + edge, o[2] : o[2] + edge])
    return torch.stack(crops)


def _focused_offset(volume: torch.Tensor, edge: int, generator: torch.Generator) -> list[int]:
    """Crop offsets that put a random one of the volume's brightest voxels at a random place in the crop's middle
    half (clamped to the volume)."""
    intensity = volume.detach().float().sum(0)
    flat = intensity.flatten()
    k = max(int(FOCUS_QUANTILE * flat.numel()), 1)
    level = flat.kthvalue(k).values
    bright = torch.nonzero(intensity > level)
    if len(bright) == 0:  # a flat top (e.g. a uniform volume): the voxels at the level
        bright = torch.nonzero(intensity >= level)
    centre = bright[int(torch.randint(0, len(bright), (1,), generator=generator))].tolist()
    quarter = edge // 4
    offsets = []
    for c, s in zip(centre, intensity.shape, strict=True):
        shift = int(torch.randint(quarter, max(edge - quarter, quarter + 1), (1,), generator=generator))
        offsets.append(min(max(int(c) - shift, 0), s - edge))
    return offsets


def latent_diffusion_loss(
    unet: VolumeUNet,
    noise_scheduler,
    latents: torch.Tensor,
    conditions: torch.Tensor | None,
    generator: torch.Generator,
    cond_dropout: float = 0.0,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Mean loss of predicting the noise (or v) of scaled latents (B, C, d, h, w) at random timesteps. Each
    volume's condition is replaced by the zero (null) condition with probability `cond_dropout`. `noise_offset`
    adds a per-volume, per-channel constant to the noise: the noised latents' channel means then no longer give
    away the clean ones' at the top of the schedule, so the model learns them from the condition (without it,
    sampling from zero-mean noise keeps each channel's mean near zero: volumes too bright or too dark)."""
    device, b = latents.device, latents.shape[0]
    noise = training_noise(latents.shape, generator, noise_offset).to(device, latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    keep = (torch.rand(b, generator=generator) >= cond_dropout).to(torch.float32)
    if conditions is not None:
        conditions = conditions.to(device, torch.float32) * keep.to(device).unsqueeze(1)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, t) if v_prediction else noise
    prediction = unet(noisy, t, conditions).float()
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").flatten(1).mean(dim=1)
    if snr_gamma:
        snr = compute_snr(noise_scheduler, t)
        clipped = torch.clamp(snr, max=snr_gamma)
        per_sample = per_sample * (clipped / (snr + 1) if v_prediction else clipped / snr)
    return per_sample.mean()


def latent_channel_means(latents, autoencoder, limit: int = 64) -> torch.Tensor:
    """Per-channel mean of the model latents (posterior means, scaled as the diffusion model sees them) of up to
    `limit` stored volumes, spread evenly over the source."""
    n = len(latents)
    idx = np.unique(np.linspace(0, n - 1, min(n, limit)).astype(np.int64))
    z = torch.from_numpy(np.asarray(latents.rows("mean", idx), np.float32))
    return autoencoder.to_model_latents(z).mean(dim=(0, *range(2, z.ndim)))


def noise_offset_advice(channel_means: torch.Tensor, noise_offset: float) -> str | None:
    """A warning when the latent channels are far from zero-mean and no noise offset is trained: the network then
    reads each channel's mean from the slightly noised input at the top of the schedule, sampling starts from
    zero-mean noise, and the volumes keep near-zero channel means (the 3D demo's came out too bright: tumours
    measured 10x too large, slice FID 20 instead of 0.9)."""
    worst = float(channel_means.abs().max())
    if noise_offset > 0 or worst <= CHANNEL_MEAN_ADVICE:
        return None
    means = ", ".join(f"{float(m):.2f}" for m in channel_means)
    return (
        f"the latent channel means are {means} (unit-variance latents) and noise_offset is 0: sampled volumes will "
        "keep these means near zero (too bright or too dark); train with --noise-offset 0.1 as the shipped 3D "
        "recipes do (docs/training.md#3d-volumes)"
    )


def volume_config(config, volume: VolumeModelConfig | None) -> VolumeModelConfig:
    if volume is not None:
        return volume
    return getattr(config, "volume", None) or VolumeModelConfig()


def volume_shape(dataset) -> tuple[int, int, int, int]:
    """(C, D, H, W) of the dataset's volumes."""
    shape = tuple(int(s) for s in dataset.images.shape[1:])
    if len(shape) != 4:
        raise MeddiffError(f"{dataset.source} holds {len(shape) - 1}D images; a volume method needs (C, D, H, W)")
    return shape[0], shape[1], shape[2], shape[3]


def dataset_grid(dataset) -> VolumeGrid:
    """The training grid: the dataset's `grid`, else its `affine` and `channel_names`, else 1 mm voxels."""
    grid = getattr(dataset, "grid", None)
    if grid is not None:
        return grid
    channels, *spatial = volume_shape(dataset)
    names = list(getattr(dataset, "channel_names", None) or [])
    if len(names) != channels:
        names = ["image"] if channels == 1 else [f"channel{i}" for i in range(channels)]
    affine = getattr(dataset, "affine", None)
    if affine is None:
        return VolumeGrid(shape=spatial, channel_names=names)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.abs(affine[:3, :3]).max(axis=0).tolist()
    return VolumeGrid(shape=spatial, spacing=spacing, affine=affine.tolist(), channel_names=names)


class VolumeBatches(torch.utils.data.Dataset):
    """The loader's view of a volume dataset without `__getitems__`: one batch dict per index list (volumes read
    from the memory map as float32 in [-1, 1])."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {
            "index": idx,
            "image": model_range(self.dataset.images[idx.numpy()]),
            "labels": self.dataset.labels[idx],
            "known": self.dataset.known[idx],
        }


def discriminator_layers(wanted: int, edge: int) -> int:
    """Strided discriminator layers that leave patch maps of at least 4 voxels on an `edge`-voxel volume."""
    fitting = max(int(math.log2(edge)) - 2, 1)
    if wanted > fitting:
        logger.info("%d-voxel volumes: the patch discriminator uses %d layers instead of %d", edge, fitting, wanted)
    return min(wanted, fitting)


def model_range(images) -> torch.Tensor:
    """Stored volumes (a tensor or a memory-mapped array) -> float32 in [-1, 1]."""
    return raw_to_model_range(images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images)))


@register_method
class VolumeAutoencoderTraining(TrainingMethod):
    name = "volume-autoencoder"
    uses_ema = False

    def __init__(self, config, dataset, accelerator=None, volume: VolumeModelConfig | None = None):
        super().__init__(config, dataset, accelerator)
        self.cfg = volume_config(config, volume).autoencoder
        channels, *spatial = volume_shape(dataset)
        self._model = VolumeAutoencoder(self.cfg, channels)
        self._model.latent_shape(spatial)  # divisible by the downsample factor, or a one-line error
        edge = min(spatial)  # of what the network and the discriminator see in training
        if self.cfg.train_crop and self.cfg.train_crop < edge:
            self._model.latent_shape([self.cfg.train_crop] * 3)  # crops too must divide by the downsample factor
            edge = self.cfg.train_crop
        elif self.cfg.crop_focus > 0:
            logger.warning("crop_focus %g does nothing: whole volumes are trained (train_crop)", self.cfg.crop_focus)
        self.discriminator: Any = None  # a MONAI PatchDiscriminator when adversarial_weight > 0
        if self.cfg.adversarial_weight > 0:
            from monai.networks.nets import PatchDiscriminator  # here: MONAI takes seconds to import

            self.discriminator = PatchDiscriminator(
                spatial_dims=3,
                channels=self.cfg.discriminator_channels,
                in_channels=channels,
                num_layers_d=discriminator_layers(self.cfg.discriminator_layers, edge),
                norm="INSTANCE",
            )
        self.disc_optimizer: Any = None
        self._recon: torch.Tensor | None = None
        self._real: torch.Tensor | None = None

    @property
    def model(self):
        return self._model

    def batch_source(self):
        return self.dataset if hasattr(self.dataset, "__getitems__") else VolumeBatches(self.dataset)

    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        if self.discriminator is not None:
            self.discriminator, self.disc_optimizer = prepare_discriminator(
                accelerator, self.discriminator, self.cfg.discriminator_lr
            )

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.discriminator(x)[-1]  # MONAI returns every layer's features; the last are the patch logits

    def _adversarial(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.cfg.adversarial_start

    def loss(self, model, batch, generator):
        x = random_crops(batch["image"], self.cfg.train_crop, generator, self.cfg.crop_focus)
        total, recon, metrics = autoencoder_loss(
            model, x, generator, self.cfg.reconstruction_loss, self.cfg.bright_weight
        )
        if self._adversarial(int(batch.get("step", 0))):
            self.discriminator.requires_grad_(False)
            adversarial = generator_adversarial_loss(self._logits(recon))
            self.discriminator.requires_grad_(True)
            total = total + self.cfg.adversarial_weight * adversarial
            metrics["adversarial"] = adversarial.detach()
        self.metrics = metrics  # tensors until a logging step reads them
        self._recon, self._real = recon.detach(), x.detach()
        return total

    def after_step(self, model, batch, generator, step) -> None:
        if not self._adversarial(step) or self._recon is None or self._real is None:
            return
        if self.disc_optimizer is None:  # outside the loop (tools, tests): a plain optimizer
            self.disc_optimizer = discriminator_optimizer(self.discriminator, self.cfg.discriminator_lr)
        d_loss = discriminator_hinge_loss(self._logits(self._real), self._logits(self._recon))
        update_side_network(self.discriminator, self.disc_optimizer, d_loss, self.accelerator)
        metrics: dict[str, Any] = dict(self.metrics)
        metrics["discriminator"] = d_loss.detach()
        self.metrics = metrics

    def export(self, model, out_dir: Path) -> Path:
        """RUN/volume_autoencoder/, with the scaling factor measured on (up to scale_samples) training volumes."""
        model.eval()
        n = min(self.cfg.scale_samples, len(self.dataset))
        idx = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed))[:n]
        volumes = model_range(self.dataset.images[np.sort(idx.numpy())])
        model.scaling_factor = measure_volume_scaling_factor(
            model, volumes, torch.Generator().manual_seed(self.config.seed)
        )
        folder = model.save_pretrained(Path(out_dir) / VOLUME_AUTOENCODER_DIR)
        model.train()
        return folder


@register_method
class VolumeLatentDiffusion(TrainingMethod):
    name = "volume-latent"
    device_keys = ("mean", "std")

    def __init__(self, config, dataset, accelerator=None, volume: VolumeModelConfig | None = None):
        super().__init__(config, dataset, accelerator)
        if not config.latent.autoencoder:
            raise MeddiffError(
                "volume latent diffusion needs a trained volume autoencoder: pass --autoencoder RUN_DIR "
                "(from `meddiff train-autoencoder` on volumes)"
            )
        if config.conditioning not in ("labels", "none"):
            raise MeddiffError(f"volumes are conditioned on labels or nothing, not {config.conditioning!r}")
        if config.conditioning == "labels" and not dataset.label_names:
            raise MeddiffError(
                f"conditioning 'labels' needs labelled volumes; {dataset.source} has no labels (use conditioning none)"
            )
        self.autoencoder = VolumeAutoencoder.from_pretrained(config.latent.autoencoder)
        channels, *spatial = volume_shape(dataset)
        if channels != self.autoencoder.in_channels:
            raise MeddiffError(
                f"the autoencoder takes {self.autoencoder.in_channels}-channel volumes but "
                f"{dataset.source} has {channels} channels"
            )
        latent_shape = self.autoencoder.latent_shape(spatial)
        if self.autoencoder.scaling_factor == 1.0:
            logger.warning(
                "the volume autoencoder's scaling factor is 1.0 (not measured?); latents may be badly scaled"
            )
        self.cfg = volume_config(config, volume).unet
        self.label_columns: list[int] = []
        if config.conditioning == "labels":
            self.label_columns, measured = condition_columns(list(dataset.label_names), dataset.labels, dataset.known)
            if measured:
                logger.warning(
                    "not conditioned on %s (values other than 0/1: a measurement, not a label); bin it into a 0/1 "
                    "column, as the 3D demo's Large, to condition on it", ", ".join(measured),
                )  # fmt: skip
            if not self.label_columns:
                raise MeddiffError(
                    f"{dataset.source} has no 0/1 label to condition on ({', '.join(measured)} are measurements); "
                    "add a binary column or use conditioning none"
                )
        self.label_names = [dataset.label_names[k] for k in self.label_columns]
        self._unet = VolumeUNet(self.cfg, latent_shape[0], len(self.label_names))
        self.noise_scheduler = build_volume_noise_scheduler(self.cfg)
        self.latents = encoded_latents(
            self.autoencoder,
            dataset,
            spatial[0],
            accelerator,
            transform=model_range,
            tag="volume-" + "x".join(map(str, spatial)),  # the whole grid in the cache key
            batch_size=2,
        )
        scale = float(self.autoencoder.scaling_factor)
        if not math.isfinite(scale) or scale <= 0:
            raise MeddiffError(
                f"the volume autoencoder in {config.latent.autoencoder} has scaling factor {scale}; "
                "retrain it (its latents are degenerate)"
            )
        leaky = float(self.noise_scheduler.alphas_cumprod[-1].sqrt()) > 1e-3  # signal left at the last timestep
        if leaky and (accelerator is None or accelerator.is_main_process):  # cosine schedules keep ~0: no advice
            advice = noise_offset_advice(latent_channel_means(self.latents, self.autoencoder), config.noise_offset)
            if advice:
                logger.warning(advice)

    @property
    def model(self):
        return self._unet

    def batch_source(self):
        return self.latents  # the volumes themselves are not read: their latents are stored

    def clean_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of this batch: a fresh posterior sample (VQ: the stored pre-quantisation latents)."""
        z = posterior_draw(batch["mean"], batch["std"], generator, self.config.latent.draw)
        return self.autoencoder.to_model_latents(z)

    def loss(self, model, batch, generator):
        conditions = None
        if self.label_names:
            cols = self.label_columns
            conditions = encode_condition(batch["labels"][:, cols], batch["known"][:, cols])
        return latent_diffusion_loss(
            model,
            self.noise_scheduler,
            self.clean_latents(batch, generator),
            conditions,
            generator,
            self.config.cond_dropout,
            self.config.snr_gamma,
            self.config.noise_offset,
        )

    def export(self, model, out_dir: Path) -> Path:
        pipe = VolumePipeline(
            self.autoencoder,
            model,
            build_volume_sampler(self.cfg),
            dataset_grid(self.dataset),
            self.label_names,
            trained_on=str(self.dataset.source),
        )
        folder = pipe.save_pretrained(Path(out_dir) / PIPELINE_DIR)
        model.train()
        return folder
