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
    redrawn: int = 0  # privacy gate: images drawn again because the first draw was flagged
    rejected: int = 0  # privacy gate: images still flagged after every retry (not written)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


GATE_COLUMNS = ("privacy_score", "privacy_retries")


def retry_seed(base_seed: int, retry: int) -> int:
    """The base seed of a privacy-gate redraw: image i's retry r uses image_seed(retry_seed(seed, r), i), a function
    of (seed, i, r) only, so redraws do not depend on batch size, shard or an interruption."""
    import numpy as np

    if retry == 0:
        return base_seed
    return int(np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, retry, 7919]).generate_state(1)[0])


class GateLog:
    """Per image: its fused privacy score, retries and whether it was rejected (one JSON line each, appended as
    images finish, per shard), so a resumed run knows what the gate decided."""

    def __init__(self, out_dir: Path, shard: tuple[int, int]):
        k, n = shard
        self.path = out_dir / ("privacy_gate.jsonl" if n == 1 else f"privacy_gate.part-{k}-of-{n}.jsonl")
        self.entries: dict[int, dict] = {}
        for path in sorted(out_dir.glob("privacy_gate*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[int(entry["i"])] = entry

    def add(self, i: int, score: float, retries: int, rejected: bool) -> None:
        entry = {"i": i, "score": round(score, 4), "retries": retries, "rejected": rejected}
        self.entries[i] = entry
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def rejected(self, i: int) -> bool:
        return bool(self.entries.get(i, {}).get("rejected"))


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
        keys = ("settings", "plan_fingerprint", "format", "n", "privacy_gate")
        changed = [k for k in keys if old.get(k) != state.get(k)]
        if changed:
            raise MeddiffError(
                f"{out_dir} holds a generation with other {', '.join(changed)}; "
                "rerun with the same options to resume, or use a new --out"
            )
    elif out_dir.is_dir() and any(not p.name.startswith(f"{STATE_FILE}.") for p in out_dir.iterdir()):
        # (another shard's half-written generation.json.<pid>.tmp is not foreign content: shards start together)
        raise MeddiffError(f"{out_dir} is not empty and holds no meddiff generation; choose an empty --out")


def manifest_row(
    plan: GenerationPlan,
    i: int,
    names: list[str],
    fmt: str,
    settings: SamplingSettings,
    model_id: str,
    gate_entry: dict | None = None,
) -> dict[str, object]:
    retries = int(gate_entry["retries"]) if gate_entry else 0
    row: dict[str, object] = {
        "Path": image_name(i, fmt),
        "Sex": "",
        "Age": "",
        "Frontal/Lateral": "Frontal",
        "AP/PA": "",
    }
    for k, name in enumerate(names):
        row[name] = (f"{float(plan.labels[i, k] > 0.5):.1f}") if plan.known[i, k] else ""
        present = bool(plan.known[i, k] and plan.labels[i, k] > 0.5)
        if name == "Female" and plan.known[i, k]:  # demographic conditions fill CheXpert's own columns too
            row["Sex"] = "Female" if present else "Male"
        elif name in ("View PA", "View AP") and present:
            row["AP/PA"] = name.removeprefix("View ")
        elif name == "View Lateral" and present:
            row["Frontal/Lateral"] = "Lateral"
    for name in CHEXPERT_OBSERVATIONS:
        row.setdefault(name, "")
    row.update(
        {
            "prompt": plan.prompts[i] or "",
            "seed": image_seed(retry_seed(settings.seed, retries), i),
            "guidance": settings.guidance,
            "steps": settings.steps,
            "scheduler": settings.scheduler,
            "model": model_id,
        }
    )
    if gate_entry:
        row.update({"privacy_score": gate_entry["score"], "privacy_retries": retries})
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
    gate=None,
    stamp: dict[str, str] | None = None,
) -> GenerationResult:
    """animate: also write animations/NNNNNN.gif, the denoising of every image made in this run.
    on_step(done, total): called after every denoising step of this run (a progress bar of steps, e.g. a web page's).
    gate: a privacy gate (evaluation.privacy_gate.ExportGate: `check(images) -> (flagged, score)`, `max_retries`,
    `fingerprint`): flagged images are drawn again with retry seeds and never written; one still flagged after
    `max_retries` is rejected and left out of the manifest.
    stamp: extra metadata written into every file (PNG text / DICOM ImageComments) and generation.json (e.g. the
    override of a failed privacy audit)."""
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
        "privacy_gate": None if gate is None else {"calibration": gate.fingerprint, "max_retries": gate.max_retries},
    }
    if stamp:
        state["stamp"] = dict(stamp)
    k, n_shards = shard
    _check_state(out_dir, state)  # every shard checks; the state is written before any image
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / STATE_FILE).is_file():
        tmp = out_dir / f"{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(out_dir / STATE_FILE)
    mine = [i for i in range(len(plan)) if i % n_shards == k]
    log = GateLog(out_dir, shard) if gate is not None else None
    todo = [i for i in mine if not (out_dir / image_name(i, fmt)).is_file() and not (log and log.rejected(i))]
    redrawn = rejected = 0
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
        keep = [True] * len(batch)
        if gate is not None and log is not None:
            images, keep, counts = _gate_batch(gate, log, pipe, cond, prompts, batch, images, settings)
            redrawn, rejected = redrawn + counts[0], rejected + counts[1]
        for i, image, kept in zip(batch, images, keep):
            if not kept:
                continue
            retries = int(log.entries[i]["retries"]) if log is not None else 0
            seed = image_seed(retry_seed(settings.seed, retries), i)
            text = {"seed": str(seed), "model": str(model_dir), "condition": plan.key(i, names), **(stamp or {})}
            write_image(out_dir, i, image, fmt, uid_root, text)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - t0
    model_id = str(model_dir)
    if log is not None:
        log = GateLog(out_dir, shard)  # every shard's decisions, for the merged manifest

    def rows_for(indices) -> list[dict[str, object]]:
        entries = log.entries if log is not None else {}
        return [
            manifest_row(plan, i, names, fmt, settings, model_id, entries.get(i))
            for i in indices
            if not (log is not None and log.rejected(i))
        ]

    extra = GATE_COLUMNS if gate is not None else ()
    rows = rows_for(mine)
    if n_shards > 1:
        write_manifest(out_dir / f"manifest.part-{k}-of-{n_shards}.csv", rows, names, extra)
    manifest = None
    if all((out_dir / image_name(i, fmt)).is_file() or (log and log.rejected(i)) for i in range(len(plan))):
        all_rows = rows if n_shards == 1 else rows_for(range(len(plan)))
        manifest = write_manifest(out_dir / "manifest.csv", all_rows, names, extra)
    per_condition = dict(Counter(plan.key(i, names) for i in mine))
    written = len(todo) - rejected
    return GenerationResult(written, len(mine) - len(todo), seconds, manifest, per_condition, redrawn, rejected)


