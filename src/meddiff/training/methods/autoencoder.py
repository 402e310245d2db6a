"""Training the autoencoder of a latent diffusion model (diffusers VQModel or AutoencoderKL, 1 channel).

Loss: L1 (or MSE) reconstruction + VQ codebook/commitment (VQ) or KL (KL) + optionally a patch-adversarial
hinge loss that counts from `adversarial_start` + optionally LPIPS where the lpips package and its weights are
installed (never required). VQ health: codebook usage and perplexity are logged every step, and codes unused for
`dead_code_steps` steps are re-initialised from random encoder outputs of the current batch. After training the
latent scaling factor is measured on the training images and written into the saved config."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from meddiff.errors import MeddiffError
from meddiff.models.autoencoder import (
    AUTOENCODER_DIR,
    build_autoencoder,
    codebook_perplexity,
    is_vq,
    measure_scaling_factor,
    vq_round_trip,
)
from meddiff.models.discriminator import PatchDiscriminator, discriminator_hinge_loss, generator_adversarial_loss
from meddiff.training.adversarial import prepare_discriminator, update_side_network
from meddiff.training.methods.base import TrainingMethod, register_method


class CodebookUsage:
    """Steps since each code was last chosen; checkpointed with the run so a resumed run resets the same codes."""

    def __init__(self, size: int):
        self.idle = torch.zeros(size, dtype=torch.long)
        self.resets = 0

    def update(self, indices: torch.Tensor) -> tuple[float, float]:
        counts = torch.bincount(indices.flatten().cpu(), minlength=self.idle.numel())
        used = counts > 0
        self.idle[used] = 0
        self.idle[~used] += 1
        return float(used.float().mean()), codebook_perplexity(counts)

    def dead(self, patience: int) -> torch.Tensor:
        return (self.idle >= patience).nonzero().flatten()

    def state_dict(self) -> dict:
        return {"idle": self.idle.tolist(), "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        self.idle = torch.tensor(state["idle"], dtype=torch.long)
        self.resets = int(state["resets"])


def reset_dead_codes(
    embedding: torch.nn.Embedding,
    usage: CodebookUsage,
    vectors: torch.Tensor,
    patience: int,
    generator: torch.Generator,
) -> int:
    """Replace codes idle for `patience` steps by random rows of `vectors` (N, D) (encoder outputs). Returns a count."""
    dead = usage.dead(patience)
    if dead.numel() == 0 or vectors.shape[0] == 0:
        return 0
    pick = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=generator)
    with torch.no_grad():
        embedding.weight.data[dead.to(embedding.weight.device)] = vectors[pick].to(embedding.weight)
    usage.idle[dead] = 0
    usage.resets += int(dead.numel())
    return int(dead.numel())


@register_method
class AutoencoderTraining(TrainingMethod):
    name = "autoencoder"
    uses_ema = False

    def __init__(self, config, dataset, accelerator=None):
        super().__init__(config, dataset, accelerator)
        self.cfg = config.autoencoder
        if self.cfg.reconstruction_loss not in ("l1", "mse"):
            raise MeddiffError("autoencoder.reconstruction_loss must be l1 or mse")
        self._model = build_autoencoder(self.cfg, config.resolution)
        self.vq = is_vq(self._model)
        self.usage = CodebookUsage(self.cfg.codebook_size) if self.vq else None
        self.discriminator = PatchDiscriminator() if self.cfg.adversarial_weight > 0 else None
        self.disc_optimizer: torch.optim.Optimizer | None = None  # set in setup(), with the discriminator
        self.perceptual = _lpips() if self.cfg.perceptual_weight > 0 else None
        self._last: dict = {}

    @property
    def model(self):
        return self._model

    def extra_state(self) -> dict:
        return {"codebook": self.usage.state_dict()} if self.usage is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.usage is not None and "codebook" in state:
            self.usage.load_state_dict(state["codebook"])

    def setup(self, accelerator) -> None:
        self.accelerator = accelerator
        if self.discriminator is not None:
            self.discriminator, self.disc_optimizer = prepare_discriminator(
                accelerator, self.discriminator, self.cfg.discriminator_lr
            )

    def _processes(self) -> int:
        accelerator = getattr(self, "accelerator", None)
        return accelerator.num_processes if accelerator is not None else 1

    def forward(self, model, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, regulariser loss); stashes what the after-step hooks need."""
        if self.vq:
            recon, codebook_loss, indices, h = vq_round_trip(model, x)
            self._last = {
                "vectors": h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1]).float(),
                "indices": indices.detach(),
            }
            return recon, self.cfg.commitment_weight * codebook_loss
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x.device)
        recon = model.decode(z).sample
        return recon, self.cfg.kl_weight * posterior.kl().mean()

    def loss(self, model, batch, generator):
        x = batch["image"]
        recon, reg = self.forward(model, x, generator)
        recon = recon.float()
        rec = F.l1_loss(recon, x) if self.cfg.reconstruction_loss == "l1" else F.mse_loss(recon, x)
        total = rec + reg
        self.metrics = {"reconstruction": rec.detach(), "regulariser": reg.detach()}  # floats at logging steps
        if self.perceptual is not None:
            p = self.perceptual(recon.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1)).mean()
            total = total + self.cfg.perceptual_weight * p
            self.metrics["perceptual"] = p.detach()
        step = int(batch.get("step", 0))
        if self.discriminator is not None and step >= self.cfg.adversarial_start:
            self.discriminator.requires_grad_(False)
            adv = generator_adversarial_loss(self.discriminator(recon))
            self.discriminator.requires_grad_(True)
            total = total + self.cfg.adversarial_weight * adv
            self.metrics["adversarial"] = adv.detach()
        self._last["recon"] = recon.detach()
        if self.usage is not None:
            usage, perplexity = self.usage.update(self._last["indices"])
            self.metrics.update({"codebook_usage": usage, "perplexity": perplexity})
        return total

    def after_step(self, model, batch, generator, step) -> None:
        if self.usage is not None:
            n = reset_dead_codes(
                model.quantize.embedding, self.usage, self._last["vectors"], self.cfg.dead_code_steps, generator
            )
            self.metrics["dead_codes_reset"] = float(n)
            if self._processes() > 1:  # every process keeps the main process's codebook
                from accelerate.utils import broadcast

                weight = model.quantize.embedding.weight
                weight.data.copy_(broadcast(weight.data.clone(), from_process=0))
        if self.discriminator is not None and step >= self.cfg.adversarial_start:
            assert self.disc_optimizer is not None
            real, fake = batch["image"], self._last["recon"]
            d_loss = discriminator_hinge_loss(self.discriminator(real), self.discriminator(fake))
            update_side_network(self.discriminator, self.disc_optimizer, d_loss, self.accelerator)
            self.metrics["discriminator"] = d_loss.detach()

    def export(self, model, out_dir: Path) -> Path:
        """Save in diffusers format with the scaling factor measured on (up to scale_samples) training images."""
        model.eval()
        n = min(self.cfg.scale_samples, len(self.dataset))
        idx = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed))[:n]
        factor = measure_scaling_factor(
            model, self.dataset.images[idx], torch.Generator().manual_seed(self.config.seed)
        )
        model.register_to_config(scaling_factor=factor)
        folder = Path(out_dir) / AUTOENCODER_DIR
        model.save_pretrained(folder, safe_serialization=True)
        model.train()
        return folder


def _lpips():
    try:
        import lpips  # optional extra; needs torchvision and its own weights
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        raise MeddiffError(
            "autoencoder.perceptual_weight > 0 needs the optional lpips package with its weights on "
            "disk (pip install lpips); set perceptual_weight 0 to train without it"
        ) from None
    net = lpips.LPIPS(net="vgg", verbose=False)
    net.requires_grad_(False).eval()
    return net
