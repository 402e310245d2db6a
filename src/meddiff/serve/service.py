"""What the web page does, without the web page: check a request against the model and the limits set at launch,
generate with the same code as `meddiff generate`, and pack the images with their manifest into a ZIP.

`ModelService` serves 2D models (images), `VolumeModelService` 3D volume models (one labelled volume a request,
written as NIfTI on the training grid like `meddiff generate --model RUN` writes it); `open_service` picks one.

Nothing a visitor types becomes a file path: every folder and ZIP name is made here (a counter and a random token),
and prompts only ever reach the text encoder."""

from __future__ import annotations

import math
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.conditioning.labels import LabelCodec
from meddiff.errors import MeddiffError
from meddiff.models.factory import SAMPLERS
from meddiff.models.pipeline import encode_condition
from meddiff.models.storage import load_pipeline, model_guidance, resolve_model_dir
from meddiff.models.volume_pipeline import PIPELINE_FILE, VolumePipeline
from meddiff.options import Options, option
from meddiff.sampling.export import SYNTHETIC_NOTE
from meddiff.sampling.generate import SamplingSettings, image_seed
from meddiff.sampling.plan import GenerationPlan
from meddiff.sampling.synthesize import generate_dataset
from meddiff.sampling.volume_export import VolumeExportOptions, export_volumes, nifti_name

MAX_SEED = 2**32 - 1
OTHERS = {"absent": "absent", "unspecified": "unknown"}  # what unchecked findings mean -> LabelCodec.parse's term
NOTICE = "Synthetic images made by a generative model: not real patients, not for diagnosis or any clinical decision."


class RequestError(MeddiffError):
    """A request the page refuses; the message is shown to the visitor."""


@dataclass(frozen=True)
class ServeLimits(Options):
    """Bounds on one request, set when the server starts (flags of `meddiff serve`)."""

    max_images: int = option(8, "images per request", minimum=1)
    max_steps: int = option(50, "denoising steps per request", minimum=1)
    max_prompt_chars: int = option(300, "prompt length in characters", minimum=1)
    max_guidance: float = option(20.0, "upper bound of the guidance scale", above=0)
    queue_size: int = option(
        16, "requests that may wait behind the running one; more are turned away with a message", minimum=1
    )
    keep_results: int = option(32, "finished requests kept on disk for download; older ones are deleted", minimum=1)


@dataclass
class Request:
    """One click of Generate, as the page sends it (values may be None or out of range: they are checked)."""

    prompt: str | None = ""
    findings: list[str] = field(default_factory=list)
    others: str = "absent"  # unchecked findings: "absent" (an image with exactly these) or "unspecified"
    n: float | None = 4
    steps: float | None = 20
    guidance: float | None = None  # None: the model's own scale (ModelService.default_guidance)
    scheduler: str | None = "dpm++"
    seed: float | None = 0
    negative_prompt: str | None = ""


@dataclass
class Result:
    images: np.ndarray  # (N, H, W) in [0, 1]
    captions: list[str]
    zip_path: Path
    seconds: float


@dataclass
class VolumeRequest:
    """One click of Generate on the volume page (values may be None or out of range: they are checked)."""

    labels: list[str] = field(default_factory=list)
    others: str = "absent"  # unchecked labels: "absent" (a volume with exactly these) or "unspecified"
    steps: float | None = 20
    guidance: float | None = None  # None: the model's own scale (VolumeModelService.default_guidance)
    seed: float | None = 0


@dataclass
class VolumeResult:
    volume: np.ndarray  # (C, X, Y, Z) float32 in [-1, 1], as generated (the NIfTI files hold it in [0, 1])
    caption: str
    channel_names: list[str]
    spacing: list[float]  # mm along X, Y, Z
    niftis: list[Path]  # one .nii.gz per channel, in the result folder
    download: Path  # what the page offers: the NIfTI (one channel) or the ZIP (several)
    zip_path: Path  # every NIfTI, manifest.csv and README.txt
    seconds: float


def _whole(value, name: str, low: int, high: int) -> int:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{name} is missing; give a whole number from {low} to {high}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number from {low} to {high}") from None
    if not math.isfinite(number) or number != int(number) or not low <= number <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(number)


def _guidance(value, limit: float) -> float:
    try:
        guidance = float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        guidance = float("nan")
    if not (math.isfinite(guidance) and 0 <= guidance <= limit):
        raise RequestError(f"Guidance scale must be from 0 to {limit:g}, got {value}")
    return guidance