def _gate_batch(gate, log: GateLog, pipe, cond, prompts, batch: list[int], images, settings: SamplingSettings):
    """Check a batch with the privacy gate; redraw flagged images (retry seeds) up to gate.max_retries times.
    Returns (images, keep flags, (redrawn, rejected)) and logs every image's decision."""
    import dataclasses

    import numpy as np

    images = np.array(images, copy=True)
    flagged, score = gate.check(images)
    retries = np.zeros(len(batch), dtype=int)
    redrawn = int(flagged.sum())
    for retry in range(1, gate.max_retries + 1):
        todo = np.flatnonzero(flagged)
        if not len(todo):
            break
        again = sample(
            pipe,
            cond[torch.from_numpy(todo)],
            dataclasses.replace(settings, seed=retry_seed(settings.seed, retry)),
            indices=[batch[j] for j in todo],
            progress=False,
            prompts=[prompts[j] for j in todo] if any(prompts) else None,
        )
        new_flags, new_score = gate.check(again)
        images[todo], score[todo], retries[todo] = again, new_score, retry
        flagged[todo] = new_flags
    for j, i in enumerate(batch):
        log.add(i, float(score[j]), int(retries[j]), bool(flagged[j]))
    return images, (~flagged).tolist(), (redrawn, int(flagged.sum()))
