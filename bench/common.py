"""Shared helpers for benchmark commands: JSON results and a short table."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path

import torch

from meddiff.devices import machine_description

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "description": machine_description(),
        "cuda": torch.cuda.is_available(),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_seconds(loss_history: list, warmup: int, steps: int) -> float:
    """Seconds the `steps` training steps after the first `warmup` took, from a TrainResult's loss history
    ([step, loss, elapsed] rows; the run must log every step). Step 0 is the start: 0 s."""
    elapsed = {0: 0.0, **{step: seconds for step, _, seconds in loss_history}}
    return elapsed[warmup + steps] - elapsed[warmup]


def count_evaluations(unet):
    """A forward pre-hook counting the rows the U-Net evaluates: (list of batch sizes seen, hook handle). Rows
    divided by images is the honest NFE per image: guidance's doubled batch and Heun's two passes count."""
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, inputs: rows.append(int(inputs[0].shape[0])))
    return rows, handle


def write_results(
    name: str, rows: list[dict], columns: list[str], out: str | None = None, extra: dict | None = None
) -> Path:
    """RESULTS/NAME.json (or `out`): the benchmark's name, this machine, the rows and any `extra` keys (summary,
    settings); prints the rows as a table."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **(extra or {})}, indent=2))
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(f"{r.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))
    print(f"results: {path}")
    return path
