"""The web page (gradio): type a prompt or pick findings, get synthetic images, download them with their manifest.
For a 3D volume model: pick labels, get one volume shown with a slice slider per plane (axial, coronal, sagittal),
download its NIfTI.

`meddiff serve --model RUN` starts it on 127.0.0.1. One generation runs at a time; other visitors wait in gradio's
queue (and see their place in it) up to `queue_size`, after which they are told to try again."""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.evaluation.volume_views import PLANES, display_volume, plane_slice, slice_image, slice_slider_html
from meddiff.models.factory import SAMPLERS
from meddiff.serve.service import (
    NOTICE,
    OTHERS,
    ModelService,
    Request,
    ServeLimits,
    VolumeModelService,
    VolumeRequest,
    VolumeResult,
    open_service,
)

logger = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CSS = """
#synthetic-notice {background: #fff4e5; border: 1px solid #f0a020; border-radius: 6px; padding: 8px 12px;
                   color: #5a3b00; font-weight: 600;}
#gallery img {image-rendering: pixelated;}
"""
VIEW_WIDTH = 240  # CSS pixels of each plane's slice in the volume viewer
# how meddiff.evaluation.volume_views shows each plane (radiological convention)
VIEWED_FROM = {"axial": "seen from the feet", "coronal": "seen from the front", "sagittal": "seen from the left"}
VIEWER_CSS = (
    "body{margin:0;font:13px ui-sans-serif,system-ui,sans-serif;color:#222}"
    f".row{{display:flex;flex-wrap:wrap;gap:12px}}figure{{margin:0;width:{VIEW_WIDTH}px}}"
    "figure img{width:100%;image-rendering:pixelated;background:#000}figcaption{margin-bottom:4px}"
    "h4{margin:6px 0}"
)


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network
    try:
        import gradio as gr
    except ImportError:
        raise MeddiffError("the web page needs gradio: pip install 'meddiff[serve]'") from None
    return gr


def _banner(gr):
    return gr.HTML(f'<div id="synthetic-notice-text" role="note">&#9888; {NOTICE}</div>', elem_id="synthetic-notice")


def _header(gr, service, title: str) -> None:
    """The top of both pages: the synthetic-data notice, the title, the model summary and its card."""
    _banner(gr)
    gr.Markdown(f"# meddiff — {title}")
    gr.Markdown(service.summary(), elem_id="model-summary")
    card = service.model_card()
    if card:
        with gr.Accordion("Model card", open=False):
            gr.Markdown(card, elem_id="model-card")


def _steps_and_guidance(gr, lim, default_guidance: float = 2.0):
    """The steps and guidance sliders of both pages, bounded by the service limits; guidance starts at the model's
    own scale."""
    steps = gr.Slider(1, lim.max_steps, value=min(20, lim.max_steps), step=1, label="Steps", elem_id="steps")
    start = min(default_guidance, lim.max_guidance)
    guidance = gr.Slider(0, lim.max_guidance, value=start, step=0.1, label="Guidance scale", elem_id="guidance")
    return steps, guidance


