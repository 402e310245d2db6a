"""Few-step distillation ("distill"): a student that samples in 1-8 network evaluations per image, learned from a
trained meddiff teacher by latent-consistency distillation (LCM, Luo et al. 2023), guidance included.

Each step draws a training image x0, a solver interval (t_lo, t_hi) of the teacher's `solver_steps`-point DDIM
grid (for a phased student, t_lo is the next lower training point, which includes the phase starts: see
teacher_step_to) and a guidance scale w; noises x0 to x_hi; lets the frozen teacher take one guided DDIM step
x_hi -> x_lo (a conditional and an unconditional pass); and trains the student so that its consistency function
f(x, t, w) = c_skip(t) x + c_out(t) x0_hat(x, t, w) gives the same clean image from x_hi as from x_lo. The target
f(x_lo) comes by default from the student itself with the gradient stopped (decay-0 target network, as improved
consistency training recommends), so there is no second copy of the weights to keep; `distill.target_decay` > 0
keeps an exponential moving average of the student as the target network instead (LCM: 0.95), saved with each
checkpoint.

The student is the teacher's U-Net with a guidance-scale input (`time_cond_proj_dim`; its projection starts at
zero) and the teacher's parametrisation (epsilon or v), so that at step 0 the student *is* the teacher. With
epsilon, the clean-image estimate (x - sqrt(1-a) eps) / sqrt(a) divides by sqrt(a) ~ 1e-3 at the top of the cosine
schedule; for pixel models it is clipped to the data range [-1, 1] in training exactly as LCMScheduler clips it when
sampling (clip_sample). (A first version read the epsilon teacher's output as v: the student then had to relearn its
output in a few hundred steps and sampled at chance label fidelity.) It is saved as an ordinary meddiff pipeline with
diffusers' LCMScheduler, so `generate`, `serve`, `fidelity` and `evaluate` load it like any model.

With `distill.lora_rank` > 0 (LCM-LoRA, Luo et al. 2023) the student is instead the teacher's own U-Net with peft
LoRA adapters (B = 0 at first, so it starts as the teacher) on its attention, feed-forward, convolution and time
projections; only the adapters learn, and there is no guidance input: the teacher's guided steps (scales drawn from
the guidance range) are distilled into the adapters, and the student samples at guidance 1, one evaluation per step.
This is the practical choice for large teachers such as a fine-tuned Stable Diffusion (whose RGB autoencoder gets
the 1-channel images as three equal channels): a few-MB adapter instead of a second 860M-parameter U-Net. The export
is the fused pipeline (loads everywhere a meddiff model does) plus the adapter alone in lora/ (diffusers'
`load_lora_weights` over the teacher, with LCMScheduler).

With `distill.adversarial_weight` > 0 (LCM students; in the spirit of adversarial diffusion distillation, Sauer et
al. 2023) a patch discriminator learns real training images (latents, for a latent teacher) from the student's
clean-image estimates f(x_hi), conditioned on the labels by projection where the teacher has labels, and the student
also minimises the hinge generator loss. A consistency student sampled in 2-4 steps averages over what the teacher
could draw and so blurs fine texture (on the phantoms: Consolidation and Pneumothorax lose label fidelity at 4
steps); the discriminator penalises exactly that. Its weight is adaptive, in the manner of VQGAN's: the adversarial
loss is scaled so that its gradient at the U-Net's output is `adversarial_weight` times the consistency loss's, which
keeps one setting meaningful across models, students (full or LoRA) and losses. The discriminator steps once per
optimizer step on every micro-batch of it, without the run's fp16 loss scaler (its own hinge loss is of order one).
It and its Adam state are prepared with accelerate, so they are checkpointed and resume exactly; it is not part of the
exported pipeline.

With `distill.distribution_weight` > 0 (LCM students; distribution matching, DMD/DMD2, Yin et al. 2024: see
meddiff.training.distribution_matching) the student's clean-image estimates f(x_hi) are noised again at a random level
and denoised by the guided teacher (at the student's own guidance scale w) and by a fake-score network, a copy of the
teacher that learns, one step (`fake_score_steps`) after each student step, to denoise the student's images under
their conditions; the student moves towards the teacher's denoising and away from the fake score's. Where the
consistency loss averages over what the teacher could draw from x_hi, this pulls each image to what the guided
teacher makes of it under its labels. Its weight is adaptive in the same way as the adversarial loss's (and both can
be on). The fake score is prepared and checkpointed like the discriminator and not exported."""

