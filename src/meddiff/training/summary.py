"""What a training run reports: `TrainingSummary` (the loop's training.json), and the summaries the autoencoder
and fine-tuning commands build from it (their metrics.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meddiff.results import JsonResult, json_field

TRAINING_JSON = "training.json"


@dataclass
class TrainingSummary(JsonResult):
    """RUN/training.json, written by the main process when the loop ends."""

    steps: int
    train_seconds_total: float
    images_per_second: float
    precision: str
    parameters: int  # trainable
    processes: int
    global_batch: int
    dataset: str
    loss_history: list[list[float]] = json_field(default_factory=list)  # [step, loss, elapsed seconds]
    machine: str = ""  # meddiff.devices.machine_description(): what the speed was measured on
    checks: dict[str, list[dict]] = json_field(default_factory=dict)  # per training check, its results in order
    # DP-SGD runs: epsilon spent, delta, unit, noise, clip, sample rate (meddiff.training.differential_privacy)
    differential_privacy: dict | None = None

    def write(self, run_dir: Path) -> Path:
        return self.write_json(Path(run_dir) / TRAINING_JSON, indent=None)

    @classmethod
    def read(cls, run_dir: Path) -> TrainingSummary:
        return cls.read_json(Path(run_dir) / TRAINING_JSON)


@dataclass
class AutoencoderTraining(JsonResult):
    """The "training" part of a `meddiff train-autoencoder` run's metrics.json."""

    dataset: str
    steps: int
    train_minutes: float
    images_per_second: float
    precision: str
    parameters: int
    config: dict[str, Any]  # the autoencoder section of the run's config
    loss_history: list[list[float]] = json_field(default_factory=list)


@dataclass
class FinetuneSummary(JsonResult):
    """metrics.json of a `meddiff finetune` run."""

    method: str
    pretrained: str
    dataset: str
    steps: int
    train_minutes: float
    images_per_second: float
    precision: str
    trainable_parameters: int
    export: str  # the exported pipeline, LoRA weights or learned embeddings
