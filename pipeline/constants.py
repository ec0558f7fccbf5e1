"""One source of truth for the constants of DeepLab V1 and PASCAL VOC.

Everything that the released Caffe weights assume (mean, channel order, output
stride) and everything the VOC format fixes (class names, palette, ignore label)
lives here and only here.
"""

from __future__ import annotations

# Pre-processing of the released DeepLab weights: BGR, 0..255, minus this mean.
MEAN_BGR: tuple[float, float, float] = (104.008, 116.669, 122.675)
CHANNEL_ORDER = "BGR"

# The network's score map is dense at 1/8 of the input.
OUTPUT_STRIDE = 8

# Test-time input of the released models (images are padded bottom/right to it).
DEFAULT_INPUT_SIZE = 513

# Label value that is excluded from losses and metrics (VOC's "void").
IGNORE_LABEL = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(num_colors: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved label -> RGB), as the devkit builds it."""
    palette = []
    for label in range(num_colors):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


def flat_palette(palette: list[tuple[int, int, int]] | None = None) -> list[int]:
    """A 768-long flat list for ``PIL.Image.putpalette`` (padded with the VOC map)."""
    base = voc_palette(256)
    if palette:
        base[: len(palette)] = [tuple(int(v) for v in c) for c in palette]
    return [v for rgb in base for v in rgb]
