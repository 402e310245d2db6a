"""Differentially private training (DP-SGD) in the one training loop: `--dp.epsilon E` (or a fixed
`--dp.noise-multiplier`).

What is protected, and how:
- The privacy unit is the **patient** where the data has patient ids (`--dp.unit auto`), else the image. Each step
  draws a Poisson sample of units (each independently with probability q = batch_size / units, so batches vary in
  size and may be empty) and takes **one** image of each drawn patient, so one patient adds at most one gradient to
  a step: per-sample clipping is then per-patient clipping, and the accountant's epsilon is per patient.
- Per-sample gradients come from opacus' hooks on the trained modules (the method's loss runs unchanged); each is
  clipped to `--dp.clip`, summed, Gaussian noise of std noise_multiplier x clip is added, and the sum is divided by
  the expected batch size (opacus' DPOptimizer). The loop's global gradient clipping is replaced by this.
- `--dp.multiplicity K` (noise multiplicity, as in Dockhorn et al.'s DPDM): each drawn image is trained on K
  (time, noise) draws in K rows whose gradients are averaged before clipping. The image still adds one clipped
  gradient, so epsilon is unchanged; the diffusion loss's variance falls, for K times the compute.
- The accountant (opacus RDP or PRV) turns (noise multiplier, q, steps, delta) into epsilon; with a target epsilon
  the noise is calibrated for `max_steps`, and a run stopped earlier (time budget, a check) spent less, as reported.
- The sample of step s and its noise are functions of (a secret random key of the run, s). The key is made when the
  run starts and kept only in its checkpoints (never in config.yaml, training.json or the pipeline): someone who
  knows the config's seed cannot replay the draws, and a resumed run continues the same mechanism. The noise comes
  from torch's generator seeded from that key (not a cryptographic generator; opacus' secure mode, which needs
  torchcsprng, is not offered).
- The logged training loss (training.json, tensorboard) and the memorisation checks' numbers are computed from the
  data without noise: they are outside the guarantee, so do not publish them with the model. `--privacy.stop`
  (a data-dependent stop) is refused.

Not covered: an autoencoder trained on the same patients (latent models: train it on other data, or accept that it
is not private), label counts written into the pipeline, and anything computed from the data outside the loop
(normalisation, the privacy monitor's comparisons). One process only (no DDP), no gradient accumulation."""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from meddiff.errors import MeddiffError
from meddiff.options import Options, option

NOISE_SEED = 0x0D9  # mixed into the per-step seeds so that DP noise never shares a stream with training noise


@dataclass
class DPConfig(Options):
    epsilon: float = option(
        0.0, "differential privacy: target epsilon; the noise is calibrated to reach it at max_steps (0: no DP)",
        minimum=0,
    )  # fmt: skip
    noise_multiplier: float = option(
        0.0, "differential privacy with this noise multiplier instead of a target epsilon (epsilon is reported)",
        minimum=0,
    )  # fmt: skip
    delta: float = option(0.0, "differential privacy delta (0: min(1e-5, 0.1 / units))", minimum=0, maximum=0.1)
    clip: float = option(1.0, "per-patient (per-unit) gradient norm bound", above=0)
    unit: Literal["auto", "patient", "image"] = option(
        "auto", "privacy unit: patient, image, or auto (patient where the data has patient ids)"
    )
    accountant: Literal["rdp", "prv"] = option(
        "rdp", "privacy accountant: rdp (Renyi DP) or prv (privacy random variables; tighter)"
    )
    multiplicity: int = option(
        1, "differential privacy: each drawn image is trained on K (time, noise) draws whose gradients are averaged "
        "before clipping (noise multiplicity: less variance at the same epsilon, K times the compute)",
        minimum=1, maximum=64,
    )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0


def _opacus():
    try:
        import opacus
    except ImportError:
        raise MeddiffError(
            "differential privacy needs opacus: pip install 'meddiff[dp]' (or pip install opacus)"
        ) from None
    return opacus


