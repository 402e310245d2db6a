"""Typed training configuration: defaults < YAML file (--config) < command-line flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from meddiff.conditioning.text import TextConfig
from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import AutoencoderConfig
from meddiff.models.factory import ModelConfig
from meddiff.models.volume import VolumeModelConfig
from meddiff.options import Options, build, option, section
from meddiff.training.differential_privacy import DPConfig

FinetuneMethod = Literal["unet", "unet+text", "text", "dreambooth", "lora", "textual-inversion"]
LR_SCHEDULES = Literal["constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class LatentConfig(Options):
    autoencoder: str = option(
        "", "latent diffusion: run directory of `meddiff train-autoencoder` (or its autoencoder/ folder)"
    )
    draw: Literal["sample", "mean"] = option(
        "sample",
        "KL latents the diffusion model learns: a fresh draw from each stored posterior every step (sample), or "
        "the posterior mean (what the decoder's round trips use; a less noisy target for short runs)",
    )


@dataclass
class FinetuneConfig(Options):
    """Fine-tuning a pretrained Stable Diffusion (method "finetune"); see meddiff.training.methods.finetune."""

    pretrained: str = option("", "Stable Diffusion hub id or local diffusers folder")
    method: FinetuneMethod = option("unet", "fine-tuning strategy")
    text_encoder: str = option(
        "", "a domain text encoder (id or folder; 'minilm' packaged) replacing CLIP, projected to the U-Net's width"
    )
    gradient_checkpointing: bool = option(False, "trade compute for memory in the U-Net")
    lora_rank: int = option(8, "LoRA rank", minimum=1)
    lora_alpha: float = option(8.0, "LoRA alpha (scale = alpha / rank)", above=0)
    lora_text_encoder: bool = option(False, "LoRA on the text encoder too")
    placeholder_token: str = option("<lung-xray>", "textual inversion: the new token")
    initializer_token: str = option("chest", "textual inversion: the word whose embedding starts the new token")
    num_vectors: int = option(1, "textual inversion: embedding vectors behind the token", minimum=1)
    template: str = option("{token} {prompt}", "textual inversion: the training prompt around the new token(s)")
    instance_prompt: str = option("", "dreambooth: e.g. 'chest x-ray with sks pleural effusion'")
    class_prompt: str = option("", "dreambooth prior preservation, e.g. 'chest x-ray'")
    num_class_images: int = option(100, "dreambooth: class images generated for prior preservation", minimum=1)
    prior_loss_weight: float = option(1.0, "dreambooth: weight of the prior-preservation loss", minimum=0)
    train_text_encoder: bool = option(False, "dreambooth: train the text encoder (CLIP) too")
    validation_prompts: list[str] = option(
        ["chest x-ray with cardiomegaly", "chest x-ray with pleural effusion", "normal chest x-ray"],
        "validation prompts (grids in RUN/validation/)",
    )
    validation_every: int = option(0, "steps between validation grids (0: only after training)", minimum=0)
    validation_images: int = option(4, "validation images per prompt", minimum=1)


@dataclass
class DistillConfig(Options):
    """Few-step distillation of a trained model (method "distill"); see meddiff.training.methods.distill."""

    teacher: str = option("", "distill: run directory (or pipeline folder) of the trained teacher")
    steps: int = option(4, "distill: network evaluations per image the student is made for", minimum=1, maximum=8)
    solver_steps: int = option(
        50, "distill: points of the teacher's DDIM grid; each training step spans one interval", minimum=2
    )
    consistency: Literal["lcm", "phased"] = option(
        "lcm",
        "distill: lcm (one consistency function to the clean image, fresh noise between steps; samples at any step "
        "count) or phased (the trajectory cut into --steps phases at the student's DDIM grid, consistency within "
        "each phase, deterministic DDIM sampling in exactly --steps evaluations: phased consistency models)",
    )
    phase_loss: Literal["noisy", "clean"] = option(
        "noisy",
        "distill, phased: compare the phase-end images as they are (noisy) or divided by the signal scale at the "
        "phase's end, in clean-image units (clean: early phases weigh as much as the last)",
    )
    guidance_min: float = option(1.0, "distill: smallest guidance scale distilled into the student", minimum=0)
    guidance_max: float = option(3.0, "distill: largest guidance scale distilled into the student", minimum=0)
    guidance_dim: int = option(64, "distill: width of the student's guidance-scale embedding", minimum=2)
    huber_c: float = option(
        0.001, "distill: pseudo-Huber constant of the consistency loss (0: squared error)", minimum=0
    )
    target_decay: float = option(
        0.0,
        "distill: EMA decay of the target network (0: the student itself with the gradient stopped, as improved "
        "consistency training; LCM uses 0.95)",
        minimum=0,
        maximum=0.9999,
    )
    lora_rank: int = option(
        0,
        "distill: train LoRA adapters of this rank on the teacher's U-Net instead of a full student with a guidance "
        "input (LCM-LoRA: a small adapter that makes the teacher, e.g. a fine-tuned Stable Diffusion, a few-step "
        "sampler; it samples at guidance 1, one evaluation per step); 0: the full student",
        minimum=0,
    )
    adversarial_weight: float = option(
        0.0,
        "distill, lcm: > 0 adds an adversarial loss on the student's clean-image estimates (a patch discriminator, "
        "conditioned on the labels where the teacher has them, learns real from student images), scaled so that "
        "its gradient at the U-Net's output is this fraction of the consistency loss's; aimed at the fine "
        "texture that few-step students blur; 0: off",
        minimum=0,
    )
    adversarial_start: int = option(
        0, "distill: step from which the adversarial loss counts (the discriminator trains from step 0)", minimum=0
    )
    discriminator_lr: float = option(2e-4, "distill: the discriminator's learning rate (Adam)", above=0)
    distribution_weight: float = option(
        0.0,
        "distill, lcm: > 0 adds a distribution-matching loss (DMD) on the student's clean-image estimates: noised "
        "again, the guided teacher's denoising of them is compared with a fake-score network's (a copy of the "
        "teacher that keeps learning the student's images), and the student moves towards the teacher's; scaled so "
        "that its gradient at the U-Net's output is this fraction of the consistency loss's; 0: off",
        minimum=0,
    )
    distribution_start: int = option(
        0,
        "distill: step from which the distribution-matching loss counts (the fake score trains from step 0)",
        minimum=0,
    )
    fake_score_lr: float = option(1e-4, "distill: the fake-score network's learning rate (Adam)", above=0)
    fake_score_steps: int = option(
        1,
        "distill: fake-score updates per student step (DMD2 uses 5; each costs a U-Net forward and backward)",
        minimum=1,
    )


@dataclass
class EvalConfig(Options):
    fidelity: bool = option(True, "train a real-image classifier and measure label fidelity of samples")
    fidelity_samples: int = option(256, "samples drawn for label fidelity", minimum=1)
    classifier_epochs: int = option(8, "epochs of the fidelity classifier", minimum=1)
    classifier_size: int = option(
        0, "the fidelity classifier works at most at this size: real images are loaded and generated ones downsized "
        "to it (a 128 px classifier costs a CPU 4x a 64 px one; 0: the model's resolution)", minimum=0,
    )  # fmt: skip
    grid_per_label: int = option(16, "images per label in the sample grid", minimum=1)
    prompt_samples: int = option(48, "text models: images per prompt for the prompt-response table", minimum=1)
    min_steps: int = option(
        200, "runs shorter than this get sample grids but no fidelity table (noted; 0: always measure)", minimum=0
    )
    time_share: float = option(
        1.0,
        "sampling after training may take at most this multiple of the training time (at least a minute): short "
        "runs draw fewer images, noted (0: no limit)",
        minimum=0,
    )


@dataclass
class PrivacyMonitorConfig(Options):
    every: int = option(
        0, "steps between memorisation checks during training (0: none): samples from the EMA weights are compared "
        "with the training images", minimum=0,
    )  # fmt: skip
    samples: int = option(128, "images sampled per check (fixed seeds and labels: checks are comparable)", minimum=8)
    sample_steps: int = option(10, "sampler steps of those images", minimum=1)
    alpha: float = option(
        0.01,
        "false-flag rate of the check's near-copy detector (calibrated on the held-out split)",
        minimum=0.001,
        maximum=0.2,
    )
    stop: bool = option(False, "stop training when the copy rate is significantly above alpha on two checks in a row")
    loss_images: int = option(128, "training and held-out images of the denoising-loss gap", minimum=8)
    compare_size: int = option(
        64, "images are compared at most this size (memory of the training-image index)", minimum=16
    )
    descriptor_steps: int = option(
        0, "also train a copy descriptor on the training images for this many steps before training and use it as "
        "one more detector, as `meddiff privacy calibrate` does (finds shifted, cropped and re-noised copies; a few "
        "CPU minutes at 28-64 px; 0: pixel detectors only)", minimum=0,
    )  # fmt: skip


@dataclass
class TrainConfig(Options):
    """Everything a training run reads; saved as RUN/config.yaml. Defaults < YAML (--config) < flags."""

    data: str = option("", "dataset spec, e.g. phantom:DIR, medmnist:FILE.npz, store:DIR")
    out: str = option("", "run directory")
    method: str = option(
        "pixel",
        "what is trained: pixel, latent, autoencoder, finetune, or another method "
        "registered in meddiff.training.methods (checked when training starts)",
    )
    conditioning: Literal["labels", "text", "both", "none"] = option(
        "labels", "diffusion methods: condition on labels, prompts, both or nothing"
    )
    resolution: int = option(32, "image size in pixels (square)", minimum=8)
    batch_size: int = option(32, "images per micro-batch (per process)", minimum=1)
    max_steps: int = option(100_000, "optimizer steps", minimum=1)
    max_minutes: float | None = option(None, "wall-clock training budget (null: none)", above=0)
    learning_rate: float = option(1e-3, "peak learning rate", above=0)
    lr_warmup_steps: int = option(100, "linear warm-up steps", minimum=0)
    lr_schedule: LR_SCHEDULES = option("constant_with_warmup", "learning-rate schedule (diffusers' get_scheduler)")
    adam_weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    adam_beta2: float = option(
        0.999, "AdamW's second-moment decay (0.95-0.99 steadies large-batch training)", above=0, maximum=0.99999
    )
    max_grad_norm: float = option(1.0, "gradient clipping norm", above=0)
    cond_dropout: float = option(
        0.1,
        "classifier-free guidance: probability of training without the condition (fine-tuning: of an empty prompt)",
        minimum=0,
        maximum=1,
    )
    attribute_dropout: float = option(
        0.2,
        "with demographic labels (sex / age / view): probability that each of them alone is left unspecified, so "
        "that findings can be asked for with demographics open",
        minimum=0,
        maximum=1,
    )
    snr_gamma: float | None = option(
        5.0, "Min-SNR loss weighting gamma; null or 0 for plain MSE", above=0, zero_is_none=True
    )
    noise_offset: float = option(
        0.0, "per-channel constant added to the noise (0.05-0.1 helps very dark/bright images)", minimum=0
    )
    gradient_accumulation: int = option(1, "micro-batches of batch_size per optimizer step", minimum=1)
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "adamw8bit needs bitsandbytes (CUDA)")
    ema: bool = option(True, "keep and export an EMA of the trained weights (where the method uses one)")
    ema_decay: float = option(0.9995, "EMA decay", minimum=0, maximum=1)
    ema_power: float = option(0.75, "EMA warm-up: decay = 1 - (1 + step) ** -power until ema_decay", above=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "auto: bf16 where supported, else fp16 on GPUs, else fp32"
    )
    # CPU/GPU speed options, off by default because on the 2-core CPU they gave nothing (bench/speedups.py):
    channels_last: bool = option(False, "NHWC memory format for the trained model's convolutions (speed option)")
    attention: Literal["auto", "sdpa", "classic"] = option(
        "auto", "attention kernel: auto picks classic on CPU+bf16 with small maps (measured)"
    )
    compile: bool = option(False, "torch.compile the trained model (inductor); minutes of compile time before step 1")
    loader_workers: int | None = option(
        None, "DataLoader processes (null: 0 for in-memory data, else by device and cores)", minimum=0
    )
    threads: int | None = option(None, "CPU threads for torch (null: PyTorch's default, all cores)", minimum=1)
    seed: int = option(0, "random seed (data order, noise, initialisation)")
    checkpoint_every: int = option(500, "steps between checkpoints (0: none until the end)", minimum=0)
    checkpoints_keep: int = option(2, "checkpoints kept on disk", minimum=1)
    log_every: int = option(10, "steps between loss logs", minimum=1)
    sample_steps: int = option(20, "sampler steps for the grids and fidelity after training", minimum=1)
    guidance: float = option(2.0, "classifier-free guidance scale for the grids and fidelity", minimum=0)
    resume: str | None = option(None, "'latest' or a checkpoint folder")
    init_from: str | None = option(
        None, "start from another run's trained U-Net (same model and labels; e.g. trained on public data, then "
        "fine-tuned here with DP); steps, optimizer and EMA start fresh"
    )  # fmt: skip
    model: ModelConfig = section(ModelConfig, "the denoising U-Net and its noise schedule")
    text: TextConfig = section(TextConfig, "text conditioning")
    latent: LatentConfig = section(LatentConfig, "latent diffusion")
    autoencoder: AutoencoderConfig = section(AutoencoderConfig, "the autoencoder (train-autoencoder)")
    eval: EvalConfig = section(EvalConfig, "evaluation after training")
    privacy: PrivacyMonitorConfig = section(PrivacyMonitorConfig, "memorisation checks during training")
    dp: DPConfig = section(DPConfig, "differentially private training (DP-SGD, per patient where ids exist)")
    finetune: FinetuneConfig = section(FinetuneConfig, "fine-tuning a pretrained Stable Diffusion")
    distill: DistillConfig = section(DistillConfig, "few-step distillation of a trained model (meddiff distill)")
    volume: VolumeModelConfig = section(
        VolumeModelConfig, "3D volume models (methods volume-autoencoder, volume-latent)"
    )

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build(cls, data)


def load_config(
    path: str | Path | None, overrides: dict[str, Any], settings: dict[str, Any] | None = None
) -> TrainConfig:
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
        if not isinstance(data, dict):
            raise MeddiffError(f"config file {p} must hold a mapping of keys to values, not a {type(data).__name__}")
    given = [(k, v) for k, v in overrides.items() if v is not None] + list((settings or {}).items())
    for key, value in given:
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return TrainConfig.from_dict(data)
