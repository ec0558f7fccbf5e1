"""Working resolution: the size at which an image is refined, and how results return to its original size.

A 12-megapixel photo is decoded at its original size (after EXIF orientation), but
nothing after the decoder needs that many pixels:

* the network (resize mode) sees the photo shrunk so its longer side is the
  checkpoint's ``input_size`` (513 for the paper's models); its scores hold no
  detail beyond that;
* the dense CRF's parameters were tuned on PASCAL images of about that size
  (sigma_alpha = 121 px spans a quarter of a 500-px image, 3 % of a 4032-px one).

So by default (``crf.resolution: network``) the image is shrunk once, in the decode
stage, to the network's size; the network and the CRF work on it, and only the CRF's
marginals come back to the original size (bilinear, half-pixel centres, in bands
of rows), for the mask, the statistics and the confidence. ``crf.resolution: full``
refines at the original size (what the first release did); an integer caps the
longer side at that many pixels. The one rule of every shrink is :func:`fitted_shape`
and :func:`shrink` (the network's own input resize uses them too).
"""

from __future__ import annotations

import numpy as np

NETWORK = "network"
FULL = "full"
#: Named values of ``crf.resolution``; an integer (a longer side in pixels) is the third form.
RESOLUTIONS: tuple[str, ...] = (NETWORK, FULL)
#: Smallest longer side a working resolution may ask for (8 network output cells).
MIN_SIDE = 65
#: Bytes of working arrays per band of rows when returning results to the original size.
BAND_BYTES = 64 << 20


def check_resolution(value: object, *, name: str = "crf.resolution") -> str | int:
    """``network``, ``full`` or a longer side >= :data:`MIN_SIDE` px; anything else is a ValueError naming ``name``."""
    if isinstance(value, str) and value in RESOLUTIONS:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= MIN_SIDE:
        return value
    raise ValueError(f"{name}: expected 'network', 'full' or a longer side in pixels >= {MIN_SIDE}, got {value!r}")


def max_side(resolution: str | int, *, input_size: int) -> int | None:
    """The longer side the image is refined at (None = its original size)."""
    resolution = check_resolution(resolution)
    if resolution == NETWORK:
        return int(input_size)
    if resolution == FULL:
        return None
    return int(resolution)


def fitted_shape(height: int, width: int, side: int | None) -> tuple[int, int]:
    """(h, w) of an image shrunk so its longer side is at most ``side`` (aspect kept; never enlarged)."""
    if side is None or max(height, width) <= side:
        return int(height), int(width)
    scale = side / max(height, width)
    return (max(1, min(side, round(height * scale))), max(1, min(side, round(width * scale))))


def shrink(image: np.ndarray, side: int | None) -> np.ndarray:
    """``image`` (uint8 H x W x 3) with its longer side at most ``side``: Pillow bilinear (antialiased)."""
    height, width = fitted_shape(image.shape[0], image.shape[1], side)
    if (height, width) == image.shape[:2]:
        return image
    from PIL import Image

    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized)


def resample_scores(scores, size: tuple[int, int]):
    """C x h x w torch scores onto another coarse grid (bilinear, corners aligned; antialiased when shrinking).

    Coarse grids sample an image at pixels 0, 8, 16, ..., so the corners of two grids
    of one image are the same points.
    """
    import torch.nn.functional as F

    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    shrinking = size[0] < scores.shape[-2] or size[1] < scores.shape[-1]
    return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=True,
                         antialias=shrinking)[0]


def label_statistics(probs: np.ndarray) -> tuple[np.ndarray, list[int], list[float]]:
    """C x H x W probabilities -> (labels uint8 H x W, pixels per class, mean confidence per class; NaN if absent)."""
    num_classes = probs.shape[0]
    labels = probs.argmax(axis=0)
    confidence = np.take_along_axis(probs, labels[None], axis=0)[0].astype(np.float64)
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return labels.astype(np.uint8), counts.astype(np.int64).tolist(), mean_conf.astype(np.float32).tolist()


