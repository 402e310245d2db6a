"""Self-contained HTML reports (images embedded as base64 PNG); model cards are meddiff.evaluation.cards."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

from meddiff.models.card import DISCLAIMER


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def loss_curve_png(history: list[list[float]], title: str = "training loss") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    if history:
        steps = [h[0] for h in history]
        losses = [h[1] for h in history]
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        if len(losses) > window:
            import numpy as np

            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(header: list[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_page(title: str, sections: list[tuple[str, str]]) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        ".warn{background:#fff3cd;border:1px solid #e0c36a;padding:.6em 1em;border-radius:6px}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}"
        "th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        ".grids{display:flex;flex-wrap:wrap;gap:1em}.grids figure{margin:0}"
        "img{image-rendering:pixelated;max-width:100%}figcaption{font-weight:600;margin:.3em 0}"
    )
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{content}</section>" for h, content in sections)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='warn'>{html.escape(DISCLAIMER)}</p>{body}</body></html>"
    )


def figure(caption: str, png: bytes, width: int | None = None) -> str:
    w = f" width='{width}'" if width else ""
    return f"<figure><figcaption>{html.escape(caption)}</figcaption><img src='{png_data_uri(png)}'{w}></figure>"
