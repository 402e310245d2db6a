"""Where a command runs: one rule for every command that loads a model (train reports, generate, fidelity,
evaluate, serve), so that every model and pipeline of a run sits on the same device.

- `run_device()`: cuda:LOCAL_RANK when CUDA is available (one GPU per process under `accelerate launch` /
  `torchrun`), else Apple's mps, else the CPU; an explicit choice (`--device`) wins.
- `launch_rank()`: (rank, world size) set by `accelerate launch` / `torchrun`; (0, 1) in a plain process.
- `misplaced_components(pipe, device)`: the pipeline components (or a module's parameters and buffers) that are not
  on `device`: what tests and debugging check."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import torch

from meddiff.errors import MeddiffError


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: a SLURM or container CPU limit), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def launch_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of a process started by accelerate launch / torchrun; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0) if world > 1 else 0
    return rank, max(world, 1)


def is_main_launch_process() -> bool:
    return launch_rank()[0] == 0


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def run_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device this process works on. `prefer` ('cpu', 'cuda', 'cuda:1', 'mps') overrides the automatic choice;
    a bare 'cuda' means this process's GPU (cuda:LOCAL_RANK)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if prefer is not None and str(prefer) != "auto":
        device = torch.device(prefer) if not isinstance(prefer, torch.device) else prefer
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise MeddiffError(f"--device {prefer} asked for a CUDA GPU, but none is available here; use cpu")
            if device.index is None:
                device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        elif device.type == "mps" and not mps_available():
            raise MeddiffError(f"--device {prefer} asked for Apple's mps, which is not available here; use cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """cuda and cuda:0 (the current GPU) count as the same device."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def misplaced_components(pipe_or_module, device: torch.device | str) -> list[str]:
    """Names of the tensors (component.parameter) of a diffusers pipeline or a module that are not on `device`."""
    if isinstance(pipe_or_module, torch.nn.Module):
        modules = {"": pipe_or_module}
    else:
        modules = {
            name: value for name, value in pipe_or_module.components.items() if isinstance(value, torch.nn.Module)
        }
    wrong = []
    for name, module in modules.items():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        wrong += [f"{name}.{key}" if name else key for key, t in tensors if not same_device(t.device, device)]
    return wrong


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """A CPU with bf16 units (AMX or AVX512-BF16): where bf16 autocast pays (meddiff.precision)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows). A virtual machine may show only a
    brand ("AMD EPYC"), which several generations share: then the CPU family and model numbers are added."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return cpu_model_from_cpuinfo(text) or platform.processor() or platform.machine() or "unknown CPU"


def cpu_model_from_cpuinfo(text: str) -> str:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name", "")
    model_part = re.sub(r"\s*@\s*[\d.]+\s*GHz\s*$", "", name)  # a clock speed does not tell CPU models apart
    if name and not any(c.isdigit() for c in model_part) and fields.get("cpu family") and fields.get("model"):
        name += f" family {fields['cpu family']} model {fields['model']}"
    return name


def machine_description(device: torch.device | str | None = None) -> str:
    """One line naming the hardware a result was measured on, so that timings from different machines can be told
    apart: the GPU model (of `device`: this process's GPU), or for the CPU its model, the kernel level torch
    dispatches to (AVX2, AVX512, ...), whether it has fast bf16 (AMX / AVX512-BF16) and the threads torch uses."""
    dev = torch.device(device) if device is not None else run_device()
    if dev.type == "cuda":  # this process's GPU (training.json's `processes` says how many took part)
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return "Apple GPU (mps)"
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    bf16 = "fast bf16" if cpu_has_fast_bf16() else "no fast bf16"
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({capability} kernels, {bf16}), {threads} thread{'s' if threads != 1 else ''}"
