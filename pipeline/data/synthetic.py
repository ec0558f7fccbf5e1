"""A procedurally generated VOC-format dataset: textured shapes over varied backgrounds.

It exists so the pipeline can be trained, evaluated and demonstrated without
downloading anything. Each image is fully determined by ``(seed, index)``, so
``generate_dataset`` is reproducible bit for bit. Objects carry a class-typical
hue and a random texture (flat, stripes, checks, dots, noise); backgrounds are
desaturated gradients, noise and clutter lines. Ground truth has a thin void
(255) band along object boundaries, as PASCAL VOC's annotations do.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.constants import IGNORE_LABEL, flat_palette
from pipeline.data.voc import IMAGE_DIR, LABEL_DIR, SPLIT_DIR, write_label_png

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square", "triangle", "star")
# Typical hue of each object class (0..1), jittered per object.
CLASS_HUES: dict[str, float] = {"disc": 0.0, "square": 0.33, "triangle": 0.62, "star": 0.15}
TEXTURES = ("flat", "stripes", "checks", "dots", "noise")
VOID_BAND = 1  # pixels of ignore label on each side of an object boundary
JPEG_QUALITY = 92


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _upscale(values: np.ndarray, scale: int) -> np.ndarray:
    """Per-pixel random draws made at the base size, repeated ``scale`` x ``scale``: the same scene at any scale."""
    return values if scale == 1 else np.repeat(np.repeat(values, scale, axis=0), scale, axis=1)


def _background(rng: np.random.Generator, height: int, width: int, scale: int = 1) -> np.ndarray:
    """Base ``height`` x ``width``; drawn at ``scale`` x that size."""
    yy, xx = np.mgrid[0 : height * scale, 0 : width * scale].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx / (width * scale) + np.sin(angle) * yy / (height * scale) + 1) / 2
    c0 = _hsv(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
    c1 = _hsv(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
    image = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    image += _upscale(rng.normal(0, rng.uniform(2, 18), size=(height, width, 3)), scale)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 6)):  # clutter lines
        grey = int(rng.integers(0, 256))
        pts = [(int(rng.integers(0, width)) * scale, int(rng.integers(0, height)) * scale) for _ in range(2)]
        draw.line(pts, fill=(grey, grey, grey), width=int(rng.integers(1, 4)) * scale)
    return np.asarray(canvas, dtype=np.float32)


def _texture(rng: np.random.Generator, height: int, width: int, hue: float, scale: int = 1) -> np.ndarray:
    base = _hsv(hue + rng.normal(0, 0.03), rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0))
    alt = _hsv(hue + rng.normal(0, 0.03), rng.uniform(0.4, 1.0), rng.uniform(0.25, 0.8))
    yy, xx = np.mgrid[0 : height * scale, 0 : width * scale].astype(np.float32)
    kind = TEXTURES[rng.integers(len(TEXTURES))]
    period = rng.uniform(4, 12) * scale
    if kind == "flat":
        t = np.zeros((height * scale, width * scale), np.float32)
    elif kind == "stripes":
        a = rng.uniform(0, math.pi)
        t = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "checks":
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    elif kind == "dots":
        t = ((np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)) > 0.5).astype(np.float32)
    else:
        t = _upscale(rng.uniform(0, 1, size=(height, width)).astype(np.float32), scale)
    return base * (1 - t[..., None]) + alt * t[..., None]


def _shape_mask(rng: np.random.Generator, name: str, height: int, width: int, scale: int = 1) -> np.ndarray:
    side = min(height, width)
    r = rng.uniform(0.2, 0.34) * side
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    rot = rng.uniform(0, 2 * math.pi)
    r, cx, cy = r * scale, cx * scale, cy * scale
    mask = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(mask)
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        if name == "square":
            radii, n = [r * 1.1] * 4, 4
        elif name == "triangle":
            radii, n = [r * 1.25] * 3, 3
        else:  # star
            radii, n = [r * 1.3, r * 0.55] * 5, 10
        pts = [
            (cx + radii[k] * math.cos(rot + 2 * math.pi * k / n), cy + radii[k] * math.sin(rot + 2 * math.pi * k / n))
            for k in range(n)
        ]
        draw.polygon(pts, fill=1)
    return np.asarray(mask, dtype=bool)


def _void_band(labels: np.ndarray, band: int) -> np.ndarray:
    """Pixels within ``band`` of a label change (chessboard distance)."""
    h, w = labels.shape
    padded = np.pad(labels, band, mode="edge")
    edge = np.zeros((h, w), dtype=bool)
    for dy in range(-band, band + 1):
        for dx in range(-band, band + 1):
            edge |= padded[band + dy : band + dy + h, band + dx : band + dx + w] != labels
    return edge


def render_sample(
    seed: int, index: int, *, min_size: int = 96, max_size: int = 160, scale: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 H x W x 3, label uint8 H x W) pair, determined by (seed, index).

    ``scale`` renders the same scene ``scale`` times larger (sides, shapes, texture
    periods, line widths and the void band scale; per-pixel noise is drawn at the base
    size and repeated), so an evaluation at ``scale`` 4 asks what 4x-larger photos of
    the same content cost and score. ``scale`` 1 is the dataset the demo model saw.
    """
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected an integer >= 1, got {scale!r}")
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image = _background(rng, height, width, scale)
    labels = np.zeros((height * scale, width * scale), dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        name = CLASS_NAMES[class_id]
        mask = _shape_mask(rng, name, height, width, scale)
        image[mask] = _texture(rng, height, width, CLASS_HUES[name], scale)[mask]
        labels[mask] = class_id
    image = np.clip(image + _upscale(rng.normal(0, 3, size=(height, width, 3)), scale), 0, 255).astype(np.uint8)
    labels[_void_band(labels, VOID_BAND * scale)] = IGNORE_LABEL
    return image, labels


def generate_dataset(
    root: str | Path, *, num_train: int = 400, num_val: int = 100, seed: int = 0,
    min_size: int = 96, max_size: int = 160, scale: int = 1,
) -> Path:
    """Write a VOC-format folder with ``train`` and ``val`` splits (at ``scale``, see :func:`render_sample`)."""
    root = Path(root)
    for sub in (IMAGE_DIR, LABEL_DIR, SPLIT_DIR):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = flat_palette()
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        ids = []
        for index in indices:
            image_id = f"shapes_{index:05d}"
            image, labels = render_sample(seed, index, min_size=min_size, max_size=max_size, scale=scale)
            Image.fromarray(image).save(root / IMAGE_DIR / f"{image_id}.jpg", quality=JPEG_QUALITY)
            write_label_png(root / LABEL_DIR / f"{image_id}.png", labels, palette=palette)
            ids.append(image_id)
        (root / SPLIT_DIR / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def deeplab_like_logits(
    *,
    seed: int,
    num_classes: int = 21,
    height: int,
    width: int,
    scale: float = 8.0,
) -> np.ndarray:
    """Random-but-smooth network scores for CRF tests and benchmarks: float32 C x H x W.

    DeepLab's test path on made-up scores: a coarse map on the 1/8 grid of the padded
    S x S input (S = the smallest 8k+1 >= the largest side), smoothed (3x3 mean, x ``scale``),
    then ``pipeline.preprocess.upsample_logits`` (x8 bilinear, align_corners, crop).
    """
    import torch
    import torch.nn.functional as F

    from pipeline.preprocess import aligned_size, coarse_size, upsample_logits

    side = coarse_size(aligned_size(max(height, width)))
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((num_classes, side, side), generator=generator)
    coarse = F.avg_pool2d(coarse[None], kernel_size=3, stride=1, padding=1, count_include_pad=False)[0] * scale
    up = upsample_logits(coarse, height=height, width=width)
    return np.ascontiguousarray(up.numpy(), dtype=np.float32)


def noise_image(*, seed: int, height: int, width: int) -> np.ndarray:
    """Uniform RGB noise, uint8 H x W x 3: the dense CRF's worst case (~14x a photo's lattice)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
