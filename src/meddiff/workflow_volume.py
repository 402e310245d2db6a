"""3D workflows used by the CLI and `meddiff demo --3d`: train a volume autoencoder or a volume latent diffusion
model, then measure it and write RUN/metrics.json, RUN/report.html and the model card.

Feature nets are trained on the real training volumes (meddiff.evaluation.volume_classifier): slice FID/KID use a
2D classifier trained on real slices of the three planes, the 3D FID/KID and classifier label fidelity a small 3D
classifier. Data without a binary label falls back to `RandomConvFeatures` for slices (fixed, seeded random
weights) and has no 3D classifier. Each FID has a real-vs-real reference (training volumes against held-out real
ones) on the same features; these FIDs compare runs of this workflow, not Inception FIDs of other papers."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim

from meddiff.data.spec import DatasetSpec, load_dataset, parse_spec
from meddiff.data.volume_dataset import VolumeDataset
from meddiff.errors import MeddiffError
from meddiff.evaluation.diversity import MS_SSIM_MIN_SIZE
from meddiff.evaluation.report import figure, html_page, html_table, loss_curve_png
from meddiff.evaluation.volume_classifier import (
    VolumeClassifierScores,
    binary_columns,
    slice_feature_net,
    volume_classifier_scores,
)
from meddiff.evaluation.volume_metrics import (
    slice_consistency,
    slice_distances,
    volume_diversity,
    volume_memorization,
)
from meddiff.evaluation.volume_views import real_vs_synthetic_png, slice_slider_html, sweep_gif
from meddiff.models.card import CardContent, CardSection, write_card
from meddiff.models.pipeline import encode_condition
from meddiff.models.volume_autoencoder import VolumeAutoencoder
from meddiff.models.volume_pipeline import VolumePipeline
from meddiff.results import JsonResult, json_field
from meddiff.sampling.generate import image_seed
from meddiff.sampling.volume_export import export_volumes
from meddiff.training.config import TrainConfig
from meddiff.training.loop import train

logger = logging.getLogger(__name__)
VOLUME_KINDS = ("volumes", "phantom3d")
# batch sizes for volume runs when neither the recipe nor a flag sets one (the 2D default of 32 does not fit)
VOLUME_BATCH_SIZES = {"volume-autoencoder": 2, "volume-latent": 8}
# phantom labels: tumour present; in the left hemisphere; core of at least phantom3d.LARGE_TUMOUR_ML
TUMOUR_LABEL, SIDE_LABEL, SIZE_LABEL = "Tumour", "Left", "Large"


def is_volume_data(data: str) -> bool:
    """Whether a dataset spec names a volume kind (volumes:, phantom3d:)."""
    try:
        return bool(data) and parse_spec(data).kind in VOLUME_KINDS
    except MeddiffError:
        return False


def volume_edge(config: TrainConfig, spec: DatasetSpec) -> int:
    """Voxels along each axis: a phantom3d spec's own size= (unless shape= is given), else config.volume.size."""
    if spec.kind == "phantom3d" and "size" in spec.options and "shape" not in spec.options:
        try:
            return int(spec.options["size"])
        except ValueError:
            raise MeddiffError(f"{spec}: size must be an integer") from None
    return int(config.volume.size)


def _load(config: TrainConfig, method: str):
    """(spec, training volumes, the config for `method` on their grid)."""
    spec = parse_spec(config.data)
    if spec.kind not in VOLUME_KINDS:
        raise MeddiffError(f"{config.data} is not volume data; use a {' or '.join(VOLUME_KINDS)}: spec")
    edge = volume_edge(config, spec)
    dataset = load_dataset(spec, edge)
    logger.info("data: %s", dataset.summary())
    precision = config.precision
    if precision == "auto" and not torch.accelerator.is_available():
        precision = "fp32"  # measured: bf16 autocast makes 3D convolutions ~20x slower on a CPU without bf16 units
    return spec, dataset, dataclasses.replace(config, method=method, resolution=edge, precision=precision)


def _model_range(images) -> torch.Tensor:
    return torch.as_tensor(np.asarray(images, dtype=np.float32))


# ----------------------------------------------------------------------------------------------- autoencoder


@dataclasses.dataclass(kw_only=True)
class VolumeReconstruction(JsonResult):
    """Held-out round trips (posterior mean), voxels in [0, 1]."""

    volumes: int
    psnr: float
    ssim: float  # mean 2D SSIM of the axial slices
    ssim_3d: float
    ms_ssim_3d: float | None  # None where the volumes are too small for five scales


