"""Plots (PNG, matplotlib) and a self-contained HTML report of an evaluation.

The HTML inlines every image as a base64 ``data:`` URI, so the single file
opens in a browser from disk or an e-mail, without a server.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.constants import IGNORE_LABEL, voc_palette
from pipeline.evaluation.scoring import Evaluation

#: Band widths listed in the report's trimap table (the plots show all of them).
TABLE_WIDTHS = (1, 2, 3, 5, 10, 20, 40)
OVERLAY_ALPHA = 0.55
VOID_RGB = (255, 255, 255)
SAMPLE_MIN_SIDE = 160  # small images are enlarged (nearest) to at least this size in the report


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)
    return buf.getvalue()


def plot_trimap(evaluation: Evaluation, *, metric: str) -> bytes:
    """PNG of ``metric`` ("pixel_accuracy" or "miou") in the boundary band vs its width, one line per method."""
    if metric not in ("pixel_accuracy", "miou"):
        raise ValueError(f"metric: expected 'pixel_accuracy' or 'miou', got {metric!r}")
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, scores in evaluation.scores.items():
        values = getattr(scores.trimap, metric)()
        ax.plot(scores.trimap.widths, 100 * values, marker="o", markersize=3, label=method)
    ax.set_xlabel("trimap band width (pixels)")
    ax.set_ylabel({"pixel_accuracy": "pixel accuracy (%)", "miou": "mean IoU (%)"}[metric])
    ax.set_title(f"Boundary {'accuracy' if metric == 'pixel_accuracy' else 'mIoU'} vs band width")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_class_iou(evaluation: Evaluation) -> bytes:
    """PNG of per-class IoU bars, grouped by method."""
    plt = _figure()
    names = evaluation.class_names
    methods = evaluation.methods
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) * max(1, len(methods))), 4))
    x = np.arange(len(names))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        iou = np.nan_to_num(evaluation.scores[method].confusion.iou(), nan=0.0)
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, 100 * iou, width=width, label=method)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-class IoU")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 H x W x 3 colours of class ids (void 255 white, ids beyond the palette black)."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    table[IGNORE_LABEL] = VOID_RGB
    return table[np.asarray(labels, dtype=np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    colors = colorize(labels, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - OVERLAY_ALPHA) + colors * OVERLAY_ALPHA).astype(np.uint8)


def png_bytes(array: np.ndarray, *, min_side: int = SAMPLE_MIN_SIDE) -> bytes:
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    scale = max(1, -(-min_side // max(1, min(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pct(value: float) -> str:
    return "–" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:0 12px 12px 0;vertical-align:top}
figcaption{font-size:0.85em;color:#555;text-align:center}
.sample img{image-rendering:pixelated;max-width:260px}
pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.85em}
"""


def render_html(
    evaluation: Evaluation,
    *,
    plots: dict[str, bytes],
    samples: Sequence[tuple[str, dict[str, bytes]]],
    title: str = "DeepLab V1 evaluation",
) -> str:
    """The report as one HTML string (plots and sample panels inlined)."""
    methods = evaluation.methods
    summary = _table(
        ["method", "mIoU", "pixel accuracy", "mean class accuracy"],
        [
            [m, _pct(s.confusion.miou()), _pct(s.confusion.pixel_accuracy()), _pct(s.confusion.mean_class_accuracy())]
            for m, s in evaluation.scores.items()
        ],
    )
    ious = {m: evaluation.scores[m].confusion.iou() for m in methods}
    per_class = _table(
        ["class", *[f"IoU {m}" for m in methods]],
        [[name, *[_pct(ious[m][i]) for m in methods]] for i, name in enumerate(evaluation.class_names)],
    )
    widths = [w for w in TABLE_WIDTHS if w <= evaluation.max_width]
    trimap_rows = []
    for m, s in evaluation.scores.items():
        acc, miou = s.trimap.pixel_accuracy(), s.trimap.miou()
        trimap_rows.append([f"{m} accuracy", *[_pct(acc[w - 1]) for w in widths]])
        trimap_rows.append([f"{m} mIoU", *[_pct(miou[w - 1]) for w in widths]])
    trimap = _table(["band width (px)", *[str(w) for w in widths]], trimap_rows)

    figures = "".join(
        f'<figure><img alt="{html.escape(name)}" src="{data_uri(png)}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, png in plots.items()
    )
    sample_html = []
    for image_id, panels in samples:
        cells = "".join(
            f'<figure><img alt="{html.escape(image_id)} {html.escape(p)}" src="{data_uri(png)}">'
            f"<figcaption>{html.escape(p)}</figcaption></figure>"
            for p, png in panels.items()
        )
        sample_html.append(f'<div class="sample"><h3>{html.escape(image_id)}</h3>{cells}</div>')
    meta = html.escape(json.dumps(evaluation.meta, indent=2, default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{evaluation.num_images} images; metrics from one confusion matrix accumulated over the set (ignore label {IGNORE_LABEL}).</p>
<h2>Summary</h2>{summary}
<h2>Boundary accuracy (trimap)</h2>
<p>Scored only within a band of the given width around ground-truth boundaries (label edges and void pixels; Euclidean distance).</p>
{trimap}
<h2>Plots</h2>{figures}
<h2>Per-class IoU</h2>{per_class}
<h2>Samples</h2>
<p>Overlays: ground truth (void in white), then each method's prediction.</p>
{''.join(sample_html) or '<p>none</p>'}
<h2>Run</h2><pre>{meta}</pre>
</body></html>
"""


def write_report(
    out_dir: str | Path,
    evaluation: Evaluation,
    *,
    samples: dict[str, dict[str, np.ndarray]],
    load_example: Callable[[str], tuple[np.ndarray, np.ndarray]],
    palette: Sequence[Sequence[int]] | None = None,
    title: str = "DeepLab V1 evaluation",
) -> dict[str, Path]:
    """Write the plots (PNG) and ``report.html`` under ``out_dir``; returns their paths.

    ``samples[image_id][method]`` are predicted label maps; ``load_example(image_id)``
    gives that image's (RGB, ground truth).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette = palette or voc_palette(len(evaluation.class_names))
    plots = {
        "trimap_accuracy": plot_trimap(evaluation, metric="pixel_accuracy"),
        "trimap_miou": plot_trimap(evaluation, metric="miou"),
        "class_iou": plot_class_iou(evaluation),
    }
    paths: dict[str, Path] = {}
    for name, png in plots.items():
        paths[name] = out / f"{name}.png"
        paths[name].write_bytes(png)
    panels = []
    for image_id, masks in samples.items():
        image, gt = load_example(image_id)
        entry = {"image": png_bytes(image), "ground truth": png_bytes(overlay(image, gt, palette))}
        for method in evaluation.methods:
            if method in masks:
                entry[method] = png_bytes(overlay(image, masks[method], palette))
        panels.append((image_id, entry))
    paths["html"] = out / "report.html"
    paths["html"].write_text(render_html(evaluation, plots=plots, samples=panels, title=title), encoding="utf-8")
    return paths