def build_app(service: ModelService | VolumeModelService):
    """The gradio Blocks of the page for one loaded model."""
    if isinstance(service, VolumeModelService):
        return build_volume_app(service)
    gr = require_gradio()
    lim = service.limits
    with gr.Blocks(title="meddiff · synthetic medical images", analytics_enabled=False) as demo:
        _header(gr, service, "synthetic image generator")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    visible=service.takes_prompts,
                    elem_id="prompt",
                    placeholder="chest x-ray with cardiomegaly and pleural effusion",
                )
                negative = gr.Textbox(
                    label="Negative prompt (optional)", visible=service.takes_prompts, elem_id="negative-prompt"
                )
                findings = gr.CheckboxGroup(
                    service.label_names, label="Findings", visible=service.takes_labels, elem_id="findings"
                )
                others = gr.Radio(
                    list(OTHERS),
                    value="absent",
                    label="Unchecked findings are",
                    visible=service.takes_labels,
                    elem_id="others",
                    info="absent: an image with exactly the checked findings "
                    "(nothing checked: none of them); unspecified: the model decides",
                )
                n = gr.Slider(
                    1,
                    lim.max_images,
                    value=min(4, lim.max_images),
                    step=1,
                    label="Number of images",
                    elem_id="n-images",
                )
                steps, guidance = _steps_and_guidance(gr, lim, service.default_guidance)
                scheduler = gr.Dropdown(list(SAMPLERS), value="dpm++", label="Scheduler", elem_id="scheduler")
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                gallery = gr.Gallery(
                    label="Synthetic images",
                    columns=4,
                    object_fit="contain",
                    format="png",
                    elem_id="gallery",
                    interactive=False,
                )
                download = gr.DownloadButton("Download ZIP (images + manifest.csv)", visible=False, elem_id="download")
        gr.Markdown(
            f"Limits: up to {lim.max_images} images and {lim.max_steps} steps a request, prompts up to "
            f"{lim.max_prompt_chars} characters; one request runs at a time, others queue.",
            elem_id="limits",
        )
        _banner(gr)

        def run(
            prompt_text,
            negative_text,
            checked,
            others_value,
            n_value,
            steps_value,
            guidance_value,
            scheduler_value,
            seed_value,
            progress=gr.Progress(),  # noqa: B008 (gradio injects progress through this default)
        ):
            request = Request(
                prompt=prompt_text,
                findings=list(checked or []),
                others=others_value,
                n=n_value,
                steps=steps_value,
                guidance=guidance_value,
                scheduler=scheduler_value,
                seed=seed_value,
                negative_prompt=negative_text,
            )
            try:
                result = service.generate(
                    request, on_step=lambda done, total: progress((done, total), desc="denoising", unit="steps")
                )
            except MeddiffError as exc:  # refused requests and model errors: a message in the page, never a crash
                gr.Warning(str(exc))
                return [], gr.DownloadButton(visible=False), f"**Not generated:** {exc}"
            images = [
                (np.round(np.clip(im, 0, 1) * 255).astype(np.uint8), cap)
                for im, cap in zip(result.images, result.captions)
            ]
            message = (
                f"{len(images)} synthetic image{'' if len(images) == 1 else 's'} in {result.seconds:.1f} s. "
                "Download the ZIP for the PNG files with their manifest.csv."
            )
            return images, gr.DownloadButton(value=str(result.zip_path), visible=True), message

        button.click(
            run,
            [prompt, negative, findings, others, n, steps, guidance, scheduler, seed],
            [gallery, download, status],
            concurrency_limit=1,
            api_name="generate",
        )
    demo.queue(max_size=lim.queue_size, default_concurrency_limit=1)
    return demo


# ----------------------------------------------------------------------------------------------------- volumes
def volume_viewer_html(result: VolumeResult) -> str:
    """The generated volume in three slice sliders (axial, coronal, sagittal) per channel, as one self-contained
    document (meddiff.evaluation.volume_views.slice_slider_html) in a sandboxed iframe: gradio does not run
    scripts put into the page, a document of its own does."""
    rows, height = [], 0
    several = len(result.channel_names) > 1
    for c, name in enumerate(result.channel_names):
        data = display_volume(result.volume, channel=c)
        figures = [  # captions differ per plane: the sliders find their figure by an id made from them
            slice_slider_html(
                result.volume,
                f"{name}, {VIEWED_FROM[plane]}" if several else VIEWED_FROM[plane].capitalize(),
                plane,
                spacing=result.spacing,
                scale=1.0,
                channel=c,
            )
            for plane in PLANES
        ]
        title = f"<h4>{html.escape(name)}</h4>" if several else ""
        rows.append(f"{title}<div class='row'>{''.join(figures)}</div>")
        tallest = 0.0
        for plane in PLANES:  # each slice is shown VIEW_WIDTH wide: its height follows the voxel spacing
            image = slice_image(plane_slice(data, plane, 0), plane, result.spacing, scale=1.0)
            tallest = max(tallest, VIEW_WIDTH * image.height / image.width)
        height += int(tallest) + (100 if several else 70)
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><style>{VIEWER_CSS}</style></head><body>"
        f"<p>Condition: {html.escape(result.caption)}</p>{''.join(rows)}</body></html>"
    )
    return (
        f"<iframe class='volume-viewer' title='slice viewer' sandbox='allow-scripts' "
        f"style='width:100%;height:{height + 40}px;border:0' srcdoc=\"{html.escape(document, quote=True)}\"></iframe>"
    )


@dataclass
class VolumeResponse:
    """What one Generate click on the volume page shows: the viewer, the downloads (None when refused), a status."""

    viewer: str
    nifti: Path | None
    zip_path: Path | None
    message: str
    ok: bool