@dataclasses.dataclass(kw_only=True)
class VolumeAutoencoderReport(JsonResult):
    dataset: str
    heldout: str
    steps: int
    train_minutes: float
    seconds_per_step: float
    parameters: int
    scaling_factor: float
    latent_shape: list[int]
    reconstruction: VolumeReconstruction
    # phantoms: the tumour measurement on held-out round trips, the ceiling of a latent model's label fidelity
    tumour_round_trip: TumourFidelity | None = None
    timings: dict[str, float]
    loss_history: list[list[float]] = json_field(default_factory=list, saved=False)


@torch.no_grad()
def round_trip(autoencoder: VolumeAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Decoded posterior means of volumes (B, C, X, Y, Z) in [-1, 1], on the autoencoder's device."""
    x = x.to(autoencoder.device)
    return autoencoder.decode_latents(autoencoder.to_model_latents(autoencoder.encode(x).latent_dist.mean))


@torch.no_grad()
def reconstruction_metrics(
    autoencoder: VolumeAutoencoder, volumes, batch_size: int = 2, keep: list[torch.Tensor] | None = None
) -> VolumeReconstruction:
    """PSNR, slice SSIM, 3D SSIM (and 3D MS-SSIM where the size allows) of autoencoder round trips (appended to
    `keep` as CPU tensors in [-1, 1] when given)."""
    x_all = _model_range(volumes)
    psnr, ssim2d, ssim3d, ms3d = [], [], [], []
    for start in range(0, len(x_all), batch_size):
        x = x_all[start : start + batch_size].to(autoencoder.device)
        y = round_trip(autoencoder, x)
        if keep is not None:
            keep.append(y.float().clamp(-1, 1).cpu())
        a, b = ((v.float().clamp(-1, 1) + 1) / 2 for v in (x, y))
        mse = ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        psnr += (10 * torch.log10(1 / mse)).tolist()
        slices = lambda v: v.movedim(-1, 1).reshape(-1, 1, *v.shape[2:4])  # noqa: E731  (N*Z, 1, X, Y)
        win = 11 if min(a.shape[2:]) >= 44 else 7 if min(a.shape[2:]) >= 16 else 3
        ssim2d.append(float(ssim(slices(a), slices(b), data_range=1.0, win_size=win)))
        ssim3d += ssim(a, b, data_range=1.0, size_average=False, win_size=win).tolist()
        if min(a.shape[2:]) >= MS_SSIM_MIN_SIZE:
            ms3d += ms_ssim(a, b, data_range=1.0, size_average=False).tolist()
    return VolumeReconstruction(
        volumes=len(x_all),
        psnr=float(np.mean(psnr)),
        ssim=float(np.mean(ssim2d)),
        ssim_3d=float(np.mean(ssim3d)),
        ms_ssim_3d=float(np.mean(ms3d)) if ms3d else None,
    )


def train_volume_autoencoder_and_report(config: TrainConfig, progress: bool = True) -> VolumeAutoencoderReport | None:
    """`meddiff train-autoencoder` on volumes: train, reconstruction on held-out volumes, metrics, report, card."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    spec, dataset, config = _load(config, "volume-autoencoder")
    heldout = load_dataset(spec.heldout(), config.resolution)
    timings["load_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:
        return None
    assert result.pipeline_dir is not None
    timings["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    autoencoder = VolumeAutoencoder.from_pretrained(result.pipeline_dir)
    trips: list[torch.Tensor] = []
    reconstruction = reconstruction_metrics(autoencoder, heldout.images, keep=trips)
    tumour = None
    if spec.kind == "phantom3d" and TUMOUR_LABEL in heldout.label_names:
        names, spacing = list(heldout.label_names), list(cast(VolumeDataset, heldout).spacing)
        tumour = tumour_fidelity(torch.cat(trips), heldout.labels, heldout.known, heldout, names, spacing)
        logger.info("tumour measurement on held-out round trips: %s", tumour.to_dict())
    timings["evaluate_s"] = time.perf_counter() - t
    run_dir = Path(config.out)
    report = VolumeAutoencoderReport(
        dataset=dataset.summary(),
        heldout=heldout.summary(),
        steps=result.steps,
        train_minutes=round(result.train_seconds / 60, 2),
        seconds_per_step=round(result.train_seconds / max(result.steps, 1), 3),
        parameters=result.parameters,
        scaling_factor=autoencoder.scaling_factor,
        latent_shape=list(autoencoder.latent_shape(dataset.shape[1:])),
        reconstruction=reconstruction,
        tumour_round_trip=tumour,
        timings={k: round(v, 1) for k, v in timings.items()},
        loss_history=result.loss_history,
    )
    report.write_json(run_dir / "metrics.json")
    _write_autoencoder_page(run_dir, report, autoencoder, heldout)
    write_card(_autoencoder_card(config, report), run_dir)
    logger.info("held-out reconstruction: %s", reconstruction.to_dict())
    return report


def _write_autoencoder_page(run_dir: Path, report: VolumeAutoencoderReport, autoencoder, heldout) -> Path:
    x = _model_range(heldout.images[: min(3, len(heldout))])
    recon = round_trip(autoencoder, x).cpu()
    spacing = heldout.spacing
    montage = real_vs_synthetic_png(list(x), list(recon), spacing=spacing)
    r = report.reconstruction
    page = html_page(
        "meddiff 3D autoencoder",
        [
            ("Held-out volumes (left) and their reconstructions (right)", figure("round trips", montage)),
            (
                "Reconstruction",
                html_table(
                    ["volumes", "PSNR dB", "SSIM (slices)", "3D SSIM", "3D MS-SSIM"],
                    [[r.volumes, r.psnr, r.ssim, r.ssim_3d, r.ms_ssim_3d]],
                )
                + (
                    f"<p>Tumour present/absent AUC of the exact measurement on these round trips: "
                    f"{report.tumour_round_trip.presence_auc} (on the real volumes: "
                    f"{report.tumour_round_trip.real_presence_auc}); a latent model cannot do better.</p>"
                    if report.tumour_round_trip
                    else ""
                ),
            ),
            (
                "Training",
                f"<p>{report.dataset}</p><p>{report.steps} steps, {report.seconds_per_step:.2f} s a step, "
                f"{report.parameters / 1e6:.2f} M parameters, latents {report.latent_shape}, scaling factor "
                f"{report.scaling_factor:.4f}.</p>" + figure("loss", loss_curve_png(report.loss_history)),
            ),
            ("Timings", html_table(["stage", "seconds"], [[k, v] for k, v in report.timings.items()])),
        ],
    )
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def _autoencoder_card(config: TrainConfig, report: VolumeAutoencoderReport) -> CardContent:
    r = report.reconstruction
    return CardContent(
        title="meddiff 3D volume autoencoder",
        summary=[f"A MONAI {config.volume.autoencoder.kind.upper()} autoencoder for 3D volumes ({report.dataset})."],
        sections=[
            CardSection(
                title="Reconstruction (held-out volumes)",
                lines=[
                    f"- {report.heldout}",
                    f"- PSNR {r.psnr:.2f} dB, slice SSIM {r.ssim:.4f}, 3D SSIM {r.ssim_3d:.4f}"
                    + (f", 3D MS-SSIM {r.ms_ssim_3d:.4f}" if r.ms_ssim_3d is not None else ""),
                    f"- latents {report.latent_shape}, scaling factor {report.scaling_factor:.4f}",
                ],
            ),
            CardSection(
                title="Use",
                lines=[
                    "```",
                    f"meddiff train --data {config.data} --autoencoder {config.out} --out RUN",
                    "```",
                ],
            ),
        ],
        tags=["3d", "volume", "monai", "autoencoder"],
        trained_on=report.dataset,
    )


# ----------------------------------------------------------------------------------------------- latent diffusion


@dataclasses.dataclass(kw_only=True)
class TumourFidelity(JsonResult):
    """Phantoms: label fidelity by the exact image measurement (meddiff.data.phantom3d.measure_tumour)."""

    presence_auc: float | None  # conditioned tumour label against the measured core volume
    presence_accuracy: float
    side_accuracy: float | None  # tumour volumes generated with a known side
    mean_volume_ml: float | None  # measured core volume of the volumes generated with a tumour
    real_presence_auc: float | None  # the same measurement on held-out real volumes: what a perfect model scores
    real_side_accuracy: float | None
    real_mean_volume_ml: float | None
    real_volume_error_ml: float | None  # |measured - true| core volume of the real tumours
    mean_volume_error_ml: float | None  # |mean measured synthetic - mean measured real| core volume of tumours
    # with a size condition (the `Large` label): does the measured core volume follow the requested size?
    size_auc: float | None = None  # measured volume separates tumours asked to be large from those asked small
    real_size_auc: float | None = None
    mean_volume_ml_by_size: dict[str, float | None] | None = None  # requested "large"/"small" -> mean measured mL
    real_mean_volume_ml_by_size: dict[str, float | None] | None = None
    volume_error_ml_by_size: dict[str, float | None] | None = None  # |synthetic - real| mean per requested size
    n_synthetic: int
    n_real: int


@dataclasses.dataclass(kw_only=True)
class VolumeRunSummary(JsonResult):
    data: str
    dataset: str
    label_names: list[str]
    grid: dict
    steps: int
    train_minutes: float
    seconds_per_step: float
    parameters: int
    sampling: str
    seconds_per_volume: float
    conditions: dict[str, int]  # condition name -> generated volumes
    features: str
    slice_fid: dict  # SliceDistances: synthetic vs training volumes
    slice_fid_real: dict  # the real-vs-real reference: held-out vs training volumes
    consistency: dict
    diversity: dict
    memorization: dict
    tumour: TumourFidelity | None
    classifier: VolumeClassifierScores | None  # 3D FID/KID and label fidelity by a real-trained 3D classifier
    timings: dict[str, float]
    volumes: str
    loss_history: list[list[float]] = json_field(default_factory=list, saved=False)


RANDOM_CONV = "random-conv (fixed seeded random 3-stage conv net, mean+std pooled, 224-d)"


class RandomConvFeatures:
    """Fixed random-weight conv features of 2D slices (seeded; no training): mean and std of each channel after
    each of three conv + ReLU + pool stages, 2 x (16 + 32 + 64) = 224 numbers per slice."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        widths, self.weights = [1, 16, 32, 64], []
        for c_in, c_out in zip(widths, widths[1:]):
            w = torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * c_in**0.5)
            self.weights.append(w - w.mean(dim=(1, 2, 3), keepdim=True))  # zero-mean filters: texture, not level

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor) -> np.ndarray:
        x, parts = slices.float(), []
        for w in self.weights:
            x = F.avg_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
            parts += [x.mean(dim=(2, 3)), x.std(dim=(2, 3))]
        return torch.cat(parts, dim=1).numpy()


