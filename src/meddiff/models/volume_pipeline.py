"""VolumePipeline: label-conditioned latent diffusion of 3D volumes (MONAI networks, a diffusers scheduler).

    pipe = VolumePipeline.from_pretrained(folder)           # one call: networks, scheduler, labels, grid
    volumes = pipe(pipe.encode_labels([["tumour"], []]), guidance_scale=2.0, num_inference_steps=20,
                   generator=torch.Generator().manual_seed(0))   # (N, C, D, H, W) in [-1, 1]

The folder holds safetensors weights and JSON only (nothing pickled):

    volume_pipeline.json        label names, training grid (shape, spacing, affine, channel names), data
    autoencoder/  config.json + model.safetensors   (with the latent scaling factor)
    unet/         config.json + model.safetensors
    scheduler/    scheduler_config.json
    README.md                   model card (meddiff.models.card): data, labels, spacing, "not for diagnosis"

Classifier-free guidance runs the unconditional (zero condition) and conditional halves as one doubled batch."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import torch

from meddiff.errors import MeddiffError
from meddiff.models.card import CardContent, CardSection, write_card
from meddiff.models.pipeline import encode_condition, guide
from meddiff.models.volume_autoencoder import VolumeAutoencoder
from meddiff.models.volume_unet import VolumeUNet

PIPELINE_FILE = "volume_pipeline.json"
SCHEDULERS = ("DPMSolverMultistepScheduler", "DDIMScheduler", "DDPMScheduler")  # what from_pretrained accepts


@dataclass
class VolumeGrid:
    """The voxel grid the model was trained on: what a generated volume's NIfTI header says."""

    shape: list[int]  # voxels along the array axes, which `affine` maps to RAS mm (meddiff volumes: X, Y, Z)
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # mm along each axis
    affine: list[list[float]] | None = None  # 4x4 voxel -> world (RAS) matrix; None: diagonal from spacing
    channel_names: list[str] = field(default_factory=lambda: ["image"])  # e.g. modalities ["flair", "t1c"]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.spacing) != 3:
            raise MeddiffError(f"a volume grid needs 3 sizes and 3 spacings, got {self.shape} and {self.spacing}")
        self.shape = [int(s) for s in self.shape]
        self.spacing = [float(s) for s in self.spacing]
        if self.affine is not None and (len(self.affine) != 4 or any(len(row) != 4 for row in self.affine)):
            raise MeddiffError(f"a volume grid's affine must be a 4x4 matrix, got {self.affine}")
        if self.affine is None:
            self.affine = [[float(self.spacing[i]) if i == j else 0.0 for j in range(4)] for i in range(3)]
            self.affine.append([0.0, 0.0, 0.0, 1.0])

    @classmethod
    def from_dict(cls, data: dict) -> VolumeGrid:
        return cls(
            shape=[int(s) for s in data["shape"]],
            spacing=[float(s) for s in data.get("spacing", [1, 1, 1])],
            affine=data.get("affine"),
            channel_names=list(data.get("channel_names", ["image"])),
        )


