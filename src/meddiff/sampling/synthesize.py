"""Generating a labelled synthetic dataset: resumable, shardable, reproducible.

- Image i uses seed image_seed(base seed, i): the same image whatever the batch size or shard.
- Files are written atomically; a rerun after a kill skips finished images and ends with exactly the set an
  uninterrupted run would have written. `generation.json` pins model, settings and plan: an output folder from
  another model or other settings is refused instead of being mixed.
- Shards (`--shard K/N`, or one per process under `accelerate launch` / `torchrun`) each take every N-th image and write
  their own manifest part; whoever sees all images present writes the merged manifest.csv.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from meddiff import __version__
from meddiff.conditioning.labels import LabelCodec
from meddiff.data.chexpert_format import CHEXPERT_OBSERVATIONS
from meddiff.errors import MeddiffError
from meddiff.models.storage import ADAPTER_FILE, resolve_model_dir
from meddiff.sampling.animate import DenoisingRecorder
from meddiff.sampling.export import FORMATS, image_name, write_image, write_manifest
from meddiff.sampling.generate import SamplingSettings, image_seed, prompts_for_labels, sample
from meddiff.sampling.plan import GenerationPlan

STATE_FILE = "generation.json"


def model_fingerprint(model_dir: str | Path) -> str:
    """Identifies the weights: U-Net config plus size and first/last MiB of every weight file."""
    folder = resolve_model_dir(model_dir)
    if (folder / ADAPTER_FILE).is_file():  # LoRA / textual inversion: the note (naming the base) and the weights
        h = hashlib.sha1((folder / ADAPTER_FILE).read_bytes())
        parts = [folder]
    else:
        h = hashlib.sha1((folder / "unet" / "config.json").read_bytes())
        parts = [folder / name for name in ("unet", "vae", "text_encoder") if (folder / name).is_dir()]
    files = [f for part in parts for f in sorted(part.glob("*.safetensors")) + sorted(part.glob("*.bin"))]
    for weights in files:
        size = weights.stat().st_size
        h.update(str(size).encode())
        with open(weights, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class GenerationResult:
    written: int
    skipped: int
    seconds: float
    manifest: Path | None
    per_condition: dict[str, int]

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MeddiffError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise MeddiffError(f"--shard {text}: need 0 <= K < N")
    return k, n


def _check_state(out_dir: Path, state: dict) -> None:
    path = out_dir / STATE_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("model_fingerprint") != state["model_fingerprint"]:
            raise MeddiffError(
                f"{out_dir} holds images from a different model ({old.get('model')}); use a new --out for this model"
            )
        changed = [k for k in ("settings", "plan_fingerprint", "format", "n") if old.get(k) != state.get(k)]
        if changed:
            raise MeddiffError(
                f"{out_dir} holds a generation with other {', '.join(changed)}; "
                "rerun with the same options to resume, or use a new --out"
            )
    elif out_dir.is_dir() and any(not p.name.startswith(f"{STATE_FILE}.") for p in out_dir.iterdir()):
        # (another shard's half-written generation.json.<pid>.tmp is not foreign content: shards start together)
        raise MeddiffError(f"{out_dir} is not empty and holds no meddiff generation; choose an empty --out")


def manifest_row(
    plan: GenerationPlan, i: int, names: list[str], fmt: str, settings: SamplingSettings, model_id: str
) -> dict[str, object]:
    row: dict[str, object] = {
        "Path": image_name(i, fmt),
        "Sex": "",
        "Age": "",
        "Frontal/Lateral": "Frontal",
        "AP/PA": "",
    }
    for k, name in enumerate(names):
        row[name] = (f"{float(plan.labels[i, k] > 0.5):.1f}") if plan.known[i, k] else ""
    for name in CHEXPERT_OBSERVATIONS:
        row.setdefault(name, "")
    row.update(
        {
            "prompt": plan.prompts[i] or "",
            "seed": image_seed(settings.seed, i),
            "guidance": settings.guidance,
            "steps": settings.steps,
            "scheduler": settings.scheduler,
            "model": model_id,
        }
    )
    return row


def _step_callback(recorder, on_step, done_before: int, total: int):
    """One sample() callback that feeds the animation recorder and/or reports step progress."""
    if on_step is None:
        return recorder

    def callback(offset, step, timestep, latents):
        if recorder is not None:
            recorder(offset, step, timestep, latents)
        on_step(min(done_before + step + 1, total), total)  # PNDM may take one extra step

    return callback


def generate_dataset(
    pipe,
    model_dir: str | Path,
    plan: GenerationPlan,
    settings: SamplingSettings,
    out_dir: Path,
    fmt: str = "png",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    animate: bool = False,
    on_step=None,
) -> GenerationResult:
    """animate: also write animations/NNNNNN.gif, the denoising of every image made in this run.
    on_step(done, total): called after every denoising step of this run (a progress bar of steps, e.g. a web page's)."""
    if fmt not in FORMATS:
        raise MeddiffError(f"--format must be one of {', '.join(FORMATS)}")
    if any(plan.prompts) and not pipe.supports_prompts:
        raise MeddiffError(
            "this model is not text-conditioned and takes no prompts; use --labels, --unconditional "
            "or --conditions with label columns"
        )
    out_dir = Path(out_dir)
    names = list(pipe.label_names)
    if pipe.supports_prompts:  # a text model given labels gets (and records) their prompts
        derived = prompts_for_labels(plan.labels, plan.known, names)
        plan = GenerationPlan(
            plan.labels, plan.known, [p or d or None for p, d in zip(plan.prompts, derived)], plan.source
        )
    fingerprint = model_fingerprint(model_dir)
    state = {
        "meddiff": __version__,
        "model": str(model_dir),
        "model_fingerprint": fingerprint,
        "settings": {k: v for k, v in asdict(settings).items() if k != "batch_size"},
        "plan_fingerprint": plan.fingerprint(),
        "plan_source": plan.source,
        "format": fmt,
        "n": len(plan),
        "label_names": names,
    }
    k, n_shards = shard
    _check_state(out_dir, state)  # every shard checks; the state is written before any image
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / STATE_FILE).is_file():
        tmp = out_dir / f"{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(out_dir / STATE_FILE)
    mine = [i for i in range(len(plan)) if i % n_shards == k]
    todo = [i for i in mine if not (out_dir / image_name(i, fmt)).is_file()]
    codec = LabelCodec(names)
    uid_root = f"{fingerprint}:{plan.fingerprint()}:{settings.seed}"
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="generate",
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
    )
    batches = range(0, len(todo), settings.batch_size)
    for b, start in enumerate(batches):
        batch = todo[start : start + settings.batch_size]
        idx = torch.tensor(batch)
        cond = codec.encode(plan.labels[idx], plan.known[idx])
        prompts = [plan.prompts[i] for i in batch]
        recorder = DenoisingRecorder(pipe) if animate else None
        callback = _step_callback(recorder, on_step, b * settings.steps, len(batches) * settings.steps)
        images = sample(
            pipe,
            cond,
            settings,
            indices=batch,
            progress=False,
            prompts=prompts if any(prompts) else None,
            callback=callback,
        )
        if recorder is not None:
            for j, i in enumerate(batch):
                recorder.save(j, out_dir / "animations" / f"{i:07d}.gif")
        for i, image in zip(batch, images):
            text = {"seed": str(image_seed(settings.seed, i)), "model": str(model_dir), "condition": plan.key(i, names)}
            write_image(out_dir, i, image, fmt, uid_root, text)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    model_id = str(model_dir)
    rows = [manifest_row(plan, i, names, fmt, settings, model_id) for i in mine]
    if n_shards > 1:
        write_manifest(out_dir / f"manifest.part-{k}-of-{n_shards}.csv", rows, names)
    manifest = None
    if all((out_dir / image_name(i, fmt)).is_file() for i in range(len(plan))):
        all_rows = (
            rows if n_shards == 1 else [manifest_row(plan, i, names, fmt, settings, model_id) for i in range(len(plan))]
        )
        manifest = write_manifest(out_dir / "manifest.csv", all_rows, names)
    per_condition = dict(Counter(plan.key(i, names) for i in mine))
    return GenerationResult(len(todo), len(mine) - len(todo), seconds, manifest, per_condition)
