"""The web page (gradio): type a prompt or pick findings, get synthetic images, download them with their manifest.

`meddiff serve --model RUN` starts it on 127.0.0.1. One generation runs at a time; other visitors wait in gradio's
queue (and see their place in it) up to `queue_size`, after which they are told to try again."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from meddiff.errors import MeddiffError
from meddiff.models.factory import SAMPLERS
from meddiff.serve.service import NOTICE, OTHERS, ModelService, Request, ServeLimits

logger = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CSS = """
#synthetic-notice {background: #fff4e5; border: 1px solid #f0a020; border-radius: 6px; padding: 8px 12px;
                   color: #5a3b00; font-weight: 600;}
#gallery img {image-rendering: pixelated;}
"""


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed network
    try:
        import gradio as gr
    except ImportError:
        raise MeddiffError("the web page needs gradio: pip install 'meddiff[serve]'") from None
    return gr


def _banner(gr):
    return gr.HTML(f'<div id="synthetic-notice-text" role="note">&#9888; {NOTICE}</div>', elem_id="synthetic-notice")


def build_app(service: ModelService):
    """The gradio Blocks of the page for one loaded model."""
    gr = require_gradio()
    lim = service.limits
    with gr.Blocks(title="meddiff · synthetic medical images", analytics_enabled=False) as demo:
        _banner(gr)
        gr.Markdown("# meddiff — synthetic image generator")
        gr.Markdown(service.summary(), elem_id="model-summary")
        card = service.model_card()
        if card:
            with gr.Accordion("Model card", open=False):
                gr.Markdown(card, elem_id="model-card")
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
                steps = gr.Slider(
                    1, lim.max_steps, value=min(20, lim.max_steps), step=1, label="Steps", elem_id="steps"
                )
                guidance = gr.Slider(
                    0,
                    lim.max_guidance,
                    value=min(2.0, lim.max_guidance),
                    step=0.1,
                    label="Guidance scale",
                    elem_id="guidance",
                )
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


def launch(service: ModelService, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
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
) -> None:
    from meddiff.devices import run_device

    service = ModelService(model, limits, device=run_device(device))
    try:
        launch(service, host, port, block=True)
    finally:
        service.close()