class _Workspace:
    """The limits, the folder of results (named here, never by a visitor), and one generation at a time."""

    model_dir: Path
    pipe: Any  # the loaded pipeline (2D or volume), set by the subclass before this __init__

    def __init__(self, limits: ServeLimits | None, work_dir: str | Path | None):
        self.default_guidance = model_guidance(self.model_dir)  # what the run was trained and reported with
        self.codec = LabelCodec(self.label_names)
        self.limits = limits or ServeLimits()
        self.work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="meddiff-serve-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = 0

    def _guidance(self, value) -> float:
        """A request's guidance scale, checked; none given: the model's own (default_guidance)."""
        return _guidance(self.default_guidance if value is None else value, self.limits.max_guidance)

    @property
    def label_names(self) -> list[str]:
        return list(self.pipe.label_names)

    def _new_folder(self) -> Path:
        """A fresh result folder (call under the lock): a counter and a random token."""
        self._count += 1
        return self.work / f"{self._count:06d}-{secrets.token_hex(4)}"

    def _pack(self, folder: Path, readme: str) -> Path:
        """README.txt into `folder`, then the folder as meddiff-synthetic-NAME.zip beside it."""
        (folder / "README.txt").write_text(readme)
        zip_path = folder.with_name(f"meddiff-synthetic-{folder.name}.zip")
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder).as_posix())
        return zip_path

    def _run_name(self) -> str:
        return self.model_dir.parent.name if self.model_dir.name == "pipeline" else self.model_dir.name

    def model_card(self) -> str | None:
        """The run's README.md (the model card written by `meddiff train`), if there is one."""
        for folder in (self.model_dir.parent, self.model_dir):
            card = folder / "README.md"
            if card.is_file():
                return card.read_text(errors="replace")
        return None

    def _prune(self) -> None:
        """Keep the newest `keep_results` requests on disk (the folder, its ZIP and any other download)."""
        zips = sorted(self.work.glob("meddiff-synthetic-*.zip"))
        for old in zips[: -self.limits.keep_results]:
            shutil.rmtree(self.work / old.stem.removeprefix("meddiff-synthetic-"), ignore_errors=True)
            for path in self.work.glob(f"{old.stem}.*"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class ModelService(_Workspace):
    """A loaded model plus the rules of the page. One generation runs at a time (the page queues the rest)."""

    def __init__(
        self,
        model_dir: str | Path,
        limits: ServeLimits | None = None,
        device: str | torch.device = "cpu",
        work_dir: str | Path | None = None,
        allow_failed_audit: bool = False,
    ):
        from meddiff.evaluation.privacy_audit import failed_audit

        self.model_dir = resolve_model_dir(model_dir)
        reason = failed_audit(self.model_dir)
        if reason and not allow_failed_audit:
            raise MeddiffError(f"{model_dir}: {reason}; it is not served without --allow-failed-audit")
        self.stamp = None  # what every image of a failed-audit model carries
        if reason:
            self.stamp = {"privacy": f"PRIVACY AUDIT FAILED: {reason}; served with --allow-failed-audit"}
        self.pipe = load_pipeline(model_dir, device=device)
        super().__init__(limits, work_dir)

    # what the page shows --------------------------------------------------------------------------------------
    @property
    def takes_prompts(self) -> bool:
        return bool(self.pipe.supports_prompts)

    @property
    def takes_labels(self) -> bool:
        """Findings can be picked: label models take them, text models with label names turn them into prompts."""
        return bool(self.label_names)

    @property
    def needs_prompt(self) -> bool:
        """A text-only model: it needs a prompt, or findings to write one from."""
        return self.takes_prompts and not self.pipe.supports_labels

    def summary(self) -> str:
        """A few lines of markdown about the model: what it takes, its size, where it came from."""
        pipe = self.pipe
        findings = f"findings ({', '.join(self.label_names)})"
        if self.needs_prompt and self.takes_labels:
            findings += ", written into a prompt"
        takes = [t for t, ok in (("free-text prompts", self.takes_prompts), (findings, self.takes_labels)) if ok]
        kind = "latent diffusion (autoencoder + U-Net)" if pipe.is_latent else "pixel diffusion"
        lines = [
            f"**Model** `{self._run_name()}` — {kind}, {pipe.image_size} × {pipe.image_size} px, 1 channel.",
            f"**Conditioning:** {' and '.join(takes) if takes else 'none (unconditional)'}.",
        ]
        return "\n\n".join(lines)

    # checking a request ----------------------------------------------------------------------------------------
    def check(self, request: Request) -> tuple[GenerationPlan, SamplingSettings]:
        """The plan and settings for a valid request; RequestError with a message for the visitor otherwise."""
        lim = self.limits
        n = _whole(request.n, "Number of images", 1, lim.max_images)
        steps = _whole(request.steps, "Steps", 1, lim.max_steps)
        seed = _whole(request.seed, "Seed", 0, MAX_SEED)
        guidance = self._guidance(request.guidance)
        scheduler = (request.scheduler or "").lower()
        if scheduler not in SAMPLERS:
            raise RequestError(f"unknown scheduler {request.scheduler!r}; choose one of {', '.join(SAMPLERS)}")
        prompt = (request.prompt or "").strip()
        negative = (request.negative_prompt or "").strip()
        for text, name in ((prompt, "Prompt"), (negative, "Negative prompt")):
            if len(text) > lim.max_prompt_chars:
                raise RequestError(f"{name} is {len(text)} characters long; the limit is {lim.max_prompt_chars}")
        findings = [str(f).strip() for f in (request.findings or []) if str(f).strip()]
        if (prompt or negative) and not self.takes_prompts:
            raise RequestError("this model is not text-conditioned: pick findings instead of typing a prompt")
        if findings and not self.takes_labels:
            raise RequestError("this model takes no findings" + (": type a prompt" if self.takes_prompts else ""))
        known_names = {name.lower() for name in self.label_names}
        unknown = [f for f in findings if f.lower() not in known_names]
        if unknown:
            raise RequestError(f"unknown finding {unknown[0]!r}; this model knows: {', '.join(self.label_names)}")
        if request.others not in OTHERS:
            raise RequestError(f"unchecked findings must be {' or '.join(OTHERS)}, got {request.others!r}")
        if self.needs_prompt and not prompt and not findings:
            raise RequestError(
                'type a prompt, e.g. "chest x-ray with cardiomegaly"'
                + (", or pick findings" if self.takes_labels else "")
            )
        if self.needs_prompt and prompt and findings:
            raise RequestError("type a prompt or pick findings, not both (this model reads prompts only)")
        k = len(self.label_names)
        import torch

        labels, known = torch.zeros(k), torch.zeros(k, dtype=torch.bool)
        if findings:
            labels, known = self.codec.parse(",".join(findings), OTHERS[request.others])
        elif self.takes_labels and request.others == "absent" and not prompt:
            known[:] = True  # nothing checked, others absent: an image with none of the findings
        plan = GenerationPlan(labels.expand(n, k).clone(), known.expand(n, k).clone(), [prompt or None] * n, "web page")
        settings = SamplingSettings(
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            seed=seed,
            batch_size=lim.max_images,
            negative_prompt=negative or None,
        )
        return plan, settings

    # generating ------------------------------------------------------------------------------------------------
    def generate(self, request: Request, on_step=None) -> Result:
        """Check, generate and pack one request. on_step(done, total) reports denoising progress."""
        plan, settings = self.check(request)
        with self._lock:
            folder = self._new_folder()
            t0 = time.perf_counter()
            generate_dataset(
                self.pipe, self.model_dir, plan, settings, folder, "png", progress=False, on_step=on_step,
                stamp=self.stamp,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
        images = np.stack([_read_png(folder / "images" / f"{i:07d}.png") for i in range(len(plan))])
        zip_path = self._pack(
            folder,
            f"{SYNTHETIC_NOTE}.\n{NOTICE}\nmanifest.csv lists every image with its findings or prompt, seed and "
            "settings (CheXpert columns). generation.json records the model and settings.\n",
        )
        names = self.label_names
        captions = [f"#{i} · {plan.key(i, names)}" for i in range(len(plan))]
        self._prune()
        return Result(images, captions, zip_path, seconds)


class VolumeModelService(_Workspace):
    """A loaded 3D volume model (VolumePipeline) plus the rules of the page: one labelled volume a request, drawn
    and written as `meddiff generate --model RUN --n 1` draws and writes it (same seed, same NIfTI)."""

    def __init__(
        self,
        model_dir: str | Path,
        limits: ServeLimits | None = None,
        device: str | torch.device = "cpu",
        work_dir: str | Path | None = None,
    ):
        folder = Path(model_dir).expanduser()
        if not folder.exists():
            raise MeddiffError(
                f"model directory {folder} does not exist; pass a run directory written by `meddiff train`"
            )
        self.model_dir = folder / "pipeline" if (folder / "pipeline" / PIPELINE_FILE).is_file() else folder
        self.pipe = VolumePipeline.from_pretrained(self.model_dir, device=device)
        super().__init__(limits, work_dir)

    @property
    def grid(self):
        return self.pipe.grid

    def summary(self) -> str:
        """A few lines of markdown about the model: the grid it generates on, its channels and labels."""
        grid = self.grid
        labels = f"labels ({', '.join(self.label_names)})" if self.label_names else "none (unconditional)"
        lines = [
            f"**Model** `{self._run_name()}` — 3D latent diffusion (autoencoder + U-Net), "
            f"{' × '.join(map(str, grid.shape))} voxels at {' × '.join(f'{v:g}' for v in grid.spacing)} mm, "
            f"channels: {', '.join(grid.channel_names)}.",
            f"**Conditioning:** {labels}.",
        ]
        if self.pipe.trained_on:
            lines.append(f"**Trained on:** `{self.pipe.trained_on}`.")
        return "\n\n".join(lines)

    def check(self, request: VolumeRequest) -> tuple[torch.Tensor, torch.Tensor, int, float, int]:
        """(labels (1, K), known (1, K), steps, guidance, seed) for a valid request; RequestError otherwise."""
        lim = self.limits
        steps = _whole(request.steps, "Steps", 1, lim.max_steps)
        seed = _whole(request.seed, "Seed", 0, MAX_SEED)
        guidance = self._guidance(request.guidance)
        checked = [str(name).strip() for name in (request.labels or []) if str(name).strip()]
        if checked and not self.label_names:
            raise RequestError("this model is unconditional: it takes no labels")
        known_names = {name.lower() for name in self.label_names}
        unknown = [name for name in checked if name.lower() not in known_names]
        if unknown:
            raise RequestError(f"unknown label {unknown[0]!r}; this model knows: {', '.join(self.label_names)}")
        if request.others not in OTHERS:
            raise RequestError(f"unchecked labels must be {' or '.join(OTHERS)}, got {request.others!r}")
        k = len(self.label_names)
        labels, known = torch.zeros(k), torch.zeros(k, dtype=torch.bool)
        if checked:
            labels, known = self.codec.parse(",".join(checked), OTHERS[request.others])
        elif request.others == "absent":
            known[:] = True  # nothing checked, others absent: a volume with none of the labels
        return labels.reshape(1, k), known.reshape(1, k), steps, guidance, seed

    def generate(self, request: VolumeRequest, on_step=None) -> VolumeResult:
        """Check, generate and write one volume (NIfTI per channel, manifest.csv, README.txt, a ZIP of them).
        on_step(done, total) reports denoising progress."""
        labels, known, steps, guidance, seed = self.check(request)
        pipe, grid = self.pipe, self.grid
        names, channels = self.label_names, list(grid.channel_names)
        volume_seed = image_seed(seed, 0)  # volume 0 of `meddiff generate --seed SEED`

        def report(i: int, _t: int, _latents: torch.Tensor) -> None:
            if on_step is not None:
                on_step(i + 1, len(pipe.scheduler.timesteps))

        with self._lock:
            folder = self._new_folder()
            t0 = time.perf_counter()
            condition = encode_condition(labels, known) if names else None
            volume = pipe(
                condition,
                guidance_scale=guidance,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(volume_seed),
                num_volumes=1,
                callback_on_step=report,
            )
            export_volumes(
                volume,
                folder,
                np.asarray(grid.affine, np.float64),
                channels,
                labels,
                known,
                names,
                [volume_seed],
                VolumeExportOptions(format="nifti"),
                run={"guidance": guidance, "steps": steps, "model": str(self.model_dir)},
            )
            seconds = time.perf_counter() - t0
        zip_path = self._pack(
            folder,
            f"{SYNTHETIC_NOTE}.\n{NOTICE}\nvolumes/ holds the NIfTI file(s) on the model's training grid (affine in "
            "the header, intensities in [0, 1]); manifest.csv lists the volume with its labels, seed and settings.\n",
        )
        niftis = [folder / nifti_name(0, c if len(channels) > 1 else None) for c in channels]
        download = zip_path
        if len(niftis) == 1:
            download = zip_path.with_name(f"{zip_path.stem}.nii.gz")
            shutil.copyfile(niftis[0], download)
        plan = GenerationPlan(labels, known, [None], "web page")
        self._prune()
        return VolumeResult(
            volume[0].float().cpu().numpy(),
            plan.key(0, names),
            channels,
            list(grid.spacing),
            niftis,
            download,
            zip_path,
            seconds,
        )


def open_service(
    model_dir: str | Path,
    limits: ServeLimits | None = None,
    device: str | torch.device = "cpu",
    volume: bool = False,
    work_dir: str | Path | None = None,
    allow_failed_audit: bool = False,
) -> ModelService | VolumeModelService:
    """The service of a 2D model, or with volume=True of a 3D volume model (the CLI decides which, as for
    `meddiff generate`). A 2D model whose privacy audit failed is refused unless `allow_failed_audit` (then stamped
    into every image)."""
    if volume:
        return VolumeModelService(model_dir, limits, device=device, work_dir=work_dir)
    return ModelService(model_dir, limits, device=device, work_dir=work_dir, allow_failed_audit=allow_failed_audit)


def _read_png(path: Path) -> np.ndarray:
    from meddiff.data.io import read_image

    return read_image(path)
