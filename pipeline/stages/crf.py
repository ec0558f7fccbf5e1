"""Working-resolution pixels + coarse logits -> mask and per-class statistics at the original size.

Upsample x8, dense CRF (or softmax) at the working resolution, then the marginals
return to the original size a band of rows at a time (:mod:`pipeline.resolution`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.devices import resolve_device
from pipeline.faults import inject
from pipeline.io.uris import _describe
from pipeline.preprocess import coarse_size
from pipeline.resolution import Quality, label_statistics, to_original
from pipeline.stages.common import (
    CRF_COLUMNS,
    each_row,
    fail,
    failure_kind,
    is_pending,
    node_id,
    to_rows,
    to_table,
)
from pipeline.stages.decode import pixels_of, pixels_shape


def logits_of(row) -> np.ndarray:
    """A network row's coarse scores, fp16 C x coarse(h) x coarse(w) over its ``pixels`` (the ``logits`` layout)."""
    height, width = pixels_shape(row)
    shape = (int(row["num_classes"]), coarse_size(height), coarse_size(width))
    return np.frombuffer(row["logits"], dtype=np.float16).reshape(shape)


def work_probabilities(
    images: Sequence[np.ndarray], logits: Sequence[np.ndarray], params=None, *, backend: str = "pydensecrf",
    device: str = "cpu",
) -> list[np.ndarray]:
    """Per image (at its working resolution): coarse logits upsampled x8 to h x w, then the dense CRF's
    marginals with ``params``, or the softmax without (``params`` None). float32 C x h x w each."""
    return network_and_crf(images, logits, params, backend=backend, device=device, network=False)[1]


def network_and_crf(
    images: Sequence[np.ndarray], logits: Sequence[np.ndarray], params=None, *, backend: str = "pydensecrf",
    device: str = "cpu", network: bool = True,
) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """``(network softmax, marginals)`` per image from one x8 upsampling of the logits: the marginals
    are :func:`work_probabilities`'; the softmax is None without ``network`` (and is the
    marginals themselves when ``params`` is None)."""
    import torch

    from pipeline.preprocess import upsample_logits

    full = [
        upsample_logits(torch.from_numpy(np.asarray(scores, dtype=np.float32)), height=image.shape[0],
                        width=image.shape[1]).float()
        for image, scores in zip(images, logits, strict=True)
    ]
    softmax = [torch.softmax(f, dim=0).numpy() for f in full] if network or params is None else [None] * len(full)
    if params is None:
        return softmax, softmax
    from pipeline.crf import refine_batch

    return softmax, refine_batch(
        [np.array(image, dtype=np.uint8, order="C") for image in images],  # writable: pydensecrf needs it
        [np.ascontiguousarray(f.numpy()) for f in full], params, backend=backend, device=device,
    )


class CRFStage:
    """pixels + coarse logits -> mask at the original size: upsample x8, dense CRF (or softmax), argmax.

    ``params`` is a :class:`pipeline.crf.CRFParams` (or None for no CRF); ``backend`` is
    ``pydensecrf`` (CPU, one image at a time) or ``torch`` (``device`` cpu/cuda/auto,
    batched; a failing batch is retried per image). The CRF runs on the row's
    ``pixels`` (its working resolution); its marginals are upsampled to ``height`` x
    ``width`` for the mask and the statistics. Images whose working resolution is over
    ``max_pixels``, and images the CRF rejects (e.g. pydensecrf's key range on very
    wide images), become error rows. Peak memory per image: the CRF at the working
    resolution, plus the uint8 mask (and the uint8 confidence map with ``confidence``) and one
    band (:data:`pipeline.resolution.BAND_BYTES`) at the original size. Each row also gets
    its quality scores (:class:`pipeline.resolution.Quality`; ``ignore_below`` is the
    threshold of ``confident_fraction`` / ``ignored_pixels``).
    """

    def __init__(
        self, *, params=None, backend: str = "pydensecrf", device: str = "cpu", threads: int = 1,
        max_pixels: int | None = None, ignore_below: float = 0.0, confidence: bool = False,
    ) -> None:
        import torch

        from pipeline.config import DEFAULT_CRF_MAX_PIXELS

        self.params, self.backend = params, backend
        self.ignore_below, self.confidence = ignore_below, confidence
        self.max_pixels = DEFAULT_CRF_MAX_PIXELS if max_pixels is None else max_pixels
        self.device = str(resolve_device(device)) if backend == "torch" else "cpu"
        if threads > 0:
            torch.set_num_threads(threads)

    def _labels(self, items) -> list[tuple]:
        """Per item: (labels, class pixels, class mean confidence, quality row, 8-bit confidence map or None)."""
        inject("crf", [uri for *_, uri in items])
        images, logits = [image for image, *_ in items], [scores for _, scores, *_ in items]
        network, probs = network_and_crf(images, logits, self.params, backend=self.backend, device=self.device,
                                         network=self.params is not None)  # the network's, for crf_agreement
        if self.params is None:
            network = [None] * len(items)
        out = []
        for p, net, (_, _, size, _) in zip(probs, network, items, strict=True):
            quality = Quality(*size, ignore_below=self.ignore_below, keep_map=self.confidence)
            quality.add_working(p, net)
            labels, counts, confidence = to_original(p, *size, quality=quality)
            out.append((labels, counts, confidence, quality.row(), quality.map))
        return out

    def _release(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending, items = [], []
        for row in (r for r in rows if is_pending(r)):
            height, width = pixels_shape(row)
            if self.params is not None and height * width > self.max_pixels:
                fail(row, f"too large for the CRF ({width}x{height} = {height * width} pixels at the working "
                          f"resolution > crf.max_pixels {self.max_pixels}; lower crf.resolution)")
                continue
            items.append((pixels_of(row), logits_of(row), (int(row["height"]), int(row["width"])), row["source_uri"]))
            pending.append(row)
        results = each_row(self._labels, items, batched=self.backend == "torch", after_failure=self._release)
        done = []
        for row, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                fail(row, f"CRF failed: {_describe(result)}", kind=failure_kind(result))
                continue
            labels, counts, confidence, quality, confidence_map = result
            row.update(mask=labels.tobytes(), class_pixels=counts, class_mean_confidence=confidence, **quality,
                       confidence=None if confidence_map is None else confidence_map.tobytes())
            done.append(row)
        per_image = (time.perf_counter() - start) / max(len(done), 1)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        for row in rows:
            if not is_pending(row):
                row.update(mask=None, class_pixels=None, class_mean_confidence=None, confidence=None)
            row.update(node_crf=node, t_crf=per_image if is_pending(row) else 0.0, crf_rss_mb=rss_mb)
        return to_table(rows, CRF_COLUMNS)


__all__ = ["CRFStage", "label_statistics", "logits_of", "network_and_crf", "work_probabilities"]