def label_subset(dataset, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's (labels, known) columns of `names` (a model's conditions: the dataset may hold measurements
    besides them), in that order."""
    have = list(dataset.label_names)
    missing = [n for n in names if n not in have]
    if missing:
        raise MeddiffError(
            f"{getattr(dataset, 'source', 'the data')} lacks the model's label column(s) {', '.join(missing)}; "
            "give every split the same label columns (labels= in the data spec)"
        )
    cols = [have.index(n) for n in names]
    return dataset.labels[:, cols], dataset.known[:, cols]


def condition_rows(dataset, names: list[str], limit: int = 6) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The combinations of the model's labels `names` among the training volumes, most frequent first: (name,
    labels (K,), known (K,))."""
    names = list(names)
    if not names:
        return [("unconditional", torch.zeros(0), torch.zeros(0, dtype=torch.bool))]
    labels_all, known_all = label_subset(dataset, names)
    keys: dict[tuple, int] = {}
    for labels, known in zip((labels_all > 0.5).int().tolist(), known_all.int().tolist()):
        key = (tuple(labels), tuple(known))
        keys[key] = keys.get(key, 0) + 1
    rows = []
    for (labels, known), _ in sorted(keys.items(), key=lambda kv: -kv[1])[:limit]:
        present = [n for n, v, k in zip(names, labels, known) if v and k]
        rows.append(
            (
                " + ".join(present) or "none",
                torch.tensor(labels, dtype=torch.float32),
                torch.tensor(known, dtype=torch.bool),
            )
        )
    return rows