def respond_volume(service: VolumeModelService, request: VolumeRequest, on_step=None) -> VolumeResponse:
    """Generate one volume for the page; a refused request or a model error is a message, never an exception."""
    try:
        result = service.generate(request, on_step=on_step)
    except MeddiffError as exc:
        return VolumeResponse("", None, None, f"**Not generated:** {exc}", False)
    files = "the NIfTI" if len(result.niftis) == 1 else f"the ZIP ({len(result.niftis)} NIfTI files, one per channel)"
    message = (
        f"1 synthetic volume ({result.caption}) in {result.seconds:.1f} s. Move the sliders to step through the "
        f"slices; download {files} on the training grid, or the ZIP with its manifest.csv."
    )
    return VolumeResponse(volume_viewer_html(result), result.download, result.zip_path, message, True)


def build_volume_app(service: VolumeModelService):
    """The gradio Blocks of the page for a 3D volume model: labels, steps, guidance, seed -> one volume."""
    gr = require_gradio()
    lim = service.limits
    with gr.Blocks(title="meddiff · synthetic medical volumes", analytics_enabled=False) as demo:
        _header(gr, service, "synthetic volume generator")
        with gr.Row():
            with gr.Column(scale=1):
                labels = gr.CheckboxGroup(
                    service.label_names, label="Labels", visible=bool(service.label_names), elem_id="labels"
                )
                others = gr.Radio(
                    list(OTHERS),
                    value="absent",
                    label="Unchecked labels are",
                    visible=bool(service.label_names),
                    elem_id="others",
                    info="absent: a volume with exactly the checked labels "
                    "(nothing checked: none of them); unspecified: the model decides",
                )
                steps, guidance = _steps_and_guidance(gr, lim, service.default_guidance)
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                viewer = gr.HTML("", elem_id="volume-viewer")
                with gr.Row():
                    nifti = gr.DownloadButton("Download NIfTI", visible=False, elem_id="download-nifti")
                    bundle = gr.DownloadButton("Download ZIP (NIfTI + manifest.csv)", visible=False, elem_id="download")
        gr.Markdown(
            f"Limits: one volume and up to {lim.max_steps} steps a request, guidance 0-{lim.max_guidance:g}; one "
            "request runs at a time, others queue.",
            elem_id="limits",
        )
        _banner(gr)

        def run(
            checked,
            others_value,
            steps_value,
            guidance_value,
            seed_value,
            progress=gr.Progress(),  # noqa: B008 (gradio injects progress through this default)
        ):
            request = VolumeRequest(
                labels=list(checked or []),
                others=others_value,
                steps=steps_value,
                guidance=guidance_value,
                seed=seed_value,
            )
            response = respond_volume(
                service,
                request,
                on_step=lambda done, total: progress((done, total), desc="denoising", unit="steps"),
            )
            if not response.ok:
                gr.Warning(response.message.replace("**", ""))
            return (
                response.viewer,
                gr.DownloadButton(value=str(response.nifti) if response.nifti else None, visible=response.ok),
                gr.DownloadButton(value=str(response.zip_path) if response.zip_path else None, visible=response.ok),
                response.message,
            )

        button.click(
            run,
            [labels, others, steps, guidance, seed],
            [viewer, nifti, bundle, status],
            concurrency_limit=1,
            api_name="generate",
        )
    demo.queue(max_size=lim.queue_size, default_concurrency_limit=1)
    return demo


def launch(
    service: ModelService | VolumeModelService, host: str = "127.0.0.1", port: int | None = None, block: bool = True
):
    """Start the page; with block=False return (demo, url) and leave it running in a thread (tests)."""
    gr = require_gradio()
    if host not in LOCAL_HOSTS:
        logger.warning("meddiff serve: listening on %s: anyone who can reach this machine can use the page", host)
    demo = build_app(service)
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # no web fonts from outside
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            quiet=not block,
            prevent_thread_lock=not block,
            allowed_paths=[str(Path(service.work))],
            theme=theme,
            css=CSS,
            max_file_size="1mb",
            show_error=False,
        )
    except OSError as exc:
        raise MeddiffError(f"could not start the web server on {host}:{port}: {str(exc).splitlines()[0]}") from None
    return demo, demo.local_url


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    limits: ServeLimits | None = None,
    device: str | None = None,
    volume: bool = False,
    allow_failed_audit: bool = False,
) -> None:
    """Load the model (a 3D volume model with volume=True) and serve its page until interrupted."""
    from meddiff.devices import run_device

    service = open_service(
        model, limits, device=run_device(device), volume=volume, allow_failed_audit=allow_failed_audit
    )
    try:
        launch(service, host, port, block=True)
    finally:
        service.close()