def privacy_units(patients, n: int, unit: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(unit, members, starts): the images of unit u are members[starts[u]:starts[u + 1]]."""
    if unit not in ("auto", "patient", "image"):
        raise MeddiffError(f"--dp.unit must be patient, image or auto, got {unit!r}")
    has_ids = len(patients) == n and n > 0 and all(bool(p) for p in patients)
    if unit == "patient" and not has_ids:
        raise MeddiffError(
            "--dp.unit patient needs patient ids and this dataset has none for some images (CheXpert/MIMIC paths, "
            "a CSV patient_col or DICOM PatientIDs carry them); use --dp.unit image (per-image privacy)"
        )
    if unit == "image" or (unit == "auto" and not has_ids):
        return "image", np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
    _, inverse = np.unique(np.asarray(list(patients), dtype=object).astype(str), return_inverse=True)
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    counts = np.bincount(inverse)
    return "patient", members, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def poisson_batch(
    members: np.ndarray, starts: np.ndarray, rate: float, seed: int, step: int, multiplicity: int = 1
) -> list[int]:
    """Step `step`'s batch: each unit drawn with probability `rate`, one of its images taken uniformly; each index
    repeated `multiplicity` times in a row (its rows' gradients are averaged before clipping: merge_multiplicity)."""
    rng = np.random.default_rng([int(seed) % 2**64, int(seed) >> 64, NOISE_SEED, int(step)])
    units = len(starts) - 1
    drawn = np.flatnonzero(rng.random(units) < rate)
    sizes = starts[drawn + 1] - starts[drawn]
    pick = starts[drawn] + np.floor(rng.random(len(drawn)) * sizes).astype(np.int64)
    return np.repeat(members[pick], int(multiplicity)).tolist()


class PoissonBatchSampler(Sampler[list[int]]):
    """The batches of steps start .. start+count-1 (see poisson_batch); empty batches are yielded as []."""

    def __init__(
        self,
        members: np.ndarray,
        starts: np.ndarray,
        rate: float,
        seed: int,
        start: int,
        count: int,
        multiplicity: int = 1,
    ):
        self.members, self.starts, self.rate, self.seed, self.start, self.count = (
            members, starts, rate, seed, start, count,
        )  # fmt: skip
        self.multiplicity = int(multiplicity)

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for k in range(self.count):
            yield poisson_batch(self.members, self.starts, self.rate, self.seed, self.start + k, self.multiplicity)


def epsilon_spent(noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps (opacus' accountant); inf without noise."""
    return history_epsilon([(noise_multiplier, rate, steps)], delta, accountant)


def history_epsilon(history, delta: float, accountant: str) -> float:
    """Epsilon of a run's segments [(noise multiplier, sample rate, steps), ...] composed (a resumed run may have
    changed its noise); inf when a segment had no noise (steps trained without DP)."""
    segments = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not segments:
        return 0.0
    if any(s <= 0 for s, _, _ in segments):
        return math.inf
    _opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = segments
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(history, rate: float, steps: int, target: float, delta: float, accountant: str) -> float:
    """The smallest noise multiplier (to 0.5 %) with which `steps` more steps keep the whole run within `target`."""

    def eps(sigma: float) -> float:
        return history_epsilon([*history, (sigma, rate, steps)], delta, accountant)

    spent = history_epsilon(history, delta, accountant)
    if spent >= target:
        raise MeddiffError(
            f"differential privacy: the steps already trained spent epsilon {spent:.3g} of the target {target:g}; "
            "nothing is left for more steps (raise --dp.epsilon or start a new run)"
        )
    hi = 1.0
    while eps(hi) > target:  # a noise that is enough
        hi *= 2
        if hi > 1e4:
            raise MeddiffError(f"differential privacy: no noise reaches epsilon {target:g} in {steps} steps")
    lo = hi / 2
    while lo > 0.01 and eps(lo) <= target:  # and one that is not
        hi, lo = lo, lo / 2
    while hi - lo > 0.005 * hi:
        mid = (lo + hi) / 2
        if eps(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def contiguous_inputs(model: torch.nn.Module) -> None:
    """Convolutions get contiguous inputs. opacus' per-sample gradient of a convolution fed a permuted
    (channels-last) tensor, as diffusers' attention blocks hand their output on, came out as zeros (opacus 1.6,
    measured in tests/training/test_differential_privacy.py): those layers would have trained on noise alone."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
            module.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))


class PrivateTraining:
    """The DP parts of a run: its units and sampling rate, the noise calibration, the per-sample-gradient hooks
    and optimizer, and the report (training.json "differential_privacy", the model card)."""

    def __init__(self, cfg: DPConfig, patients, n: int, batch_size: int, max_steps: int, seed: int):
        if cfg.epsilon > 0 and cfg.noise_multiplier > 0:
            raise MeddiffError("give --dp.epsilon (a target) or --dp.noise-multiplier (a fixed noise), not both")
        if cfg.accountant not in ("rdp", "prv"):
            raise MeddiffError(f"--dp.accountant must be rdp or prv, got {cfg.accountant!r}")
        _opacus()
        self.cfg, self.seed, self.batch_size, self.max_steps = cfg, int(seed), int(batch_size), int(max_steps)
        self.unit, self.members, self.starts = privacy_units(patients, n, cfg.unit)
        self.units = len(self.starts) - 1
        if self.batch_size >= self.units:
            raise MeddiffError(
                f"differential privacy: batch_size {batch_size} must be below the number of {self.unit}s "
                f"({self.units}); the sampling rate is batch_size / {self.unit}s"
            )
        self.rate = self.batch_size / self.units
        self.delta = cfg.delta or min(1e-5, 0.1 / self.units)
        self.history: list[list] = []  # [noise multiplier, sample rate, steps] per stretch of training
        self.noise_multiplier = 0.0
        self.optimizer: Any = None
        self._hooks: Any = None
        self.key = secrets.token_hex(16)  # the run's secret: a resumed run's start() restores its checkpoint's
        self.start([], 0)  # a fresh run's noise (the loop calls start() again only when it resumes)

    @property
    def secret_seed(self) -> int:
        """The run's draws come from this (key and config seed), never from the config's seed alone."""
        return int(hashlib.sha256(f"{self.key}:{self.seed}".encode()).hexdigest()[:32], 16)

    def start(self, history: list, step: int, key: str | None = None) -> None:
        """Continue from a checkpoint's DP history at `step` (a fresh run: [], 0), with this run's noise: fixed, or
        calibrated so that the whole run, earlier stretches included, spends the target epsilon at max_steps.
        Steps a checkpoint trained without DP count as unbounded epsilon."""
        if key:
            self.key = key
        history = [list(h) for h in history]
        covered = sum(int(h[2]) for h in history)
        if step > covered:  # trained without DP before
            history.append([0.0, self.rate, step - covered])
        if self.cfg.noise_multiplier > 0:
            sigma = float(self.cfg.noise_multiplier)
        elif step >= self.max_steps and history:  # nothing left to train: keep the last noise (no calibration)
            sigma = float(history[-1][0])
        else:
            sigma = calibrate_noise(
                history, self.rate, self.max_steps - step, self.cfg.epsilon, self.delta, self.cfg.accountant
            )
        self.noise_multiplier = sigma
        if self.optimizer is not None:
            self.optimizer.noise_multiplier = sigma
        self.history = [*history, [sigma, self.rate, 0]]

    def step_done(self) -> None:
        self.history[-1][2] += 1

    def sampler(self, start_step: int, count: int) -> PoissonBatchSampler:
        return PoissonBatchSampler(
            self.members, self.starts, self.rate, self.secret_seed, start_step, count, self.cfg.multiplicity
        )

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        """Per-sample-gradient hooks on `model`'s trainable modules (the method's loss calls the modules as
        before) and the DP optimizer around `optimizer` (what the loop then steps)."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        contiguous_inputs(model)
        try:
            self._hooks = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        except Exception as e:  # noqa: BLE001  # opacus raises several types for layers it cannot handle
            raise MeddiffError(
                f"differential privacy: opacus cannot compute per-sample gradients of this model "
                f"({str(e).splitlines()[0][:200]})"
            ) from None
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.cfg.clip,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            generator=torch.Generator(device=device),
        )
        return self.optimizer

    def before_step(self, step: int) -> None:
        """The step's noise stream, by (secret key, step): a resumed run adds the noise an uninterrupted one would."""
        if self.optimizer is not None:
            digest = hashlib.sha256(f"{self.key}:{self.seed}:noise:{int(step)}".encode()).digest()
            self.optimizer.generator.manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))

    def merge_multiplicity(self, rows: int) -> None:
        """The step loaded `rows` = K x drawn rows, each drawn image K times in a row (K = --dp.multiplicity): an
        image's per-sample gradient becomes the mean of its rows', so clipping, the noise and the accountant see one
        gradient per drawn unit, as without K. Checks that every trained parameter has one per-sample gradient per
        loaded row (a method that added or dropped rows would mix images)."""
        k = int(self.cfg.multiplicity)
        if rows % k:
            raise MeddiffError(f"differential privacy: {rows} loaded rows are not a multiple of --dp.multiplicity {k}")
        for p in self.optimizer.params:
            g = getattr(p, "grad_sample", None)
            if g is None:
                continue
            g = torch.cat(g) if isinstance(g, list) else g
            if g.shape[0] != rows:
                raise MeddiffError(
                    f"differential privacy: {g.shape[0]} per-sample gradients for {rows} loaded rows (the method "
                    "must keep one loss row per loaded image)"
                )
            p.grad_sample = g.reshape(rows // k, k, *g.shape[1:]).mean(dim=1) if k > 1 else g

    def empty_batch(self) -> None:
        """No unit was drawn this step: the update is noise alone (what the accountant assumes)."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def report(self, steps: int) -> dict:
        eps = history_epsilon(self.history, self.delta, self.cfg.accountant)
        return {
            "epsilon": round(eps, 4) if math.isfinite(eps) else None,
            "delta": self.delta,
            "target_epsilon": self.cfg.epsilon or None,
            "unit": self.unit,
            "units": self.units,
            "sample_rate": self.rate,
            "expected_batch": self.batch_size,
            "noise_multiplier": round(self.noise_multiplier, 5),
            "clip": self.cfg.clip,
            "steps": int(steps),
            "history": [[round(float(s), 5), q, int(n)] for s, q, n in self.history if int(n) > 0],
            "accountant": self.cfg.accountant,
            "multiplicity": int(self.cfg.multiplicity),
        }


def check_dp_run(config, world: int, method, precision: str) -> None:
    """What DP training cannot be combined with: one line each."""
    if world > 1:
        raise MeddiffError("differential privacy trains in one process (no DDP): run without accelerate launch")
    if int(config.gradient_accumulation) > 1:
        raise MeddiffError("differential privacy: gradient_accumulation must be 1 (raise batch_size instead)")
    if config.compile:
        raise MeddiffError("differential privacy: --compile is not supported (per-sample-gradient hooks)")
    if config.privacy.every and config.privacy.stop:
        raise MeddiffError(
            "differential privacy: --privacy.stop is refused (stopping on comparisons with training images is a "
            "data-dependent release outside the guarantee); keep --privacy.every for monitoring only"
        )
    if config.text.train_encoder:
        raise MeddiffError("differential privacy: --text.train-encoder is not supported (keep the text encoder frozen)")
    if config.finetune.gradient_checkpointing:
        raise MeddiffError("differential privacy: --finetune.gradient-checkpointing is not supported (opacus hooks)")
    if precision == "fp16":
        raise MeddiffError("differential privacy: fp16 is not supported (no loss scaling with per-sample clipping)")
    if not getattr(method, "supports_dp", False):
        raise MeddiffError(
            f"differential privacy is not supported for the {method.name!r} method as configured (pixel, latent, and "
            "finetune with --finetune.method unet or lora are)"
        )