def _matching(dataset, names: list[str], labels: torch.Tensor, known: torch.Tensor) -> list[int]:
    """The training volumes with this combination of the model's labels `names`."""
    if not len(labels):
        return list(range(len(dataset)))
    have, have_known = label_subset(dataset, names)
    same = ((have > 0.5).float() == labels).all(1) & (have_known == known).all(1)
    return same.nonzero().flatten().tolist()


def size_scores(found, tumour, large, known) -> tuple[float | None, dict[str, float | None]]:
    """Among volumes with a tumour and a known size label: AUC of the measured core volume for large against small,
    and the mean measured volume of each ({"large": mL, "small": mL}; None where there are none)."""
    from sklearn.metrics import roc_auc_score

    rows = [(m.volume_ml, bool(b)) for m, t, b, k in zip(found, tumour, large, known) if bool(t) and bool(k)]
    means: dict[str, float | None] = {}
    for key, want in (("large", True), ("small", False)):
        vols = [v for v, b in rows if b == want]
        means[key] = round(float(np.mean(vols)), 3) if vols else None
    both = len({b for _, b in rows}) == 2
    return (float(roc_auc_score([b for _, b in rows], [v for v, _ in rows])) if both else None), means


def tumour_fidelity(synthetic: torch.Tensor, labels: torch.Tensor, known, heldout, names, spacing) -> TumourFidelity:
    """Measure every synthetic and held-out real volume; compare with the labels they were generated (drawn) with."""
    from sklearn.metrics import roc_auc_score

    from meddiff.data.phantom3d import measure_tumour

    k_t = names.index(TUMOUR_LABEL)
    k_s = names.index(SIDE_LABEL) if SIDE_LABEL in names else None
    k_l = names.index(SIZE_LABEL) if SIZE_LABEL in names and SIZE_LABEL in heldout.label_names else None
    held_names = list(heldout.label_names)  # the held-out set's own columns (it may hold measurements besides)
    h_t = held_names.index(TUMOUR_LABEL)
    h_s = held_names.index(SIDE_LABEL) if SIDE_LABEL in held_names and k_s is not None else None
    voxel = tuple(float(s) for s in spacing)

    def measure(volumes) -> list:
        return [measure_tumour((np.asarray(v[0], np.float32) + 1) / 2, voxel) for v in volumes]

    def scores(found, tumour, side):
        y = [bool(v) for v in tumour]
        auc = float(roc_auc_score(y, [m.volume_ml for m in found])) if len(set(y)) == 2 else None
        accuracy = float(np.mean([m.present == t for m, t in zip(found, y)]))
        sided = [(m.side, "left" if s else "right") for m, t, s in zip(found, y, side) if t and s is not None]
        side_acc = float(np.mean([a == b for a, b in sided])) if sided else None
        vols = [m.volume_ml for m, t in zip(found, y) if t]
        return auc, accuracy, side_acc, (float(np.mean(vols)) if vols else None)

    def sides(lab, kn, k):
        return [bool(lab[i, k]) if k is not None and kn[i, k] else None for i in range(len(lab))]

    found = measure(synthetic)
    auc, accuracy, side_acc, mean_ml = scores(found, labels[:, k_t] > 0.5, sides(labels, known, k_s))
    real = measure(_model_range(heldout.images))
    real_labels = heldout.labels
    r_auc, _, r_side, r_ml = scores(real, real_labels[:, h_t] > 0.5, sides(real_labels, heldout.known, h_s))
    error = None
    if "Tumour volume mL" in held_names:
        k_v = held_names.index("Tumour volume mL")
        diffs = [abs(m.volume_ml - float(real_labels[i, k_v])) for i, m in enumerate(real) if real_labels[i, h_t] > 0.5]
        error = float(np.mean(diffs)) if diffs else None
    size: dict[str, Any] = {}
    if k_l is not None:
        k_lr = heldout.label_names.index(SIZE_LABEL)
        synthetic_size = size_scores(found, labels[:, k_t] > 0.5, labels[:, k_l] > 0.5, known[:, k_l])
        real_size = size_scores(real, real_labels[:, h_t] > 0.5, real_labels[:, k_lr] > 0.5, heldout.known[:, k_lr])
        errors = {
            key: abs(a - b) if a is not None and b is not None else None
            for key, a, b in zip(("large", "small"), synthetic_size[1].values(), real_size[1].values())
        }
        size = {
            "size_auc": synthetic_size[0],
            "real_size_auc": real_size[0],
            "mean_volume_ml_by_size": synthetic_size[1],
            "real_mean_volume_ml_by_size": real_size[1],
            "volume_error_ml_by_size": errors,
        }
    return TumourFidelity(
        presence_auc=auc,
        presence_accuracy=accuracy,
        side_accuracy=side_acc,
        mean_volume_ml=mean_ml,
        real_presence_auc=r_auc,
        real_side_accuracy=r_side,
        real_mean_volume_ml=r_ml,
        real_volume_error_ml=error,
        mean_volume_error_ml=abs(mean_ml - r_ml) if mean_ml is not None and r_ml is not None else None,
        **size,
        n_synthetic=len(found),
        n_real=len(real),
    )


