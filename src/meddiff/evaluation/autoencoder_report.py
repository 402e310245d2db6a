"""How well a trained autoencoder reconstructs held-out images: MSE, PSNR, SSIM (MS-SSIM where the size allows),
a grid of originals above their reconstructions (chosen to show every finding), and for VQ models codebook use."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.data.dataset import ImageLabelDataset
from meddiff.evaluation.reconstruction import reconstruction_metrics
from meddiff.evaluation.report import figure, fmt, html_page, html_table, loss_curve_png
from meddiff.evaluation.results import AutoencoderReport
from meddiff.models.autoencoder import codebook_perplexity, is_vq, latent_size, vq_round_trip
from meddiff.sampling.grid import grid_png_bytes


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, torch.Tensor | None]:
    """images (N, 1, R, R) in [-1, 1] -> reconstructions (N, R, R) in [0, 1] (KL: posterior mean; VQ: quantised),
    and for VQ the code indices used."""
    out, codes = [], []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(vae.device, vae.dtype)
        if is_vq(vae):
            recon, _, idx, _ = vq_round_trip(vae, x)
            codes.append(idx.flatten().cpu())
        else:
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((recon.float() + 1) / 2).clamp(0, 1)[:, 0].cpu().numpy())
    return np.concatenate(out), (torch.cat(codes) if codes else None)


def showcase_indices(
    data: ImageLabelDataset, per_label: int = 2, total: int = 12, among: Sequence[int] | None = None
) -> list[int]:
    """Images that together show every finding (and a normal one), for the reconstruction grid; `among`: the
    indices to choose from (default: all), in their order."""
    pool = list(range(len(data))) if among is None else [int(i) for i in among]
    chosen: list[int] = []
    for k in range(len(data.label_names)):
        has = [i for i in pool if data.known[i, k] and data.labels[i, k] > 0.5]
        chosen += [i for i in has if i not in chosen][:per_label]
    chosen += [i for i in pool if i not in chosen]
    return chosen[:total]


def spread_indices(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over 0..n_total-1 (all of them when n >= n_total): a held-out split stored class
    by class is then measured on every class, not on the first one only."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def autoencoder_report(
    vae, heldout: ImageLabelDataset, out_dir: Path, training: Mapping[str, Any], max_images: int = 512
) -> AutoencoderReport:
    """training: an AutoencoderTraining (or any mapping with some of its keys), saved beside the report."""
    out_dir = Path(out_dir)
    measured = spread_indices(len(heldout), max_images)
    n = len(measured)
    images = heldout.images[torch.from_numpy(measured)]
    originals = (images[:, 0].numpy() + 1) / 2
    recon, codes = reconstruct(vae, images)
    metrics = reconstruction_metrics(originals, recon)
    result = AutoencoderReport(
        heldout_images=n,
        **metrics,  # type: ignore[arg-type]  # mse, psnr, ssim: floats; ms_ssim: float or None
        kind="vq" if is_vq(vae) else "kl",
        downsample=vae.config.sample_size // latent_size(vae),
        latent_shape=[vae.config.latent_channels, latent_size(vae), latent_size(vae)],
        scaling_factor=vae.config.scaling_factor,
    )
    if codes is not None:
        counts = torch.bincount(codes, minlength=vae.config.num_vq_embeddings)
        result.codebook_used, result.codebook_size = int((counts > 0).sum()), int(counts.numel())
        result.perplexity = codebook_perplexity(counts)
    show = showcase_indices(heldout, among=measured.tolist())
    names = [
        ", ".join(n for k, n in enumerate(heldout.label_names) if heldout.known[i, k] and heldout.labels[i, k] > 0.5)
        or "-"
        for i in show
    ]
    upscale = max(1, 96 // heldout.resolution)
    at = {int(i): row for row, i in enumerate(measured)}  # dataset index -> row of originals/recon
    rows_shown = [at[i] for i in show]
    pairs = np.concatenate(
        [
            originals[rows_shown],
            recon[rows_shown],
            np.clip(np.abs(originals[rows_shown] - recon[rows_shown]) * 4, 0, 1),
        ]
    )
    grid = grid_png_bytes(pairs, columns=len(show), upscale=upscale)
    (out_dir / "reconstructions.png").write_bytes(grid)
    (out_dir / "metrics.json").write_text(json.dumps({**result.to_dict(), "training": dict(training)}, indent=2))
    rows = [[k, fmt(v, 4) if isinstance(v, float) else v] for k, v in result.to_dict().items()]
    page = html_page(
        "meddiff autoencoder: reconstruction report",
        [
            (
                "Held-out reconstructions",
                figure(
                    "top: originals; middle: reconstructions; bottom: |difference| x4. Columns: " + " | ".join(names),
                    grid,
                ),
            ),
            ("Metrics", html_table(["metric", "value"], rows)),
            (
                "Training",
                f"<p>{training.get('dataset', '')}</p><p>{training.get('steps')} steps, "
                f"{fmt(training.get('train_minutes', 0), 1)} min, {fmt(training.get('images_per_second', 0), 1)} "
                "img/s</p>"
                + (figure("loss", loss_curve_png(training["loss_history"])) if training.get("loss_history") else ""),
            ),
        ],
    )
    (out_dir / "report.html").write_text(page)
    return result
