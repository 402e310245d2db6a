"""Run under `torchrun --nproc-per-node N` by test_distributed.py: trains tiny models with several training
methods in one process group and writes, per process, what it saw (batch indices per step) and a hash of its
weights after the last step, so the test can check that processes stay in sync and split each global batch.

Usage: python -m torch.distributed.run --nproc-per-node 2 ddp_probe.py OUT_DIR TINY_SD_DIR"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from meddiff.data.spec import load_dataset
from meddiff.models.autoencoder import AutoencoderConfig
from meddiff.models.factory import ModelConfig
from meddiff.training.config import FinetuneConfig, TrainConfig
from meddiff.training.loop import train
from meddiff.training.methods import METHODS
from meddiff.training.methods.base import register_method


def weights_hash(*modules) -> str:
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, p in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def probe(base: str):
    """A subclass of method `base` that records what each process trains on and its final weights."""
    parent = METHODS[base]

    class Probe(parent):
        name = f"probe-{base}"

        def after_step(self, model, batch, generator, step):
            super().after_step(model, batch, generator, step)
            seen = getattr(self, "seen", [])
            seen.append(batch["index"].tolist())
            self.seen = seen
            if step + 1 == self.config.max_steps:
                import os

                rank = int(os.environ.get("RANK", 0))
                out = Path(self.config.out) / f"probe-rank{rank}.json"
                out.write_text(
                    json.dumps(
                        {"indices": self.seen, "weights": weights_hash(model, getattr(self, "discriminator", None))}
                    )
                )

    return register_method(Probe)


def main(out: Path, tiny_sd: str) -> None:
    data32 = load_dataset("phantom:?n=24&seed=5", 32)
    common = dict(data="phantom:?n=24&seed=5", batch_size=4, lr_warmup_steps=1, precision="fp32")
    small = ModelConfig(block_out_channels=[16, 32], layers_per_block=1)
    runs = {
        "pixel": TrainConfig(
            method=probe("pixel").name, out=str(out / "pixel"), max_steps=4, checkpoint_every=2, model=small, **common
        ),
        "autoencoder": TrainConfig(
            method=probe("autoencoder").name,
            out=str(out / "autoencoder"),
            max_steps=3,
            checkpoint_every=0,
            learning_rate=1e-3,
            **common,
            autoencoder=AutoencoderConfig(
                kind="vq",
                downsample=2,
                channels=[16, 32],
                norm_num_groups=8,
                codebook_size=32,
                dead_code_steps=1,
                adversarial_weight=0.1,
                adversarial_start=0,
            ),
        ),
    }
    for method in ("unet+text", "lora"):
        runs[method] = TrainConfig(
            method=probe("finetune").name,
            out=str(out / method.replace("+", "_")),
            max_steps=3,
            checkpoint_every=0,
            resolution=32,
            learning_rate=1e-3,
            ema=False,
            **{**common, "data": "phantom:?n=8&seed=5"},
            finetune=FinetuneConfig(
                pretrained=tiny_sd, method=method, validation_images=1, validation_prompts=["chest x-ray"]
            ),
        )
    for key, config in runs.items():
        data = data32 if config.data == common["data"] else load_dataset(config.data, 32)
        result = train(config, data, progress=False)
        if result.is_main_process:
            print(
                f"{key}: exported {result.pipeline_dir.name} after {result.steps} steps on {result.processes} processes"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2])