def generate_condition_sets(
    pipe: VolumePipeline, rows, per_condition: int, out_dir: Path, seed: int, guidance: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """`per_condition` volumes of each condition row, drawn a batch per condition (seed image_seed(seed, row)) and
    written as NIfTI with a manifest. Returns (volumes, labels, known, condition name per volume)."""
    volumes, labels, known, names = [], [], [], []
    for r, (name, lab, kn) in enumerate(rows):
        generator = torch.Generator().manual_seed(image_seed(seed, r))
        lab_n, kn_n = lab.expand(per_condition, -1), kn.expand(per_condition, -1)
        conditions = encode_condition(lab_n, kn_n) if pipe.label_names else None
        batch = pipe(conditions, guidance, steps, generator, num_volumes=per_condition).cpu()
        volumes.append(batch)
        labels.append(lab_n)
        known.append(kn_n)
        names += [name] * per_condition
    v, lab_all, kn_all = torch.cat(volumes), torch.cat(labels), torch.cat(known)
    seeds = [image_seed(seed, r) for r in range(len(rows)) for _ in range(per_condition)]
    run = {"guidance": guidance, "steps": steps, "model": str(out_dir.parent / "pipeline")}
    export_volumes(
        v, out_dir, np.asarray(pipe.grid.affine), pipe.grid.channel_names, lab_all, kn_all, pipe.label_names, seeds,
        run=run,
    )  # fmt: skip
    return v, lab_all, kn_all, names


def real_feature_nets(dataset, real: torch.Tensor, seed: int, feature_size: int, progress: bool):
    """(slice feature function, its description, whether the data has a binary label for a 3D classifier)."""
    if dataset.label_names and binary_columns(dataset.labels, dataset.known):
        features, described = slice_feature_net(
            real, dataset.labels, dataset.known, list(dataset.label_names), size=feature_size, seed=seed,
            progress=progress,
        )  # fmt: skip
        return features, described, True
    logger.info("no binary label to train feature nets on: random-conv slice features, no 3D classifier")
    return RandomConvFeatures(seed), RANDOM_CONV, False


def train_volume_and_report(
    config: TrainConfig, progress: bool = True, per_condition: int = 8, feature_size: int = 64
) -> VolumeRunSummary | None:
    """`meddiff train` on volumes: latent diffusion, a fixed set per label combination, views and metrics."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    spec, dataset, config = _load(config, "volume-latent")
    heldout = load_dataset(spec.heldout(), config.resolution)
    timings["load_data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = train(config, dataset, progress=progress)
    if not result.is_main_process:
        return None
    assert result.pipeline_dir is not None
    timings["train_s"] = time.perf_counter() - t
    run_dir = Path(config.out)
    pipe = VolumePipeline.from_pretrained(result.pipeline_dir)
    rows = condition_rows(dataset, list(pipe.label_names))
    t = time.perf_counter()
    synthetic, labels, known, cond_names = generate_condition_sets(
        pipe, rows, per_condition, run_dir / "volumes", config.seed, config.guidance, config.sample_steps
    )
    timings["generate_s"] = time.perf_counter() - t
    seconds_per_volume = timings["generate_s"] / max(len(synthetic), 1)
    t = time.perf_counter()
    real = _model_range(dataset.images)
    real_heldout = _model_range(heldout.images)
    features, described, labelled = real_feature_nets(dataset, real, config.seed, feature_size, progress)
    timings["feature_nets_s"] = time.perf_counter() - t
    t = time.perf_counter()
    per_volume = 8
    distances = slice_distances(real, synthetic, features, per_volume=per_volume, n_boot=20, seed=config.seed)
    reference = slice_distances(real, real_heldout, features, per_volume=per_volume, n_boot=0, seed=config.seed)
    consistency = slice_consistency(distances, real, synthetic)
    diversity = volume_diversity(real_heldout, synthetic, max_pairs=60, seed=config.seed)
    memorization = volume_memorization(synthetic, real, real_heldout, per_volume=per_volume)
    timings["metrics_s"] = time.perf_counter() - t
    classifier = None
    if labelled and pipe.label_names:
        t = time.perf_counter()
        names = list(pipe.label_names)  # the model's conditions: what the synthetic volumes are labelled with
        classifier = volume_classifier_scores(
            real, *label_subset(dataset, names), names, synthetic, labels, known,
            real_heldout, *label_subset(heldout, names), seed=config.seed, progress=progress,
        )  # fmt: skip
        timings["classifier_3d_s"] = time.perf_counter() - t
        logger.info("3D classifier: %s", classifier.to_dict())
    tumour = None
    if spec.kind == "phantom3d" and TUMOUR_LABEL in pipe.label_names:
        t = time.perf_counter()
        tumour = tumour_fidelity(synthetic, labels, known, heldout, pipe.label_names, pipe.grid.spacing)
        timings["tumour_measurement_s"] = time.perf_counter() - t
        logger.info("label fidelity by measurement: %s", tumour.to_dict())
    summary = VolumeRunSummary(
        data=config.data,
        dataset=dataset.summary(),
        label_names=list(pipe.label_names),
        grid=dataclasses.asdict(pipe.grid),
        steps=result.steps,
        train_minutes=round(result.train_seconds / 60, 2),
        seconds_per_step=round(result.train_seconds / max(result.steps, 1), 3),
        parameters=result.parameters,
        sampling=f"{type(pipe.scheduler).__name__}, {config.sample_steps} steps, guidance {config.guidance}",
        seconds_per_volume=round(seconds_per_volume, 2),
        conditions={name: cond_names.count(name) for name in dict.fromkeys(cond_names)},
        features=described,
        slice_fid=distances.to_dict(),
        slice_fid_real=reference.to_dict(),
        consistency=consistency.to_dict(),
        diversity=diversity.to_dict(),
        memorization=memorization.to_dict(),
        tumour=tumour,
        classifier=classifier,
        timings={k: round(v, 1) for k, v in timings.items()},
        volumes=str(run_dir / "volumes" / "manifest.csv"),
        loss_history=result.loss_history,
    )
    summary.write_json(run_dir / "metrics.json")
    write_volume_report(run_dir, summary, dataset, rows, synthetic, cond_names)
    card = pipe.card()
    card.sections.append(CardSection(title="Evaluation (this run)", lines=_card_metrics(summary)))
    write_card(card, run_dir)
    return summary


def _card_metrics(summary: VolumeRunSummary) -> list[str]:
    fid, ref, d, m = summary.slice_fid, summary.slice_fid_real, summary.diversity, summary.memorization
    lines = [
        f"- {sum(summary.conditions.values())} volumes generated ({summary.sampling}); features: {summary.features}",
        f"- three-plane slice FID {fid['mean_fid']:.2f} (real-vs-real {ref['mean_fid']:.2f})",
        f"- diversity (mean pairwise 3D {d['metric']}): synthetic {d['synthetic']}, real {d['real']}",
        f"- memorization: {m['rate_flagged']:.3f} of the volumes flagged",
    ]
    if summary.tumour is not None:
        t = summary.tumour
        lines.append(
            f"- tumour presence AUC by measurement {t.presence_auc} (real held-out {t.real_presence_auc}), "
            f"side accuracy {t.side_accuracy} (real {t.real_side_accuracy})"
        )
    if summary.classifier is not None:
        c = summary.classifier
        aucs = ", ".join(f"{n} {c.synthetic_auc.get(n)} (real {c.real_auc.get(n)})" for n in c.labels)
        lines.append(f"- 3D classifier: FID {c.fid:.3g} (real-vs-real {c.real_fid}); label AUC {aucs}")
    return lines


def _fid_rows(summary: VolumeRunSummary) -> list[list[object]]:
    rows = []
    for plane, d in summary.slice_fid["planes"].items():
        r = summary.slice_fid_real["planes"][plane]
        ci = d.get("fid_ci95")
        rows.append([plane, d["fid"], f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "n/a", r["fid"], d["kid"], r["kid"]])
        rows[-1].append(f"{d['real_slices']} / {d['synthetic_slices']} / {r['synthetic_slices']}")
    rows.append(["mean", summary.slice_fid["mean_fid"], "", summary.slice_fid_real["mean_fid"]])
    rows[-1] += [summary.slice_fid["mean_kid"], summary.slice_fid_real["mean_kid"], ""]
    return rows


def classifier_html(c: VolumeClassifierScores) -> str:
    """The 3D classifier's section of a report: 3D FID/KID next to real-vs-real, per-label AUC next to real."""
    rows = [["3D FID (training vs set)", c.fid, c.real_fid], ["3D KID (training vs set)", c.kid, c.real_kid]]
    rows += [[f"label AUC: {name}", c.synthetic_auc.get(name), c.real_auc.get(name)] for name in c.labels]
    rows.append(["volumes", c.n_synthetic, c.n_heldout])
    return (
        f"<p>A small 3D CNN (MONAI residual units, {c.feature_dim}-d mean+max pooled features) trained for "
        f"{c.epochs} epochs on the {c.n_train} real training volumes ({c.train_seconds:.0f} s). Label AUC: its score "
        "against the label each synthetic volume was generated with; the real column is the same classifier on "
        "held-out real volumes.</p>" + html_table(["measure", "synthetic", "real held-out"], rows)
    )


def size_rows(tf: TumourFidelity) -> list[list[Any]]:
    """Report rows of the size condition (none without one)."""
    if tf.mean_volume_ml_by_size is None or tf.real_mean_volume_ml_by_size is None:
        return []
    return [
        ["large vs small requested: AUC of the measured core volume", tf.size_auc, tf.real_size_auc],
        [
            "mean core volume, asked large, mL",
            tf.mean_volume_ml_by_size["large"],
            tf.real_mean_volume_ml_by_size["large"],
        ],
        [
            "mean core volume, asked small, mL",
            tf.mean_volume_ml_by_size["small"],
            tf.real_mean_volume_ml_by_size["small"],
        ],
    ]


def write_volume_report(run_dir: Path, summary: VolumeRunSummary, dataset, rows, synthetic, cond_names) -> Path:
    """RUN/report.html: real vs synthetic montages per condition, a slice slider, a sweep GIF, every metric."""
    spacing = summary.grid["spacing"]
    montages = ""
    for name, lab, kn in rows:
        real_idx = _matching(dataset, list(summary.label_names), lab, kn)[:3]
        mine = [i for i, c in enumerate(cond_names) if c == name][:3]
        png = real_vs_synthetic_png(
            [_model_range(dataset.images[i]) for i in real_idx], [synthetic[i] for i in mine], spacing=spacing
        )
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples" / f"montage_{name.replace(' ', '').replace('+', '_')}.png").write_bytes(png)
        montages += figure(f"{name}: real (left) and synthetic (right)", png)
    sweep_gif(synthetic[0], run_dir / "samples" / "sweep_axial.gif", spacing=spacing)
    sliders = "<div class='grids'>" + slice_slider_html(
        _model_range(dataset.images[0]), "real", spacing=spacing
    ) + slice_slider_html(synthetic[0], f"synthetic ({cond_names[0]})", spacing=spacing) + "</div>"  # fmt: skip
    fid_html = f"<p>Features: {summary.features}.</p>" + html_table(
        ["plane", "FID synthetic", "FID 95%", "FID real-vs-real", "KID synthetic", "KID real-vs-real", "slices"],
        _fid_rows(summary),
    )
    c = summary.consistency
    fid_html += (
        f"<p>Slice consistency: FID across / within the acquisition plane ({c['acquisition_plane']}): "
        f"{c['orthogonal_ratio'] if c['orthogonal_ratio'] is None else round(c['orthogonal_ratio'], 3)}.</p>"
    )
    d, m = summary.diversity, summary.memorization
    other = html_table(
        ["metric", "value"],
        [
            [f"diversity: mean pairwise 3D {d['metric']}, real held-out", d["real"]],
            [f"diversity: mean pairwise 3D {d['metric']}, synthetic", d["synthetic"]],
            ["memorization: flagged volumes", m["rate_flagged"]],
            ["memorization: whole-volume copies", m["rate_volume"]],
            ["memorization: slice copies", m["rate_slice"]],
            ["memorization: kNN ratio", m["rate_knn_ratio"]],
            ["closest training volume (correlation, max)", m["max_volume_similarity"]],
        ],
    )
    sections = [
        ("Real and synthetic volumes per label combination", montages),
        ("Slices", sliders),
        ("Slice FID / KID in three planes", fid_html),
        ("Diversity and memorization", other),
    ]
    if summary.tumour is not None:
        tf = summary.tumour
        sections.append(
            (
                "Label fidelity by measurement (phantoms)",
                "<p>Each volume's tumour is measured from the image alone (core volume, side); the real column "
                "is the same measurement on held-out real phantoms.</p>"
                + html_table(
                    ["measure", "synthetic", "real held-out"],
                    [
                        ["tumour present/absent AUC (core volume)", tf.presence_auc, tf.real_presence_auc],
                        ["side accuracy", tf.side_accuracy, tf.real_side_accuracy],
                        ["mean core volume of tumours, mL", tf.mean_volume_ml, tf.real_mean_volume_ml],
                        *size_rows(tf),
                        ["volumes", tf.n_synthetic, tf.n_real],
                    ],
                ),
            )
        )
    if summary.classifier is not None:
        sections.append(("3D classifier: FID / KID and label fidelity", classifier_html(summary.classifier)))
    sections += [
        (
            "Training",
            f"<p>{summary.dataset}</p><p>{summary.steps} steps, {summary.seconds_per_step:.2f} s a step, "
            f"{summary.parameters / 1e6:.2f} M parameters; sampling {summary.sampling}, "
            f"{summary.seconds_per_volume:.1f} s a volume.</p>" + figure("loss", loss_curve_png(summary.loss_history)),
        ),
        ("Timings", html_table(["stage", "seconds"], [[k, v] for k, v in summary.timings.items()])),
    ]
    path = run_dir / "report.html"
    path.write_text(html_page("meddiff 3D latent diffusion", sections))
    return path