from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

from meddiff.conditioning.labels import LabelCodec
from meddiff.conditioning.text import PromptCache
from meddiff.errors import MeddiffError
from meddiff.models.discriminator import (
    PatchDiscriminator,
    discriminator_hinge_loss,
    generator_adversarial_loss,
    patch_layers,
)
from meddiff.models.factory import is_flow_schedule, make_sampler
from meddiff.models.pipeline import guidance_embedding
from meddiff.models.stable_diffusion import to_rgb
from meddiff.models.storage import PIPELINE_DIR, load_pipeline, save_pipeline
from meddiff.training.adversarial import (
    discriminator_optimizer,
    prepare_discriminator,
    prepare_side_network,
    step_side_network,
    update_side_network,
)
from meddiff.training.distribution_matching import (
    distribution_matching_loss,
    fake_score_loss,
    renoising_timesteps,
)
from meddiff.training.latent_cache import encoded_latents
from meddiff.training.methods.base import TrainingMethod, register_method
from meddiff.training.methods.latent import sample_latents

logger = logging.getLogger(__name__)

DISTILL_FILE = "meddiff_distill.json"  # in the student's pipeline folder: teacher, steps, solver grid
LORA_DIR = "lora"  # LCM-LoRA students: the adapter alone, next to the fused pipeline
# LCM-LoRA's adapter targets: attention, feed-forward, resnet convolutions and time projections, up/down samplers
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip
SIGMA_DATA = 0.5  # the consistency boundary condition's data scale (LCM's choice; diffusers' LCMScheduler uses it)
TIMESTEP_SCALING = 10.0  # LCMScheduler's default: c_skip(t) ~ 1 only for the last few timesteps


def distillable(pipe) -> None:
    """One-line errors for teachers this method cannot distil."""
    config = pipe.scheduler.config
    if (
        getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None
        or "original_inference_steps" in config
        or pipe.phased_steps
    ):
        raise MeddiffError("this model is already distilled; distil its teacher instead")
    if is_flow_schedule(config):
        raise MeddiffError(
            "distil takes noise-schedule (epsilon or v-prediction) teachers; a flow-matching model already samples "
            "in few steps: use --scheduler heun or dpm++ with --steps 4-8"
        )
    if not hasattr(pipe.scheduler, "alphas_cumprod") or config.get("prediction_type") not in (
        "epsilon",
        "v_prediction",
    ):
        raise MeddiffError(f"cannot distil a model with scheduler {type(pipe.scheduler).__name__}")
    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise MeddiffError("distil takes 2D meddiff models (pixel or latent diffusion); this is not one")


def student_sampler_name(consistency: str) -> str:
    """The diffusers scheduler a student samples with (named in its card, metrics.json and meddiff_distill.json)."""
    return "DDIMScheduler (eta 0, trailing timesteps)" if consistency == "phased" else "LCMScheduler"


def distillation_method(
    consistency: str, steps: int, lora_rank: int, adversarial_weight: float = 0.0, distribution_weight: float = 0.0
) -> str:
    """What the student is, in words: LCM or phased consistency, whole U-Net or LoRA adapters, with or without the
    adversarial and distribution-matching losses."""
    phased = consistency == "phased"
    if lora_rank:
        what = f"{'PCM' if phased else 'LCM'}-LoRA (rank {lora_rank})"
    else:
        what = (
            f"phased consistency distillation (PCM, {steps} phases)"
            if phased
            else "latent consistency distillation (LCM)"
        )
    extra = [f"an adversarial loss (weight {adversarial_weight:g})"] if adversarial_weight > 0 else []
    if distribution_weight > 0:
        extra.append(f"distribution matching (DMD, weight {distribution_weight:g})")
    return what + (" with " + " and ".join(extra) if extra else "")