class VolumePipeline:
    """Autoencoder + conditioned U-Net + sampling scheduler, with label names and the training grid."""

    def __init__(
        self,
        autoencoder: VolumeAutoencoder,
        unet: VolumeUNet,
        scheduler,
        grid: VolumeGrid,
        label_names: list[str] | None = None,
        trained_on: str = "",
    ):
        self.autoencoder = autoencoder.eval()
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.grid = grid
        self.label_names = list(label_names or [])
        self.trained_on = trained_on
        if len(self.label_names) != unet.num_labels:
            raise MeddiffError(
                f"the U-Net is conditioned on {unet.num_labels} labels but {len(self.label_names)} "
                "label names were given"
            )
        if len(grid.channel_names) != autoencoder.in_channels:
            raise MeddiffError(
                f"the autoencoder has {autoencoder.in_channels} channels but the grid names "
                f"{len(grid.channel_names)}: {grid.channel_names}"
            )
        if unet.latent_channels != autoencoder.latent_channels:
            raise MeddiffError(
                f"the U-Net denoises {unet.latent_channels} latent channels, the autoencoder makes "
                f"{autoencoder.latent_channels}"
            )
        self.latent_shape = autoencoder.latent_shape(grid.shape)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device: str | torch.device) -> VolumePipeline:
        """Every network on `device` (the scheduler's tensors follow at sampling time)."""
        self.autoencoder.to(device)
        self.unet.to(device)
        return self

    def encode_labels(self, present: list[list[str]], unspecified: str = "absent") -> torch.Tensor:
        """[["tumour"], []] -> (B, 2K) conditions; labels not named are known-absent ('absent') or unknown."""
        names = {n.lower(): k for k, n in enumerate(self.label_names)}
        labels = torch.zeros(len(present), len(names))
        for i, row in enumerate(present):
            for name in row:
                if name.lower() not in names:
                    raise MeddiffError(f"unknown label {name!r}; this model knows {self.label_names}")
                labels[i, names[name.lower()]] = 1.0
        known = torch.ones_like(labels, dtype=torch.bool) if unspecified == "absent" else labels > 0
        return encode_condition(labels, known)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor | None, guidance_scale: float
    ) -> torch.Tensor:
        """The U-Net's guided prediction; with guidance the null and conditional inputs go as one doubled batch."""
        if conditions is None or self.unet.num_labels == 0 or guidance_scale == 1.0:
            return self.unet(latents, t, conditions)
        doubled = self.unet(torch.cat([latents, latents]), t, torch.cat([torch.zeros_like(conditions), conditions]))
        uncond, cond = doubled.chunk(2)
        return guide(uncond, cond, guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        conditions: torch.Tensor | None = None,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        num_volumes: int | None = None,
        callback_on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Volumes (N, C, D, H, W) in [-1, 1] on the pipeline's device. N: rows of `conditions`, else
        `num_volumes` (default 1) unconditional volumes. Noise is drawn from `generator` on the CPU, so a seed
        gives the same volumes on any device."""
        if num_inference_steps < 1:
            raise MeddiffError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if conditions is not None:
            if conditions.ndim != 2 or conditions.shape[1] != self.unet.condition_width:
                raise MeddiffError(
                    f"conditions must be (N, {self.unet.condition_width}) for labels "
                    f"{self.label_names}, got {tuple(conditions.shape)}"
                )
            if num_volumes is not None and num_volumes != conditions.shape[0]:
                raise MeddiffError(f"num_volumes {num_volumes} differs from the {conditions.shape[0]} conditions")
            num_volumes = conditions.shape[0]
            conditions = conditions.to(self.device, self.unet.dtype)
        n = num_volumes or 1
        device = self.device
        latents = torch.randn((n, *self.latent_shape), generator=generator).to(device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            prediction = self.predict(model_input, t, conditions, guidance_scale)
            latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample
            if callback_on_step is not None:
                callback_on_step(i, int(t), latents)
        return self.autoencoder.decode_latents(latents).float()

    def card(self) -> CardContent:
        grid = self.grid
        labels = ", ".join(self.label_names) if self.label_names else "none (unconditional)"
        ae, unet = self.autoencoder, self.unet
        return CardContent(
            title="meddiff 3D latent diffusion model",
            summary=[
                f"Generates synthetic {' + '.join(grid.channel_names)} volumes of {'x'.join(map(str, grid.shape))}"
                f" voxels at {' x '.join(f'{s:g}' for s in grid.spacing)} mm"
                + (", conditioned on labels." if self.label_names else ".")
            ],
            sections=[
                CardSection(title="Data", lines=[f"- Trained on: {self.trained_on or 'not recorded'}"]),
                CardSection(
                    title="Labels",
                    lines=[
                        f"- {labels}",
                        "- Condition: (present x known, known) per label; "
                        "the zero vector is unconditional (classifier-free guidance).",
                    ],
                ),
                CardSection(
                    title="Volume grid",
                    lines=[
                        f"- Shape (voxels): {grid.shape}; spacing (mm): {grid.spacing}",
                        f"- Affine (voxel to RAS world): {grid.affine}",
                        f"- Channels: {grid.channel_names}; intensities in [-1, 1]",
                    ],
                ),
                CardSection(
                    title="Model",
                    lines=[
                        f"- Autoencoder: MONAI {'VQVAE' if ae.is_vq else 'AutoencoderKL'} (3D), downsample "
                        f"{ae.downsample}, latents {list(self.latent_shape)}, scaling factor {ae.scaling_factor:.4g}",
                        f"- U-Net: MONAI DiffusionModelUNet (3D), channels {unet.config.channels}, "
                        f"{sum(p.numel() for p in unet.parameters()):,} parameters; "
                        f"sampler {type(self.scheduler).__name__}",
                        "- Load: `from meddiff.models.volume_pipeline import VolumePipeline; "
                        "VolumePipeline.from_pretrained(folder)`",
                    ],
                ),
            ],
            tags=["3d", "volume", "monai", "latent-diffusion"],
            trained_on=self.trained_on or None,
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Weights as safetensors, configs as JSON, and the model card."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.autoencoder.save_pretrained(folder / "autoencoder")
        self.unet.save_pretrained(folder / "unet")
        self.scheduler.save_pretrained(folder / "scheduler")
        meta = {
            "class": "VolumePipeline",
            "label_names": self.label_names,
            "grid": asdict(self.grid),
            "trained_on": self.trained_on,
        }
        (folder / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))
        write_card(self.card(), folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VolumePipeline:
        """Everything a saved pipeline needs, in one call, on `device`."""
        folder = Path(folder).expanduser()
        if (folder / "pipeline" / PIPELINE_FILE).is_file():  # a run directory
            folder = folder / "pipeline"
        path = folder / PIPELINE_FILE
        if not path.is_file():
            raise MeddiffError(f"{folder} holds no volume pipeline ({PIPELINE_FILE} is missing)")
        try:
            meta = json.loads(path.read_text())
            grid = VolumeGrid.from_dict(meta["grid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MeddiffError(f"{path} is not a valid volume pipeline description: {exc}") from None
        pipe = cls(
            VolumeAutoencoder.from_pretrained(folder / "autoencoder"),
            VolumeUNet.from_pretrained(folder / "unet"),
            load_scheduler(folder / "scheduler"),
            grid,
            meta.get("label_names") or [],
            meta.get("trained_on", ""),
        )
        return pipe.to(device)


def load_scheduler(folder: Path):
    path = folder / "scheduler_config.json"
    try:
        name = json.loads(path.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise MeddiffError(f"could not read the scheduler config {path}: {exc}") from None
    if name not in SCHEDULERS:
        raise MeddiffError(f"{path} names scheduler {name!r}; a volume pipeline uses one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, name).from_pretrained(folder)
