"""Checkpoints: accelerate state (model, optimizer, LR schedule, RNG) + EMA weights (safetensors) + loop
state (step, elapsed time, loss history) in RUN/checkpoints/step-NNNNNNN, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from meddiff.errors import MeddiffError

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if which == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise MeddiffError(
                f"--resume latest: no checkpoint in {Path(run_dir) / CHECKPOINTS}; "
                "start without --resume, or point --out at the run to continue"
            )
        return found[-1]
    path = Path(which)
    if not (path / "state.json").is_file():
        raise MeddiffError(f"--resume {which}: not a meddiff checkpoint folder (no state.json); use --resume latest")
    return path


def save_checkpoint(accelerator, ema: EMAModel | None, state: dict, run_dir: Path, keep: int) -> Path:
    """Every process calls this (accelerate writes the weights once and each process's RNG state); the main
    process writes the EMA and loop state and publishes the folder."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".tmp-step-{state['step']:07d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if main:
        if ema is not None:
            save_file(
                {f"shadow.{i:04d}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)},
                str(tmp / "ema.safetensors"),
            )
            ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            (tmp / "ema.json").write_text(json.dumps(ema_meta))
        (tmp / "state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, ema: EMAModel | None, path: Path) -> dict:
    saved = len(list(Path(path).glob("model*.safetensors"))) + len(list(Path(path).glob("pytorch_model*.bin")))
    prepared = len(getattr(accelerator, "_models", []))
    if saved and prepared and saved != prepared:
        raise MeddiffError(
            f"checkpoint {path} holds {saved} network(s), this run prepares {prepared}; resume with the settings it "
            "was saved with (e.g. --distill.target-decay, --distill.adversarial-weight, "
            "--distill.distribution-weight, --autoencoder.adversarial-weight)"
        )
    try:
        accelerator.load_state(str(path))
    except RuntimeError as exc:  # a network built differently from the one saved (missing or unexpected weights)
        if "state_dict" not in str(exc) and "size mismatch" not in str(exc):
            raise
        first = next((line.strip() for line in str(exc).splitlines() if "key" in line.lower()), str(exc)[:200])
        raise MeddiffError(
            f"checkpoint {path} does not fit the network this run builds ({first[:160]}); resume with the settings "
            "it was saved with"
        ) from None
    if ema is None:
        return json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "ema.safetensors"))
    shadow = [tensors[k] for k in sorted(tensors)]
    if len(shadow) != len(ema.shadow_params):
        raise MeddiffError(
            f"checkpoint {path} does not match this model (EMA holds {len(shadow)} tensors, "
            f"model {len(ema.shadow_params)}); was the config changed?"
        )
    meta = json.loads((path / "ema.json").read_text())
    ema.load_state_dict({**meta, "shadow_params": shadow})
    return json.loads((path / "state.json").read_text())
