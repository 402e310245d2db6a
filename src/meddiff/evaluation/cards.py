"""What each command's model card says (train, train-autoencoder, finetune), written by the one writer in
meddiff.models.card to RUN/README.md."""

from __future__ import annotations

from pathlib import Path

from meddiff.evaluation.fairness import fairness_lines
from meddiff.evaluation.report import fmt
from meddiff.evaluation.results import AutoencoderReport, FidelityReport, RunSummary
from meddiff.models.card import CardContent, CardSection, write_card
from meddiff.training.config import TrainConfig
from meddiff.training.methods.finetune import finetune_strategy
from meddiff.training.summary import AutoencoderTraining, FinetuneSummary

# dataset kinds that name a public dataset, as a card tag
DATASET_TAGS = {"chexpert": "chexpert", "mimic": "mimic-cxr", "medmnist": "medmnist", "phantom": "phantom"}


def dataset_tags(spec: str) -> list[str]:
    kind = spec.split(":", 1)[0].strip().lower()
    return [DATASET_TAGS[kind]] if kind in DATASET_TAGS else []


def _fidelity_lines(fidelity: FidelityReport | None, note: str | None = None) -> list[str]:
    if fidelity is None:
        return ["(not measured)", *([f"Note: {note}."] if note else [])]
    lines = [f"Note: {note}.", ""] if note else []
    lines += [
        "Label fidelity: ROC AUC of a classifier trained on real training images, on held-out real images "
        "and on generated images against the labels they were generated with "
        f"({fidelity.n_synthetic} generated, {fidelity.sampling}).",
        "",
        "| label | real AUC | synthetic AUC |",
        "|---|---|---|",
    ]
    for name, value in fidelity.real_auc.items():
        lines.append(f"| {name} | {fmt(value)} | {fmt(fidelity.synthetic_auc[name])} |")
    if fidelity.subgroups:
        lines += [
            "",
            "Per demographic subgroup (fairness): the findings' mean AUC on real held-out and on generated images of "
            "that subgroup, and FID between them (classifier features).",
            "",
            *fairness_lines(fidelity.subgroups),
        ]
    response = fidelity.prompt_response
    if response:
        names = response.label_names
        lines += [
            "",
            f"Prompt response: share of {response.n_per_prompt} images per prompt that the real-trained "
            "classifier calls positive for each label; in italics, the same classifier on real held-out images "
            "showing the prompt's findings (what a perfect generator would score).",
            "",
            "| prompt | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        real, counts = response.real_positive_rate or {}, response.real_count or {}
        for prompt, rates in response.positive_rate.items():
            lines.append(f"| {prompt} | " + " | ".join(f"{rates[n]:.2f}" for n in names) + " |")
            if real.get(prompt) and counts.get(prompt):
                lines.append(
                    f"| *real held-out images with these findings (n={counts[prompt]})* | "
                    + " | ".join(fmt(real[prompt][n]) for n in names)
                    + " |"
                )
    return lines


def _pipeline_tag(summary: RunSummary) -> str | None:
    """The Hub's task: text-to-image for prompts, unconditional without labels, none for findings alone."""
    if summary.conditioning in ("text", "both"):
        return "text-to-image"
    return "unconditional-image-generation" if summary.conditioning == "none" or not summary.label_names else None


def train_card(run_dir: Path, summary: RunSummary) -> CardContent:
    """`meddiff train`: data, labels, training, metrics, how to load it."""
    latent = summary.latent
    text = summary.conditioning in ("text", "both")
    space = (
        f"; latent space of a {latent.autoencoder} ({latent.latent_channels}x{latent.latent_size}x"
        f"{latent.latent_size}, scaling factor {latent.scaling_factor:.4f})"
        if latent
        else "; pixel space"
    )
    if text:
        ask = '--prompt "chest x-ray with cardiomegaly"'
        call = "images = pipe(prompt=['chest x-ray with cardiomegaly'], guidance_scale=3.0).images"
    else:
        ask = f'--labels "{(summary.label_names or ["..."])[-1]}"'
        call = "images = pipe(conditions=pipe.encode_labels([[...label names...]]), guidance_scale=2.0).images"
    use = [
        "```bash",
        f"meddiff generate --model {run_dir} {ask} --n 16 --out samples/",
        "```",
        "With plain diffusers:",
        "```python",
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained('pipeline', custom_pipeline='pipeline', trust_remote_code=True)",
        call,
        "```",
    ]
    if summary.conditioning == "text" and latent and latent.autoencoder == "AutoencoderKL":
        use += [
            "This model also loads with diffusers' standard `StableDiffusionPipeline.from_pretrained('pipeline', "
            "safety_checker=None, feature_extractor=None, requires_safety_checker=False)`."
        ]
    if not text:
        use += ["", "Sample grids per label: `samples/`."]
    return CardContent(
        title=f"meddiff model: {summary.data}",
        tags=[
            "diffusion",
            "synthetic-data",
            *(["latent-diffusion"] if latent else []),
            *(["label-conditional"] if summary.label_names and summary.conditioning != "none" else []),
            *dataset_tags(summary.data),
        ],
        pipeline_tag=_pipeline_tag(summary),
        trained_on=summary.dataset,
        sections=[
            CardSection(
                title="Data",
                lines=[
                    f"- spec: `{summary.data}`",
                    f"- {summary.dataset}",
                    f"- labels: {', '.join(summary.label_names) or '(unconditional)'}",
                ],
            ),
            CardSection(
                title="Training",
                lines=[
                    f"- method: {summary.method}, resolution {summary.resolution} px, "
                    f"{summary.parameters / 1e6:.2f} M parameters",
                    f"- steps: {summary.steps}, batch {summary.batch_size}, {summary.train_minutes:.1f} min, "
                    f"{summary.images_per_second:.1f} img/s, precision {summary.precision}",
                    f"- prediction: {summary.prediction_type}; classifier-free guidance dropout {summary.cond_dropout}",
                    f"- conditioning: {summary.conditioning}{space}",
                    *(
                        [
                            f"- started from the trained U-Net of `{summary.init_from}` (`--init-from`): what that "
                            "model learned, from its own training data, is part of this model too"
                        ]
                        if summary.init_from
                        else []
                    ),
                ],
            ),
            *_distillation_sections(summary),
            CardSection(title="Metrics", lines=_fidelity_lines(summary.fidelity, summary.evaluation_note)),
            CardSection(title="Use", lines=use),
        ],
    )


def _distillation_sections(summary: RunSummary) -> list[CardSection]:
    d = summary.distillation
    if d is None:
        return []
    teacher_auc = f"{d.teacher_mean_fidelity_auc:.3f}" if d.teacher_mean_fidelity_auc is not None else "not measured"
    return [
        CardSection(
            title="Distillation",
            lines=[
                f"- student of `{d.teacher}` ({d.method}), {d.network_evaluations_per_image} network evaluations per "
                f"image; the teacher needs {d.teacher_network_evaluations_per_image} at its run's settings",
                f"- guidance scales {d.guidance_range[0]}-{d.guidance_range[1]} are an input of the U-Net (no "
                f"second, unconditional pass); sampler: diffusers' {d.sampler}, "
                f"teacher grid of {d.solver_steps} DDIM steps",
                f"- sample with `--steps {d.network_evaluations_per_image}`; the teacher's mean label-fidelity AUC: "
                f"{teacher_auc}",
            ],
        )
    ]


def autoencoder_card(
    run_dir: Path, config: TrainConfig, report: AutoencoderReport, training: AutoencoderTraining
) -> CardContent:
    """`meddiff train-autoencoder`: the latent space, held-out reconstruction, how to use it."""
    vq = report.kind == "vq"
    model = "VQModel" if vq else "AutoencoderKL"
    kind = "VQ-VAE (diffusers VQModel)" if vq else "KL autoencoder (diffusers AutoencoderKL)"
    ms_ssim = f", MS-SSIM {report.ms_ssim:.4f}" if report.ms_ssim is not None else ""
    return CardContent(
        title=f"meddiff autoencoder: {config.data}",
        tags=["autoencoder", "vq-vae" if vq else "kl-autoencoder", *dataset_tags(config.data)],
        trained_on=training.dataset,
        sections=[
            CardSection(
                title="Model",
                lines=[
                    f"- {kind}, 1 channel, {config.resolution} px -> latent {'x'.join(map(str, report.latent_shape))} "
                    f"(downsample {report.downsample})",
                    f"- latent scaling factor {report.scaling_factor:.4f}, measured on the training images "
                    "(in config.json)",
                    f"- {training.dataset}",
                    f"- {training.steps} steps, {training.train_minutes:.1f} min",
                ],
            ),
            CardSection(
                title="Held-out reconstruction",
                lines=[
                    f"{report.heldout_images} images: MSE {report.mse:.5f}, PSNR {report.psnr:.2f} dB, "
                    f"SSIM {report.ssim:.4f}{ms_ssim}"
                ],
            ),
            CardSection(
                title="Use",
                lines=[
                    "For a latent diffusion model:",
                    "```bash",
                    f"meddiff train --method latent --autoencoder {run_dir} --data {config.data} --resolution "
                    f"{config.resolution} --out RUN",
                    "```",
                    f"With plain diffusers: `{model}.from_pretrained('{run_dir}/autoencoder')`.",
                ],
            ),
        ],
    )


def finetune_card(run_dir: Path, config: TrainConfig, summary: FinetuneSummary) -> CardContent:
    """`meddiff finetune`: base model, method, data, validation grid, how to load the result."""
    ft = config.finetune
    strategy = finetune_strategy(ft.method)(config)  # what loads its export, what its card adds
    use = strategy.diffusers_usage(Path(summary.export))
    encoder = f"- text encoder: {ft.text_encoder or 'the pretrained CLIP'}{strategy.card_details()}"
    return CardContent(
        title=f"meddiff fine-tune ({ft.method}) of {ft.pretrained}",
        tags=["stable-diffusion", "text-to-image", ft.method, *dataset_tags(config.data)],
        pipeline_tag="text-to-image",
        base_model=ft.pretrained,
        trained_on=summary.dataset,
        sections=[
            CardSection(
                title="Training",
                lines=[
                    f"- data: {summary.dataset}",
                    f"- {summary.steps} steps at {config.resolution} px, batch {config.batch_size} x "
                    f"{config.gradient_accumulation} accumulation, {summary.train_minutes} min, "
                    f"{summary.images_per_second} img/s, {summary.precision}",
                    encoder,
                    "- grayscale: 1-channel images enter the RGB autoencoder as three equal channels; meddiff "
                    "returns the mean of the decoded channels",
                    "- validation grid: validation/final.png (rows: validation/final.txt)",
                ],
            ),
            CardSection(
                title="Use",
                lines=[
                    "```bash",
                    f'meddiff generate --model {run_dir} --prompt "chest x-ray with pleural effusion" --out DIR',
                    f"meddiff serve --model {run_dir}",
                    "```",
                    f"With plain diffusers (BASE = {ft.pretrained}):",
                    "```python",
                    "from diffusers import StableDiffusionPipeline",
                    *use,
                    "```",
                    "",
                    "Synthetic images from this model are not real patients and are not for diagnosis.",
                ],
            ),
        ],
    )


def write_model_card(run_dir: Path, summary: RunSummary) -> Path:
    return write_card(train_card(run_dir, summary), run_dir)


def write_autoencoder_card(
    run_dir: Path, config: TrainConfig, report: AutoencoderReport, training: AutoencoderTraining
) -> Path:
    return write_card(autoencoder_card(run_dir, config, report, training), run_dir)


def write_finetune_card(run_dir: Path, config: TrainConfig, summary: FinetuneSummary) -> Path:
    return write_card(finetune_card(run_dir, config, summary), run_dir)