def phase_grid(sampler: Any, steps: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, ends) of the phases of a phased student: the timesteps its DDIM sampler evaluates at `steps` steps,
    and where DDIMScheduler.step lands from each (start - total // steps: the next start when `steps` divides
    `total`, one timestep off it otherwise; -1, the clean image, or 0 after the last)."""
    sampler.set_timesteps(steps)
    starts = sampler.timesteps.long()
    return starts, (starts - total // steps).clamp(min=-1)


def consistency_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency boundary condition at integer timesteps t (f = x exactly at t = 0), the
    same formula LCMScheduler applies when sampling."""
    scaled = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def x0_and_eps(output: torch.Tensor, x: torch.Tensor, abar: torch.Tensor, prediction: str):
    """A network output (epsilon or v) at x_t with cumulative alpha abar -> (x0 estimate, noise estimate)."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction == "v_prediction":
        return a * x - s * output, s * x + a * output
    return (x - s * output) / a, output


@register_method
class ConsistencyDistillation(TrainingMethod):
    name = "distill"
    uses_ema = True

    def __init__(self, config, dataset, accelerator=None):
        super().__init__(config, dataset, accelerator)
        d = config.distill
        if not d.teacher:
            raise MeddiffError("distillation needs a teacher: pass --model RUN_DIR (a run of `meddiff train`)")
        if not 1 <= d.steps <= 8:
            raise MeddiffError(f"--steps must be between 1 and 8 for a distilled sampler, got {d.steps}")
        if d.guidance_max < d.guidance_min:
            raise MeddiffError("distill.guidance_max must be at least distill.guidance_min")
        self.teacher = load_pipeline(d.teacher)
        distillable(self.teacher)
        fuse_adapters(self.teacher)
        self.teacher.unet.requires_grad_(False).eval()
        names = self.teacher.label_names
        self.use_labels = self.teacher.supports_labels
        self.use_text = self.teacher.supports_prompts
        if self.use_labels and list(dataset.label_names) != list(names):
            raise MeddiffError(
                f"the teacher was trained on labels {names}; the data has {list(dataset.label_names)} "
                "(distil on the teacher's training data)"
            )
        self.codec = LabelCodec(names if self.use_labels else [])
        self.prompt_cache = PromptCache(self.teacher.tokenizer, self.teacher.text_encoder) if self.use_text else None
        scheduler: Any = self.teacher.scheduler  # a DDPMScheduler (distillable() checked)
        self.train_scheduler = scheduler
        self.prediction = str(scheduler.config["prediction_type"])
        self.abar = scheduler.alphas_cumprod.float()
        self.x0_clip = None if self.teacher.is_latent else 1.0  # pixels live in [-1, 1]; latents have no fixed range
        total = int(self.train_scheduler.config["num_train_timesteps"])
        self.skip = total // d.solver_steps
        self.grid = torch.arange(1, d.solver_steps + 1) * self.skip - 1  # LCM's DDIM grid: skip-1, ..., total-1
        self.phased = d.consistency == "phased"
        if self.phased:  # the student's own sampling grid cuts the trajectory into d.steps phases
            self.phase_starts, self.phase_ends = phase_grid(self.student_scheduler(), d.steps, total)
            # training points: the teacher's grid and every phase start (the points the sampler feeds the student)
            self.grid = torch.unique(torch.cat([self.grid, self.phase_starts]))
        self.latents = None
        if self.teacher.is_latent:
            vae: Any = self.teacher.vae
            if vae.config.sample_size != dataset.resolution:
                raise MeddiffError(
                    f"the teacher's autoencoder works at {vae.config.sample_size} px but the data is loaded at "
                    f"{dataset.resolution} px; use --resolution {vae.config.sample_size}"
                )
            rgb = int(vae.config.in_channels) == 3  # a pretrained RGB autoencoder (a fine-tuned Stable Diffusion)
            self.latents = encoded_latents(
                vae,
                dataset,
                dataset.resolution,
                accelerator,
                transform=to_rgb if rgb else None,
                tag="rgb3" if rgb else "gray",
            )
            self.scale = float(vae.config.scaling_factor)
            self.device_keys = ("mean", "std")
        self.lora_rank = int(d.lora_rank)
        if self.lora_rank:
            self.student = lora_student(self.teacher.unet, self.lora_rank)
            # its guidance is distilled in and it has no guidance input: it samples at 1 (saved in config.yaml, so
            # that generate, fidelity and serve default to it)
            config.guidance = 1.0
        else:
            student_config = {**self.teacher.unet.config, "time_cond_proj_dim": d.guidance_dim}
            self.student = UNet2DConditionModel.from_config(student_config)
            missing, unexpected = self.student.load_state_dict(self.teacher.unet.state_dict(), strict=False)
            assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
            torch.nn.init.zeros_(self.student.time_embedding.cond_proj.weight)  # step 0 answers like the teacher
        self.target: torch.nn.Module | None = None  # the EMA target network (target_decay > 0), made in setup()
        self.discriminator: Any = None  # adversarial_weight > 0: judges the student's clean-image estimates
        self.disc_optimizer: Any = None
        self._last: dict[str, list] = {}  # the step's real images, student images and conditions (adversarial)
        if d.adversarial_weight > 0:
            if self.phased:
                raise MeddiffError(
                    "--adversarial-weight is for LCM students (a phased student's outputs are noisy phase "
                    "ends, not images); use --distill.consistency lcm"
                )
            unet_config: Any = self.teacher.unet.config
            self.discriminator = PatchDiscriminator(
                in_channels=int(unet_config.in_channels),
                layers=patch_layers(int(unet_config.sample_size)),
                condition_dim=self.codec.dim if self.use_labels else 0,
            )
        self.fake_score: Any = None  # distribution_weight > 0: the teacher's copy that learns the student's images
        self.fake_optimizer: Any = None
        self.fake_scaler: Any = None  # fp16 runs: the fake score's own loss scaler
        if d.distribution_weight > 0:
            if self.phased:
                raise MeddiffError(
                    "--distribution-weight is for LCM students (a phased student's outputs are noisy phase ends, not "
                    "images); use --distill.consistency lcm"
                )
            self.fake_score = copy.deepcopy(self.teacher.unet).requires_grad_(True).train()

    @property
    def model(self) -> torch.nn.Module:
        return self.student

    def setup(self, accelerator) -> None:
        self.teacher.to(accelerator.device)
        self.abar = self.abar.to(accelerator.device)
        if self.config.distill.target_decay > 0:
            target = copy.deepcopy(self.student).requires_grad_(False).eval()
            # prepared so that accelerate places it and saves it with every checkpoint (exact resume); never trained
            self.target = accelerator.prepare_model(target, evaluation_mode=True)
        self.accelerator = accelerator
        if self.discriminator is not None:
            self.discriminator, self.disc_optimizer = prepare_discriminator(
                accelerator, self.discriminator, self.config.distill.discriminator_lr
            )
        if self.fake_score is not None:
            self.fake_score, self.fake_optimizer = prepare_side_network(
                accelerator, self.fake_score, self.fake_score_optimizer()
            )
            if getattr(accelerator, "scaler", None) is not None:  # fp16: its denoising loss needs scaling as the
                # teacher's did (an unscaled U-Net gradient underflows); its own scaler, saved with the checkpoints
                self.fake_scaler = torch.amp.GradScaler(accelerator.device.type)
                accelerator.register_for_checkpointing(self.fake_scaler)

    def fake_score_optimizer(self) -> torch.optim.Adam:
        """Adam for the fake-score network, without momentum (beta1 0: a local choice, as it tracks a moving
        distribution, the student's; DMD2's code uses AdamW with beta1 0.9)."""
        return torch.optim.Adam(self.fake_score.parameters(), lr=self.config.distill.fake_score_lr, betas=(0.0, 0.999))

    def after_step(self, model, batch, generator, step) -> None:
        """Move the target network towards the student (target_decay > 0); one discriminator step (adversarial);
        fake-score steps on the student's images (distribution matching)."""
        if self.target is not None:
            weight = 1.0 - self.config.distill.target_decay
            with torch.no_grad():
                for t, s in zip(self.target.parameters(), model.parameters()):
                    if s.requires_grad:  # frozen weights (an LCM-LoRA student's base) are the same in both
                        t.lerp_(s.detach().to(t.dtype), weight)
        if self._last and self.fake_score is not None:
            for _ in range(self.config.distill.fake_score_steps):
                self.fake_score_step(self._last["fake"], self._last["cond"], generator)
        if self.discriminator is not None and self._last:
            labels = [c["class_labels"] for c in self._last["cond"]]
            self.discriminator_step(
                torch.cat(self._last["real"]),
                torch.cat(self._last["fake"]),
                None if labels[0] is None else torch.cat(labels),
            )
        self._last = {}

    def fake_score_step(self, images: list[torch.Tensor], conds: list[dict], generator: torch.Generator) -> None:
        """One Adam step of the fake-score network: the teacher's denoising objective on the student's last images
        under their conditions, accumulated over the step's micro-batches one at a time (the memory of one)."""
        if self.fake_optimizer is None:  # outside the loop (tools, tests): a plain optimizer
            self.fake_optimizer = self.fake_score_optimizer()
        self.fake_optimizer.zero_grad(set_to_none=True)
        shares = []
        for part, cond in zip(images, conds):
            loss = fake_score_loss(self.fake_score, part, self.train_scheduler, cond, generator)
            if not torch.isfinite(loss):
                raise MeddiffError(
                    "the fake-score network's loss is not finite; lower --fake-score-lr or --distribution-weight"
                )
            share = loss / len(images)
            (self.fake_scaler.scale(share) if self.fake_scaler is not None else share).backward()
            shares.append(share.detach())
        step_side_network(self.fake_score, self.fake_optimizer, self.accelerator, self.fake_scaler)
        self.metrics["fake_score"] = torch.stack(shares).sum()

    def judge(self, images: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The discriminator's patch logits for clean images (or latents) under their condition vectors."""
        return self.discriminator(images, condition if self.use_labels else None)

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, condition: torch.Tensor | None) -> None:
        """One Adam step of the discriminator on the last batch: real images against the student's (detached)."""
        if self.disc_optimizer is None:  # outside the loop (tools, tests): a plain optimizer
            self.disc_optimizer = discriminator_optimizer(self.discriminator, self.config.distill.discriminator_lr)
        d_loss = discriminator_hinge_loss(self.judge(real, condition), self.judge(fake, condition))
        update_side_network(self.discriminator, self.disc_optimizer, d_loss, self.accelerator)
        self.metrics["discriminator"] = d_loss.detach()

    def relative_scale(
        self, output: torch.Tensor, consistency: torch.Tensor, other: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """weight x |d consistency / d output| / |d other / d output| at the U-Net's output (an adaptive weight in
        VQGAN's manner; the same place for full and LoRA students), without gradient; the parameters' .grad is left
        untouched. Under fp16 both losses are first multiplied by the run's loss scale (the ratio ignores it) so that
        neither gradient underflows."""
        scaler = getattr(self.accelerator, "scaler", None)  # None outside the loop and without fp16
        factor = float(scaler.get_scale()) if scaler is not None else 1.0
        g_cons = torch.autograd.grad(consistency * factor, output, retain_graph=True)[0]
        g_other = torch.autograd.grad(other * factor, output, retain_graph=True)[0]
        ratio = g_cons.float().norm() / (g_other.float().norm() + 1e-12)
        return (weight * ratio).clamp(max=1e4).detach()

    def batch_source(self):
        return self.latents if self.latents is not None else self.dataset

    def clean_samples(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        if self.latents is not None:
            return sample_latents(batch, self.scale, generator, self.config.latent.draw)
        return batch["image"]

    def conditions(self, batch: dict, device) -> tuple[dict, dict]:
        """(conditional, null) keyword arguments of the U-Net for this batch."""
        cond: dict = {"encoder_hidden_states": None, "class_labels": None}
        null: dict = {"encoder_hidden_states": None, "class_labels": None}
        if self.use_labels:
            c = self.codec.encode(batch["labels"], batch["known"]).to(device)
            cond["class_labels"], null["class_labels"] = c, torch.zeros_like(c)
        if self.use_text:
            assert self.prompt_cache is not None
            prompts = [self.dataset.prompts[i] for i in batch["index"].tolist()]
            cond["encoder_hidden_states"] = self.prompt_cache(prompts).to(device)
            null["encoder_hidden_states"] = self.prompt_cache([""] * len(prompts)).to(device)
        return cond, null

    def consistency(
        self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, w_embedding: torch.Tensor, end=None
    ) -> torch.Tensor:
        """The student's clean-image estimate f(x, t, w) (an LCM-LoRA student has no guidance input: f(x, t)); for a
        phased student (`end` given) its DDIM jump from x at t to the end of the phase, as its sampler takes it."""
        return self.consistency_from(self.network_output(model, x, t, cond, w_embedding), x, t, end)

    def network_output(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, w_embedding: torch.Tensor):
        """The U-Net's own output (epsilon or v) at x, t (t < 0 read as 0), in float32."""
        extra = {} if self.lora_rank else {"timestep_cond": w_embedding}
        return model(x, t.clamp(min=0), **extra, **cond).sample.float()

    def consistency_from(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, end=None) -> torch.Tensor:
        """consistency() from the network's output `out` at x, t."""
        abar = self.abar[t.clamp(min=0)].view(-1, 1, 1, 1)
        x0, eps = x0_and_eps(out, x.float(), abar, self.prediction)
        if self.x0_clip is not None:
            x0 = x0.clamp(-self.x0_clip, self.x0_clip)
        if end is not None:  # DDIMScheduler.step (eta 0): the clipped x0 estimate and the unclipped noise estimate
            abar_end = self.abar_at(end)
            return abar_end.sqrt() * x0 + (1 - abar_end).sqrt() * eps
        c_skip, c_out = consistency_scalings(t.clamp(min=0))
        return c_skip.view(-1, 1, 1, 1) * x.float() + c_out.view(-1, 1, 1, 1) * x0

    def teacher_step_to(self, pick: torch.Tensor) -> torch.Tensor:
        """Where the teacher's step from training point grid[pick] lands: `skip` timesteps down, or the next lower
        training point where that is nearer (a phase start off the teacher's grid, e.g. 749 between 739 and 759), so
        that every target is taken at a point the student is also trained at; -1 is the clean image
        (consistency() reads t < 0 as 0, where f(x) = x). For LCM's uniform grid this is t - skip."""
        below = torch.cat([torch.tensor([-1]), self.grid[:-1]])  # the grid ascends (arange, or torch.unique)
        # the training points include the uniform grid, so `below` is never more than `skip` down; the maximum only
        # matters for a grid without it (a test's single point)
        return torch.maximum(self.grid[pick] - self.skip, below[pick])

    def abar_at(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative alpha at timesteps t, 1 at t < 0 (the clean image: DDIM's final step, set_alpha_to_one)."""
        return torch.where(t >= 0, self.abar[t.clamp(min=0)], torch.ones_like(t, dtype=self.abar.dtype)).view(
            -1, 1, 1, 1
        )

    def loss(self, model, batch, generator):
        d = self.config.distill
        device = next(model.parameters()).device
        x0 = self.clean_samples(batch, generator).to(device).float()
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        pick = torch.randint(0, len(self.grid), (b,), generator=generator)
        t_hi = self.grid[pick].to(device)
        t_lo = self.teacher_step_to(pick).to(device)
        end = None
        if self.phased:  # the phase t_hi lies in ends at `end`; the teacher's step stops there at the latest
            starts = self.phase_starts.to(device)  # descending: t_hi's phase is the last start at or above it
            end = self.phase_ends.to(device)[(starts.view(1, -1) >= t_hi.view(-1, 1)).sum(1) - 1]
            t_lo = torch.maximum(t_lo, end)
        w = d.guidance_min + (d.guidance_max - d.guidance_min) * torch.rand(b, generator=generator)
        w_embedding = guidance_embedding(w, d.guidance_dim).to(device)
        abar_hi = self.abar[t_hi].view(-1, 1, 1, 1)
        x_hi = abar_hi.sqrt() * x0 + (1 - abar_hi).sqrt() * noise
        cond, null = self.conditions(batch, device)
        with torch.no_grad():  # one guided DDIM step of the teacher
            x0_g, eps_g = self.guided_teacher(x_hi, t_hi, abar_hi, cond, null, w)
            abar_lo = self.abar_at(t_lo)
            x_lo = abar_lo.sqrt() * x0_g + (1 - abar_lo).sqrt() * eps_g
            net = self.target if self.target is not None else model
            target = self.consistency(net, x_lo, t_lo, cond, w_embedding, end)
            if end is not None:  # a teacher step that reached the phase's end is the target itself
                target = torch.where((t_lo == end).view(-1, 1, 1, 1), x_lo, target)
        output = self.network_output(model, x_hi, t_hi, cond, w_embedding)  # the adversarial weight is measured here
        prediction = self.consistency_from(output, x_hi, t_hi, end)
        if end is not None and d.phase_loss == "clean":  # the phase ends' images compared in clean-image units
            scale = self.abar_at(end).sqrt()
            prediction, target = prediction / scale, target / scale
        diff = (prediction - target).pow(2)
        if d.huber_c > 0:
            per_pixel = (diff + d.huber_c**2).sqrt() - d.huber_c
        else:
            per_pixel = diff
        loss = per_pixel.mean()
        if self.discriminator is None and self.fake_score is None:
            return loss
        # an LCM student's f(x_hi) is its clean-image estimate (c_skip ~ 0 away from t = 0): what it outputs when
        # sampling; the discriminator and the fake score step on this batch after the student's optimizer step
        # (after_step; every micro-batch of a gradient-accumulation step is kept, after_step empties the lists)
        condition = cond["class_labels"]
        for key, value in (("real", x0.detach()), ("fake", prediction.detach()), ("cond", cond)):
            self._last.setdefault(key, []).append(value)
        self.metrics["consistency"] = loss.detach()
        step = int(batch.get("step", 0))
        total = loss
        if self.discriminator is not None and step >= d.adversarial_start:
            self.discriminator.requires_grad_(False)
            adversarial = generator_adversarial_loss(self.judge(prediction, condition).float())
            self.discriminator.requires_grad_(True)
            scale = self.relative_scale(output, loss, adversarial, d.adversarial_weight)
            self.metrics.update(adversarial=adversarial.detach(), adversarial_scale=scale)
            total = total + scale * adversarial
        if self.fake_score is not None and step >= d.distribution_start:
            matching = self.distribution_matching(prediction, cond, null, w, generator)
            scale = self.relative_scale(output, loss, matching, d.distribution_weight)
            self.metrics.update(distribution_matching=matching.detach(), distribution_scale=scale)
            total = total + scale * matching
        return total

    def guided_teacher(
        self, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, cond: dict, null: dict, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, noise) estimates of the frozen teacher at x, t, guided at each image's scale w: one batch of its
        null and conditional passes (call under no_grad)."""
        b = x.shape[0]
        both = {k: (torch.cat([null[k], v]) if v is not None else None) for k, v in cond.items()}
        out = self.teacher.unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample.float()
        x0_u, eps_u = x0_and_eps(out[:b], x, abar, self.prediction)
        x0_c, eps_c = x0_and_eps(out[b:], x, abar, self.prediction)
        scale = w.to(x.device).view(-1, 1, 1, 1)
        return x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u)

    def distribution_matching(
        self, images: torch.Tensor, cond: dict, null: dict, w: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """DMD's loss on the student's clean images: noised again at a random level, denoised by the teacher guided
        at the images' own scales w (the real score) and by the fake-score network under their conditions."""
        device, b = images.device, images.shape[0]
        t = renoising_timesteps(b, len(self.abar), generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device)
        abar = self.abar[t].view(-1, 1, 1, 1)
        with torch.no_grad():
            noisy = abar.sqrt() * images.detach() + (1 - abar).sqrt() * noise
            x0_real, _ = self.guided_teacher(noisy, t, abar, cond, null, w)
            x0_fake, _ = x0_and_eps(self.fake_score(noisy, t, **cond).sample.float(), noisy, abar, self.prediction)
            if not torch.isfinite(x0_fake).all():
                raise MeddiffError(
                    "the fake-score network's output is not finite; lower --fake-score-lr or --distribution-weight"
                )
            if self.x0_clip is not None:
                x0_real = x0_real.clamp(-self.x0_clip, self.x0_clip)
                x0_fake = x0_fake.clamp(-self.x0_clip, self.x0_clip)
        return distribution_matching_loss(images, x0_real, x0_fake)

    def student_scheduler(self) -> LCMScheduler | DDIMScheduler:
        """How the student samples: LCMScheduler, or for a phased student DDIM (eta 0) on a trailing grid, whose
        d.steps timesteps are the phases' starts (phase_grid says where each step lands)."""
        if self.config.distill.consistency == "phased":  # meddiff's DDIM sampler of the teacher's schedule
            return make_sampler("ddim", self.train_scheduler.config, clip=self.x0_clip is not None)
        accepted = inspect.signature(LCMScheduler.__init__).parameters
        schedule = {k: v for k, v in self.train_scheduler.config.items() if k in accepted}
        schedule.update(
            prediction_type=self.prediction,
            original_inference_steps=self.config.distill.solver_steps,
            timestep_scaling=TIMESTEP_SCALING,
            clip_sample=self.x0_clip is not None,
            clip_sample_range=self.x0_clip or 1.0,
        )
        return LCMScheduler(**schedule)

    def export(self, model, out_dir: Path) -> Path:
        teacher = self.teacher
        unet = model
        if self.lora_rank:  # the adapter alone (lora/), and the U-Net with it fused in for the pipeline
            save_lora_adapter(model, Path(out_dir) / LORA_DIR, self.student_scheduler())
            unet = fused_copy(model)
        folder = save_pipeline(
            Path(out_dir) / PIPELINE_DIR,
            unet,
            self.student_scheduler(),
            teacher.label_names,
            vae=teacher.vae if teacher.is_latent else None,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            phased_steps=self.config.distill.steps if self.phased else 0,
        )
        d = self.config.distill
        note = {
            "teacher": str(Path(d.teacher).resolve()),
            "steps": d.steps,
            "network_evaluations_per_image": d.steps,
            "teacher_prediction": self.prediction,
            "solver_steps": d.solver_steps,
            "guidance_range": [d.guidance_min, d.guidance_max],
            "method": distillation_method(
                d.consistency, d.steps, self.lora_rank, d.adversarial_weight, d.distribution_weight
            ),
            "consistency": d.consistency,
            "sampler": student_sampler_name(d.consistency),
            "lora_rank": self.lora_rank,
            "adversarial_weight": d.adversarial_weight,
            "distribution_weight": d.distribution_weight,
            "sampling_guidance": 1.0 if self.lora_rank else "any scale in the guidance range, one evaluation per step",
        }
        (folder / DISTILL_FILE).write_text(json.dumps(note, indent=2))
        return folder


def fuse_adapters(pipe) -> None:
    """A teacher loaded as base model + LoRA adapter (a `meddiff finetune --method lora` run) gets the adapter fused
    into its U-Net, so that students copy plain weights; an adapter on the text encoder is refused in one line."""
    if getattr(pipe.text_encoder, "peft_config", None):
        raise MeddiffError(
            "the teacher has a LoRA adapter on its text encoder, which distillation cannot carry over; fine-tune "
            "without --lora-text-encoder (or fully) and distil that"
        )
    if getattr(pipe.unet, "peft_config", None):
        fuse_lora_into(pipe.unet)


def fuse_lora_into(unet: Any) -> None:
    """Fold a U-Net's LoRA adapters into its weights and remove them (a plain U-Net afterwards)."""
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()


def lora_student(teacher_unet: UNet2DConditionModel, rank: int) -> UNet2DConditionModel:
    """A copy of the teacher's U-Net with trainable LoRA adapters (B = 0: it starts as the teacher) on the
    LCM_LORA_TARGETS it has; everything else frozen."""
    from peft import LoraConfig

    student = UNet2DConditionModel.from_config(teacher_unet.config)
    student.load_state_dict(teacher_unet.state_dict())
    student.requires_grad_(False)
    names = {name for name, _ in student.named_modules()}
    targets = [t for t in LCM_LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
    alpha: Any = rank  # peft annotates an int
    student.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=targets))
    return student


def fused_copy(model: torch.nn.Module) -> UNet2DConditionModel:
    """A plain U-Net with the LoRA adapters of `model` fused into its weights (the training copy is left as it is)."""
    unet: Any = copy.deepcopy(model)
    fuse_lora_into(unet)
    return unet


def save_lora_adapter(model: torch.nn.Module, folder: Path, scheduler: LCMScheduler | DDIMScheduler) -> Path:
    """The adapter alone in diffusers' LoRA format (pytorch_lora_weights.safetensors) with the scheduler to sample it
    with: `pipe.load_lora_weights(folder)`; `pipe.scheduler = LCMScheduler.from_pretrained(folder,
    subfolder="scheduler")` over the teacher (DDIMScheduler for a phased student)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    # peft's own key names (lora_A / lora_B), which diffusers reads back exactly; converted to the older diffusers
    # names (lora.down / lora.up), the attention adapters of a mixed-target LoRA are dropped on loading (measured
    # with diffusers 0.42 / peft 0.21: only the convolution and projection adapters came back)
    layers = get_peft_model_state_dict(model)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def distilled_info(folder: str | Path) -> dict | None:
    """What `meddiff distill` recorded about a student (None for other models)."""
    path = Path(folder) / DISTILL_FILE
    return json.loads(path.read_text()) if path.is_file() else None
