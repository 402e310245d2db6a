"""The one training loop: accelerate for device and mixed precision, EMA, checkpoints with exact resume,
tensorboard scalars, a progress bar with loss and ETA, a step limit and a time budget.

What is trained, and how the loss is computed, is the business of a TrainingMethod.

Data arrives through a torch DataLoader (worker processes read each batch from the memory-mapped store or latent
cache; pinned memory and non-blocking copies on CUDA), in an order that is a function of (seed, samples
consumed) only (meddiff.training.batches). The device is synchronised with the host only at logging steps (loss,
metrics, NaN check, and with several processes the shared clock of the time budget).

Several processes (`accelerate launch` / `torchrun`, one per GPU, or CPU processes with gloo): `batch_size` is
per process; the global batch of step s is the one a single process with `batch_size x processes` would draw,
split round robin, so a run sees the same data in the same order at any process count, and a run resumed with
another process count continues the same stream. DDP wraps the method's whole loss (every module it touches
synchronises its gradients; `find_unused_parameters` only for methods that need it), the main process alone
writes checkpoints metadata, exports and logs, and the time budget is decided on the slowest process's clock."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from meddiff.data.dataset import ImageLabelDataset
from meddiff.devices import launch_rank, machine_description
from meddiff.errors import MeddiffError
from meddiff.models.factory import choose_attention, set_attention
from meddiff.precision import enable_tf32, reset_accelerate_state, resolve_precision
from meddiff.training.batches import StreamBatchSampler, batch_indices, make_loader, rank_batch_indices  # noqa: F401
from meddiff.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from meddiff.training.checks import TrainingCheck
from meddiff.training.config import TrainConfig
from meddiff.training.differential_privacy import PrivateTraining, check_dp_run
from meddiff.training.methods import METHODS, TrainingMethod
from meddiff.training.summary import TrainingSummary

logger = logging.getLogger(__name__)
WARMUP_STEPS = 5  # steps not timed for the run-length estimate (loader start-up, first-call kernel selection)
ESTIMATE_AFTER_STEPS = 20  # steps timed after the warm-up before the run's length is estimated
LONG_RUN_S = 30 * 60  # a run without a time budget projected to take longer than this is announced


def long_run_notice(steps_timed: int, seconds: float, steps_left: int, machine: str) -> str | None:
    """What to tell the user when the steps still to do will take long on this machine (fixed step counts, such as
    the demo's, make the result the same everywhere but the wait machine-dependent); None for a short run."""
    if steps_timed <= 0 or seconds <= 0:
        return None
    per_step = seconds / steps_timed
    left = per_step * steps_left
    if left <= LONG_RUN_S:
        return None
    hours = f"{left / 3600:.1f} hours" if left >= 5400 else f"{left / 60:.0f} minutes"
    return (
        f"{steps_left} more steps at {per_step:.2f} s a step on {machine}: about {hours}; a time budget "
        "(train --max-minutes M, demo --minutes M) ends sooner, with results that then depend on this machine's speed"
    )


def synced_clock(on: torch.Tensor) -> float:
    """The time once the work queued on `on`'s device has finished (a GPU runs ahead of the host)."""
    if on.device.type != "cpu":  # cuda, mps, xpu, ... alike
        torch.accelerator.synchronize(on.device)
    return time.perf_counter()


class LoopState(TypedDict, total=False):
    """Where a run stands: what a checkpoint's state.json holds (and restores)."""

    step: int
    elapsed: float  # training seconds, all runs of this run directory together
    samples: int  # images of the data stream consumed
    loss_history: list[list[float]]  # [step, loss, elapsed seconds]
    metrics_history: list  # [step, {name: value}]
    checks: dict  # {check name: [its results in order]} (training checks, e.g. the memorisation monitor)
    method: dict  # the method's extra state (written into checkpoints only)
    dp: list  # DP-SGD runs: [noise multiplier, sample rate, steps] per stretch of training (the accountant's input)
    dp_key: str  # DP-SGD runs: the secret the Poisson samples and the noise are drawn from (checkpoints only)


@dataclass
class TrainResult:
    run_dir: Path
    pipeline_dir: Path | None  # None on the other processes of a multi-process run
    steps: int
    train_seconds: float
    images_per_second: float
    loss_history: list[list[float]]  # [step, loss, elapsed seconds]
    precision: str
    parameters: int
    is_main_process: bool = True  # False on the other processes of a multi-process run (they export nothing)
    processes: int = 1
    summary: TrainingSummary | None = None  # what training.json holds


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """All randomness of one (micro-)step of one process: noise, timesteps, dropout."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + int(rank) * 1_000_000_007_000)


class LossModule(torch.nn.Module):
    """What DDP wraps when several processes train: its forward is the method's loss, so gradient
    synchronisation covers every module the loss touches (a U-Net and a text encoder; an autoencoder's encode
    and decode), not only a forward() of the trained module."""

    def __init__(self, method: TrainingMethod, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.method = method  # not a Module: not registered, not in the state dict

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.method.loss(self.model, batch, generator)


def _checkpoint_inner_model(accelerator: Accelerator, wrapper: LossModule) -> None:
    """Checkpoints of multi-process runs hold the trained module's own state dict (no DDP/wrapper prefixes), so
    they resume at any process count, single-process runs included."""

    def save_hook(models, weights, output_dir):
        for i, m in enumerate(models):
            if accelerator.unwrap_model(m) is wrapper:
                weights[i] = wrapper.model.state_dict()

    def load_hook(models, input_dir):
        for i, m in enumerate(models):
            if accelerator.unwrap_model(m) is wrapper:
                models[i] = wrapper.model

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_optimizer(config: TrainConfig, params: list):
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=config.learning_rate, betas=(0.9, config.adam_beta2), weight_decay=config.adam_weight_decay
        )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MeddiffError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA only)") from None
        return bnb.optim.AdamW8bit(
            params, lr=config.learning_rate, betas=(0.9, config.adam_beta2), weight_decay=config.adam_weight_decay
        )
    raise MeddiffError(f"unknown optimizer {config.optimizer!r}; choose adamw or adamw8bit")


def trained_module(accelerator: Accelerator, trainee) -> torch.nn.Module:
    """The model being trained, unwrapped from accelerate (and from the LossModule of multi-process runs)."""
    model = accelerator.unwrap_model(trainee, keep_torch_compile=False)
    return model.model if isinstance(model, LossModule) else model


@contextmanager
def ema_weights(model: torch.nn.Module, ema):
    """The model holds its EMA weights inside the block (the trained ones again after it)."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # what the EMA tracks, in its order
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    try:
        yield model
    finally:
        if ema is not None:
            ema.restore(trainable)


def _checks_on(model, due: Sequence[TrainingCheck], state: LoopState, accelerator: Accelerator, method) -> bool:
    """The due checks on `model` (in eval mode, as a sampling pipeline; left as it was): whether one asked to stop."""
    stop = False
    model.eval()
    try:
        pipe = method.sampling_pipeline(model)
        if pipe is None:
            logger.warning("checks during training skipped: the %s method makes no sampling pipeline", method.name)
            return False
        for check in due:
            history = state.setdefault("checks", {}).setdefault(check.name, [])
            result = {"step": state["step"], **check(state["step"], pipe, method, history)}
            history.append(result)
            numbers = {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            accelerator.log({f"{check.name}/{k}": v for k, v in numbers.items() if k != "step"}, step=state["step"])
            if result.get("warning"):
                logger.warning("%s at step %d: %s", check.name, state["step"], result["warning"])
            stop = stop or bool(result.get("stop"))
    finally:
        method.release_sampling_pipeline()
        model.train()
    return stop


def run_checks(
    due: Sequence[TrainingCheck], state: LoopState, accelerator: Accelerator, trainee, method, ema, main: bool
) -> bool:
    """Run the due checks on the EMA weights as a sampling pipeline (main process), log what they return, and say
    whether one asked to stop (the same answer on every process)."""
    stop, failure = False, None
    if main:
        model = trained_module(accelerator, trainee)
        try:
            with ema_weights(model, ema):
                stop = _checks_on(model, due, state, accelerator, method)
        except Exception as exc:  # noqa: BLE001  # raised below on every process, not only here
            failure = exc
    if accelerator.num_processes > 1:  # every process learns the outcome (no one waits for a process that failed)
        code = 2.0 if failure is not None else float(stop)
        code = float(broadcast(torch.tensor([code], device=accelerator.device), from_process=0).item())
        if code == 2.0 and failure is None:
            raise MeddiffError("a check during training failed on the main process (see its message)")
        stop = code == 1.0
    if failure is not None:
        raise failure
    return stop


def train(
    config: TrainConfig, dataset: ImageLabelDataset, progress: bool = True, checks: Sequence[TrainingCheck] = ()
) -> TrainResult:
    """The one training loop. `checks` run every `check.every` steps on the EMA weights (main process; see
    meddiff.training.checks); one that asks to stop ends training after that step (checkpointed)."""
    run_dir = Path(config.out)
    if config.method not in METHODS:
        raise MeddiffError(f"unknown training method {config.method!r}; known: {', '.join(METHODS)}")
    resume_from = find_checkpoint(run_dir, config.resume) if config.resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(config.precision)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    reset_accelerate_state()  # a second run in this process may ask for another precision
    # torchrun / accelerate launch on a machine without an accelerator: CPU processes talking over gloo
    cpu_processes = launch_rank()[1] > 1 and not torch.accelerator.is_available()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    accelerator = Accelerator(
        mixed_precision=precision,
        log_with="tensorboard",
        project_dir=str(run_dir / "logs"),
        cpu=cpu_processes,
        dynamo_backend="inductor" if config.compile else "no",
        kwargs_handlers=[ddp],
    )
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if accelerator.device.type == "cuda":
        enable_tf32()  # fp32 matmuls and convolutions (the parts autocast leaves in fp32) on tensor cores
    torch.manual_seed(config.seed)  # model initialisation
    method: TrainingMethod = METHODS[config.method](config, dataset, accelerator)
    method.is_main_process = main
    ddp.find_unused_parameters = bool(method.has_unused_parameters)  # read when the model is prepared below
    if config.init_from and resume_from is None:  # a resumed run's checkpoint already holds the weights
        method.initialise_from(config.init_from)
        logger.info("initialised the model from %s", config.init_from)
    model = method.model
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads omit it
    if hasattr(model, "set_attn_processor"):  # diffusion U-Nets; their default processor is SDPA
        kind = choose_attention(config.attention, model, accelerator.device.type, precision)
        if kind == "classic" or config.attention == "sdpa":
            set_attention(model, kind)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    private = None  # DP-SGD (--dp.*): Poisson batches by patient, per-sample clipping and noise
    if config.dp.enabled:
        check_dp_run(config, world, method, precision)
        source_len = len(method.batch_source())
        private = PrivateTraining(
            config.dp, dataset.patients, source_len, config.batch_size, config.max_steps, config.seed
        )
        optimizer = private.attach(model, optimizer, accelerator.device)
    elif config.dp.multiplicity > 1:
        raise MeddiffError(
            "--dp.multiplicity needs differential privacy: add --dp.epsilon E or --dp.noise-multiplier S"
        )
    lr_scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps
    )
    if world > 1:
        wrapper = LossModule(method, model)
        _checkpoint_inner_model(accelerator, wrapper)
        trainee, optimizer, lr_scheduler = accelerator.prepare(wrapper, optimizer, lr_scheduler)

        def compute_loss(batch, generator):
            return trainee(batch, generator)
    else:  # one process: the module itself is prepared (mixed-precision forward, optional torch.compile)
        model = trainee = accelerator.prepare_model(model)
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

        def compute_loss(batch, generator):
            return method.loss(model, batch, generator)

    method.setup(accelerator)
    ema = None
    if method.uses_ema and config.ema:
        ema = EMAModel(
            [p for p in model.parameters() if p.requires_grad],
            decay=config.ema_decay,
            use_ema_warmup=True,
            inv_gamma=1.0,
            power=config.ema_power,
        )
    state: LoopState = {"step": 0, "elapsed": 0.0, "loss_history": []}
    if resume_from is not None:
        state = cast(LoopState, load_checkpoint(accelerator, ema, resume_from))
        method.load_extra_state(state.pop("method", {}))
        logger.info("resumed from %s at step %s", resume_from, state["step"])
    if private is not None:
        if resume_from is not None:  # the key, and the noise for the steps to come given what was spent before
            private.start(state.get("dp", []), state["step"], state.get("dp_key"))
        state["dp"], state["dp_key"] = private.history, private.key  # the key: in checkpoints only
        logger.info(
            "differential privacy: %d %ss, sample rate %.4g, noise multiplier %.3f, clip %g, delta %.2g, %d draw(s) "
            "per image",
            private.units, private.unit, private.rate, private.noise_multiplier, config.dp.clip, private.delta,
            config.dp.multiplicity,
        )  # fmt: skip
    if main:
        config.save(run_dir / "config.yaml")
    accelerator.init_trackers("meddiff")

    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    start_step, start_elapsed = state["step"], state["elapsed"]
    accumulate = max(int(config.gradient_accumulation), 1)
    per_step = config.batch_size * world * accumulate  # images of one optimizer step, all processes together
    # where the data stream stands: checkpoints record it, so another process count or batch size continues it
    state.setdefault("samples", start_step * per_step)
    source = method.batch_source()
    sampler = (
        private.sampler(start_step, config.max_steps - start_step)
        if private is not None
        else StreamBatchSampler(
            len(source),
            config.batch_size,
            config.seed,
            state["samples"],
            (config.max_steps - start_step) * accumulate,
            rank,
            world,
        )
    )
    batches = iter(make_loader(source, sampler, accelerator.device, config.loader_workers))
    t0 = time.perf_counter()
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    running = None
    estimate_t0 = t0
    trainee.train()
    while state["step"] < config.max_steps and state["elapsed"] < budget:
        step = state["step"]
        loss = torch.zeros((), device=accelerator.device)
        for micro in range(accumulate):  # micro-batch k of step s is batch s*A+k: resumable, batch-size exact
            seq = step * accumulate + micro
            batch = method.to_device(next(batches), accelerator.device)
            batch["step"] = step
            generator = step_generator(config.seed, seq, rank)
            if private is not None:
                private.before_step(step)
                if len(batch["index"]) == 0:  # a Poisson sample may draw nobody: the update is noise alone
                    private.empty_batch()
                    continue
            # gradients are synchronised once per step, on its last micro-batch
            sync = accelerator.no_sync(trainee) if world > 1 and micro < accumulate - 1 else nullcontext()
            with sync:
                with accelerator.autocast():  # also covers methods that call submodules (encode/decode)
                    micro_loss = compute_loss(batch, generator) / accumulate
                accelerator.backward(micro_loss)
            loss = loss + micro_loss.detach().float()
        if config.max_grad_norm and private is None:  # DP clips each patient's gradient instead
            accelerator.clip_grad_norm_(trainee.parameters(), config.max_grad_norm)
        if private is not None:
            private.merge_multiplicity(len(batch["index"]))  # K rows -> one gradient per drawn patient, then clipping
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model, batch, generator, step)
        if ema is not None:
            ema.step([p for p in model.parameters() if p.requires_grad])
        state["step"] = step + 1
        if private is not None:
            private.step_done()
        state["samples"] += per_step
        local_elapsed = start_elapsed + time.perf_counter() - t0
        saving = bool(config.checkpoint_every) and state["step"] % config.checkpoint_every == 0
        # a checkpoint step is also checked: a non-finite loss must never be saved over good checkpoints
        logging_step = (
            state["step"] % config.log_every == 0 or state["step"] == 1 or state["step"] == config.max_steps or saving
        )
        checked = logging_step
        if world == 1:
            state["elapsed"] = local_elapsed
        if logging_step:  # the only host-device synchronisation of a step
            if world > 1:  # the logged loss is the global batch's; the budget runs on the slowest clock
                both = accelerator.gather(torch.stack([loss, torch.tensor(local_elapsed, device=loss.device)])[None])
                value, state["elapsed"] = float(both[:, 0].mean()), float(both[:, 1].max())
            else:
                value = float(loss)
            if not math.isfinite(value):
                raise MeddiffError(
                    f"loss became {value} by step {state['step']}; lower --learning-rate or use fp32 "
                    "(resume from the last checkpoint)"
                )
            metrics = {k: float(v) for k, v in method.metrics.items()}
            running = value if running is None else 0.8 * running + 0.2 * value
            state["loss_history"].append([state["step"], value, round(state["elapsed"], 2)])
            accelerator.log({"loss": value, "lr": lr_scheduler.get_last_lr()[0], **metrics}, step=state["step"])
            if metrics:
                state.setdefault("metrics_history", []).append([state["step"], metrics])
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.1e}", refresh=False)
        if main and not math.isfinite(budget):
            done = state["step"] - start_step
            if done == WARMUP_STEPS:
                estimate_t0 = synced_clock(loss)
            elif done == WARMUP_STEPS + ESTIMATE_AFTER_STEPS:
                notice = long_run_notice(
                    ESTIMATE_AFTER_STEPS,
                    synced_clock(loss) - estimate_t0,
                    config.max_steps - state["step"],
                    machine_description(accelerator.device),
                )
                if notice:
                    logger.warning(notice)
        left = budget - state["elapsed"]
        if math.isfinite(left):  # with a time budget, the bar's total (and so its ETA) is what fits in it
            per_step_s = (time.perf_counter() - t0) / (state["step"] - start_step)
            bar.total = min(config.max_steps, state["step"] + max(int(left / per_step_s), 0))
        bar.update(1)
        due = [c for c in checks if c.every > 0 and state["step"] % c.every == 0]
        stop = bool(due) and run_checks(due, state, accelerator, trainee, method, ema, main)
        if saving or stop:  # a stopped run keeps the state it stopped at
            save_checkpoint(
                accelerator, ema, {**state, "method": method.extra_state()}, run_dir, config.checkpoints_keep
            )
            saving = True
        if stop:
            logger.warning("training stopped at step %d by a check (--privacy.stop)", state["step"])
            break
    del batches  # stops the loader's workers
    bar.close()
    train_seconds = state["elapsed"] - start_elapsed
    steps_done = state["step"] - start_step
    if steps_done and not checked:  # stopped (time budget) after a step whose loss was not looked at
        last = float(accelerator.gather(loss.detach()[None]).mean()) if world > 1 else float(loss)
        if not math.isfinite(last):
            raise MeddiffError(
                f"loss became {last} by step {state['step']}; lower --learning-rate or use fp32 "
                "(resume from the last checkpoint)"
            )
    if steps_done and not saving:  # the last step's checkpoint, unless it was just written
        save_checkpoint(accelerator, ema, {**state, "method": method.extra_state()}, run_dir, config.checkpoints_keep)
    for tracker in accelerator.trackers:  # end_training() minus destroying the process group: the caller's
        tracker.finish()  # processes go on together (export barrier below, a next run in the same group)

    unwrapped = trained_module(accelerator, trainee)
    rows = config.dp.multiplicity if private is not None else 1  # DP noise multiplicity: K rows per drawn image
    rate = (  # images through the network a second (what the evaluation planner reads as this machine's speed)
        steps_done * config.batch_size * world * max(int(config.gradient_accumulation), 1) * rows / train_seconds
        if train_seconds > 0
        else 0.0
    )
    pipeline_dir = None
    if main:
        with ema_weights(unwrapped, ema):
            pipeline_dir = method.export(unwrapped, run_dir)
    summary = TrainingSummary(
        steps=state["step"],
        train_seconds_total=round(state["elapsed"], 1),
        images_per_second=round(rate, 2),
        precision=precision,
        parameters=n_params,
        processes=world,
        global_batch=config.batch_size * world,
        dataset=dataset.summary(),
        loss_history=state["loss_history"],
        machine=machine_description(accelerator.device),
        checks=state.get("checks", {}),
        differential_privacy=(
            {**private.report(state["step"]), "init_from": config.init_from} if private is not None else None
        ),
    )
    if main:
        summary.write(run_dir)
    accelerator.wait_for_everyone()
    return TrainResult(
        run_dir,
        pipeline_dir,
        state["step"],
        state["elapsed"],
        rate,
        state["loss_history"],
        precision,
        n_params,
        main,
        world,
        summary,
    )
