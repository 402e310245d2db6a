"""Typed training configuration: defaults < YAML file (--config) < command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meddiff.errors import MeddiffError
from meddiff.conditioning.text import TextConfig
from meddiff.models.autoencoder import AutoencoderConfig
from meddiff.models.factory import ModelConfig


@dataclass
class LatentConfig:
    autoencoder: str = ""  # run directory of `meddiff train-autoencoder` (or its autoencoder/ folder)


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained Stable Diffusion (method "finetune"); see meddiff.training.methods.finetune."""

    pretrained: str = ""  # hub id or local diffusers folder
    method: str = "unet"  # unet | unet+text | text | dreambooth | lora | textual-inversion
    text_encoder: str = ""  # a domain text encoder (id or path) replacing CLIP; projected to the U-Net's width
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_text_encoder: bool = False
    placeholder_token: str = "<lung-xray>"
    initializer_token: str = "chest"
    num_vectors: int = 1
    template: str = "{token} {prompt}"  # textual inversion: the training prompt around the new token(s)
    instance_prompt: str = ""  # dreambooth: e.g. "chest x-ray with sks pleural effusion"
    class_prompt: str = ""  # dreambooth prior preservation, e.g. "chest x-ray"
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False  # dreambooth: train the text encoder too
    validation_prompts: list[str] = field(default_factory=lambda: ["chest x-ray with cardiomegaly",
                                                                   "chest x-ray with pleural effusion",
                                                                   "normal chest x-ray"])
    validation_every: int = 0  # steps between validation grids (0: only after training)
    validation_images: int = 4  # per prompt


@dataclass
class EvalConfig:
    fidelity: bool = True  # train a real-image classifier and measure label fidelity of samples
    fidelity_samples: int = 256
    classifier_epochs: int = 8
    grid_per_label: int = 16
    prompt_samples: int = 48  # text models: images per prompt for the prompt-response table


@dataclass
class TrainConfig:
    data: str = ""
    out: str = ""
    method: str = "pixel"  # pixel | latent | autoencoder (see meddiff.training.methods)
    conditioning: str = "labels"  # labels | text | both | none (diffusion methods)
    resolution: int = 32
    batch_size: int = 32
    max_steps: int = 100_000
    max_minutes: float | None = None
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 100
    lr_schedule: str = "constant_with_warmup"
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cond_dropout: float = 0.1  # classifier-free guidance: probability of training without the condition
    snr_gamma: float | None = 5.0  # Min-SNR loss weighting; None for plain MSE
    noise_offset: float = 0.0  # per-channel constant added to the noise (0.05-0.1 helps very dark/bright images)
    gradient_accumulation: int = 1  # micro-batches of batch_size per optimizer step
    optimizer: str = "adamw"  # adamw | adamw8bit (needs bitsandbytes)
    ema: bool = True  # keep and export an EMA of the trained weights (where the method uses one)
    ema_decay: float = 0.9995
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power until ema_decay
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # CPU/GPU speed options, off by default because on the 2-core CPU they gave nothing (bench/speedups.py):
    channels_last: bool = False  # NHWC memory format for the trained model's convolutions
    attention: str = "auto"  # auto | sdpa | classic: auto picks classic on CPU+bf16 with small maps (measured)
    compile: bool = False  # torch.compile the trained model (inductor); minutes of compile time before step 1
    loader_workers: int | None = None  # DataLoader processes (None: 0 for in-memory data, else by device and cores)
    threads: int | None = None  # CPU threads for torch (None: PyTorch's default, all cores; 2 cores gave 1.5x of 1)
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_keep: int = 2
    log_every: int = 10
    sample_steps: int = 20
    guidance: float = 2.0
    resume: str | None = None  # "latest" or a checkpoint folder
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _build(cls, data, "config")


SECTIONS = {"model": ModelConfig, "text": TextConfig, "latent": LatentConfig, "autoencoder": AutoencoderConfig,
            "eval": EvalConfig, "finetune": FinetuneConfig}


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise MeddiffError(f"{where} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise MeddiffError(f"unknown {where} key(s): {', '.join(sorted(unknown))}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = SECTIONS.get(name) if cls is TrainConfig else None
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: dict[str, Any],
                settings: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then non-None overrides (dotted keys like 'model.prediction_type'; None there
    means "not given"), then `settings`, where None is a value (`snr_gamma: null` switches Min-SNR off)."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise MeddiffError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MeddiffError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    given = [(k, v) for k, v in overrides.items() if v is not None] + list((settings or {}).items())
    for key, value in given:
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return TrainConfig.from_dict(data)