def source_positions(target: int, source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling of ``source`` cells at ``target`` cells (half-pixel centres, as torch's
    ``align_corners=False`` and :func:`shrink`): (lower index, upper index, weight of the upper), per target cell."""
    position = np.maximum((np.arange(target) + 0.5) * (source / target) - 0.5, 0.0)
    low = np.minimum(np.floor(position).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (position - low).astype(np.float32)


class Quality:
    """Per-image quality of the marginals, gathered while they return to the original size.

    At the original size (exact): the mean of the chosen class's marginal (``mean_confidence``),
    the pixels whose marginal is below ``ignore_below`` (``ignored_pixels``; they become the
    ignore label in training data) and their share above it (``confident_fraction``), both judged
    on the marginal as the 8-bit confidence map stores it (``pipeline.training.rules``: the
    labels of ``segment --training`` and of a later ``export`` then agree pixel for pixel); with
    ``keep_map`` the 8-bit confidence map (255 = 1.0, 1 byte per pixel). At the working
    resolution (cheap, and where the CRF made its decisions): the mean entropy of the
    marginals in nats (``mean_entropy``) and the mean IoU between the network's labels and
    the CRF's over the classes either one uses (``crf_agreement``; 1.0 without a CRF).
    """

    def __init__(self, height: int, width: int, *, ignore_below: float = 0.0, keep_map: bool = False) -> None:
        self.pixels = int(height) * int(width)
        self.ignore_below = float(ignore_below)
        from pipeline.training.rules import confidence_cutoff

        self.cutoff = confidence_cutoff(self.ignore_below)
        self.sum = 0.0
        self.ignored = 0
        self.map = np.empty((height, width), dtype=np.uint8) if keep_map else None
        self.mean_entropy: float | None = None
        self.agreement: float | None = None

    def add_confidence(self, confidence: np.ndarray, *, top: int) -> None:
        self.sum += float(confidence.sum(dtype=np.float64))
        if self.ignore_below <= 0 and self.map is None:
            return
        stored = np.clip(np.rint(confidence * 255.0), 0, 255).astype(np.uint8)  # the 8-bit map, as stored
        if self.ignore_below > 0:  # the rule of pipeline.training.rules, on the stored value
            self.ignored += int(np.count_nonzero(stored < self.cutoff))
        if self.map is not None:
            self.map[top : top + confidence.shape[0]] = stored

    def add_working(self, probs: np.ndarray, network_probs: np.ndarray | None) -> None:
        """Entropy of ``probs`` and the agreement of their argmax with ``network_probs``' (C x h x w each)."""
        clipped = np.clip(probs, 1e-12, 1.0)
        self.mean_entropy = float(-(probs * np.log(clipped)).sum(axis=0).mean())
        if network_probs is None:
            self.agreement = 1.0
            return
        a, b = probs.argmax(axis=0).ravel(), network_probs.argmax(axis=0).ravel()
        classes = np.union1d(np.unique(a), np.unique(b))
        ious = [np.count_nonzero((a == k) & (b == k)) / max(np.count_nonzero((a == k) | (b == k)), 1) for k in classes]
        self.agreement = float(np.mean(ious))

    def row(self) -> dict[str, float | int]:
        """The segments row's quality columns."""
        return {
            "mean_confidence": self.sum / max(self.pixels, 1),
            "confident_fraction": 1.0 - self.ignored / max(self.pixels, 1),
            "ignored_pixels": self.ignored,
            "mean_entropy": self.mean_entropy,
            "crf_agreement": self.agreement,
        }


def upsample_bands(probs: np.ndarray, height: int, width: int, *, band_bytes: int = BAND_BYTES):
    """Yield (first row, C x b x width float32 torch band) of ``probs`` (C x h x w) bilinearly upsampled
    (half-pixel centres) to height x width: one ``F.interpolate(..., align_corners=False)`` of the
    whole map, a band of rows at a time."""
    import torch
    import torch.nn.functional as F

    num_classes, h, _ = probs.shape
    source = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    y0, y1, wy = source_positions(height, h)
    band = max(1, band_bytes // (4 * num_classes * width))
    for top in range(0, height, band):
        rows = slice(top, min(top + band, height))
        weight = torch.from_numpy(wy[rows]).view(1, -1, 1)
        mixed = source[:, torch.from_numpy(y0[rows])] * (1 - weight) + source[:, torch.from_numpy(y1[rows])] * weight
        # rows are in place already: the height of the interpolation below is the identity
        yield top, F.interpolate(mixed[None], size=(mixed.shape[1], width), mode="bilinear", align_corners=False)[0]


def to_original(
    probs: np.ndarray, height: int, width: int, *, band_bytes: int = BAND_BYTES, quality: Quality | None = None,
) -> tuple[np.ndarray, list[int], list[float]]:
    """:func:`label_statistics` of ``probs`` (C x h x w) bilinearly upsampled to height x width.

    At the working resolution itself this is ``label_statistics(probs)`` exactly.
    Otherwise only the candidate classes are upsampled: per-pixel marginals sum to 1,
    so the winner of any pixel, upsampled or not, has a marginal >= 1/C, and a class
    below 1/C at every working pixel stays below it after bilinear mixing and can
    never win. A photo has a handful of candidates out of 21 classes. Memory beyond
    the uint8 labels is one band of rows (``band_bytes``), however large the original.
    """
    if probs.shape[1:] == (height, width):
        labels, counts, mean_conf = label_statistics(probs)
        if quality is not None:
            quality.add_confidence(np.take_along_axis(probs, labels[None].astype(np.int64), axis=0)[0], top=0)
        return labels, counts, mean_conf
    num_classes = probs.shape[0]
    peak = probs.reshape(num_classes, -1).max(axis=1)
    candidates = np.flatnonzero(peak >= peak.max() if num_classes == 1 else peak >= (1.0 / num_classes) * (1 - 1e-6))
    labels = np.empty((height, width), dtype=np.uint8)
    counts = np.zeros(num_classes, dtype=np.int64)
    sums = np.zeros(num_classes, dtype=np.float64)
    for top, band in upsample_bands(probs[candidates], height, width, band_bytes=band_bytes):
        confidence, index = band.max(dim=0)
        chosen = candidates[index.numpy()].astype(np.uint8)
        labels[top : top + chosen.shape[0]] = chosen
        if quality is not None:
            quality.add_confidence(confidence.numpy(), top=top)
        counts += np.bincount(chosen.ravel(), minlength=num_classes)
        sums += np.bincount(chosen.ravel(), weights=confidence.numpy().ravel(), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return labels, counts.tolist(), mean_conf.astype(np.float32).tolist()


def describe(resolution: str | int) -> str:
    """How a resolution setting reads in messages and records ("network", "full", "1024")."""
    return str(check_resolution(resolution))


__all__ = [
    "BAND_BYTES", "FULL", "Quality", "MIN_SIDE", "NETWORK", "RESOLUTIONS", "check_resolution", "describe", "fitted_shape",
    "label_statistics", "max_side", "resample_scores", "shrink", "source_positions", "to_original", "upsample_bands",
]
