"""The job's stages as plain callables on batches: ``stage(batch) -> batch``.

Each stage does one thing, takes a ``pyarrow.Table`` (or a dict of lists, for
tests) and returns a ``pyarrow.Table`` with the columns the next stage needs
(heavy columns are dropped as soon as they are used). They know nothing about
Ray beyond recording the node they ran on; :mod:`pipeline.graph` wires them.

Rows carry ``status``: ``ok`` rows are worked on; ``error`` rows (with a one-line
``error``) and ``skipped`` rows (already in the output: counted, not written)
pass through untouched, so every input reaches the writer exactly once.

Column flow::

    source        image_id, source_uri (or shard_uri / manifest rows)
    read/expand   + data (bytes), status, error, t_read, node_read
    decode        - data, + pixels (H*W*3 RGB bytes), width, height, t_decode, node_decode
    network       + logits (fp16 C x h x w bytes at 1/8), t_network, node_network
    crf           - pixels, - logits, + mask (H*W uint8 bytes), class_pixels,
                  class_mean_confidence, crf_rss_mb, t_crf, node_crf
    write         - mask, + mask_uri; commits masks and one segments file per batch
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.io.ids import image_id_for
from pipeline.io.sources import IMAGE_EXTENSIONS, content_key, fetch_bytes, iter_shard, shard_member_id
from pipeline.io.uris import S3Settings, _describe, filesystem_for, is_local, storage_errors
from pipeline.outputs import STAGES, STATUS_ERROR, STATUS_OK, OutputLayout, one_line

STATUS_SKIPPED = "skipped"

COLUMN_TYPES: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "source_uri": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "data": pa.large_binary(),
    "pixels": pa.large_binary(),
    "width": pa.int32(),
    "height": pa.int32(),
    "logits": pa.large_binary(),
    "num_classes": pa.int32(),
    "mask": pa.large_binary(),
    "mask_uri": pa.string(),
    "class_pixels": pa.list_(pa.int64()),
    "class_mean_confidence": pa.list_(pa.float32()),
    "model_sha256": pa.string(),
    "crf_rss_mb": pa.float64(),
    **{f"t_{stage}": pa.float64() for stage in STAGES},
    **{f"node_{stage}": pa.string() for stage in STAGES},
}

#: Columns each stage emits (in order).
BASE_COLUMNS = ("image_id", "source_uri", "status", "error", "t_read", "node_read")
READ_COLUMNS = (*BASE_COLUMNS, "data")
DECODE_COLUMNS = (*BASE_COLUMNS, "width", "height", "t_decode", "node_decode", "pixels")
NETWORK_COLUMNS = (*DECODE_COLUMNS, "num_classes", "model_sha256", "t_network", "node_network", "logits")
CRF_COLUMNS = (
    *BASE_COLUMNS, "width", "height", "t_decode", "node_decode", "num_classes", "model_sha256",
    "t_network", "node_network", "class_pixels", "class_mean_confidence", "crf_rss_mb", "t_crf", "node_crf", "mask",
)
RESULT_COLUMNS = (
    *BASE_COLUMNS, "width", "height", "mask_uri", "class_pixels", "crf_rss_mb",
    *(f"t_{s}" for s in STAGES[1:]), *(f"node_{s}" for s in STAGES[1:]),
)


def node_id() -> str:
    """The Ray node this code runs on ("local" outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return "local"


def to_rows(batch: pa.Table | Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """A batch (Arrow table, or a dict of equal-length columns) as a list of row dicts."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()), []))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def to_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pa.Table:
    """Rows -> an Arrow table with the fixed types of :data:`COLUMN_TYPES` (missing keys are null)."""
    return pa.table({c: pa.array([row.get(c) for row in rows], type=COLUMN_TYPES[c]) for c in columns})


def _fail(row: dict[str, Any], reason: str) -> None:
    row["status"] = STATUS_ERROR
    row["error"] = one_line(reason)


def _pending(row: Mapping[str, Any]) -> bool:
    return row.get("status") == STATUS_OK


# ----------------------------------------------------------------------------- read


class ReadBytes:
    """image_id, source_uri -> + data: one GET per row; a missing/unreadable object is an error row."""

    def __init__(self, *, s3: S3Settings | None = None) -> None:
        self.s3 = s3 or S3Settings()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(status=STATUS_OK, error=None, data=None, node_read=node)
            try:
                row["data"] = fetch_bytes(row["source_uri"], s3=self.s3)
            except storage_errors() as exc:
                _fail(row, f"cannot read: {_describe(exc)}")
            row["t_read"] = time.perf_counter() - start
        return to_table(rows, READ_COLUMNS)


class ExpandShards:
    """shard_uri -> one row per image member of each tar shard (+ data); done ids become ``skipped``."""

    def __init__(
        self, *, s3: S3Settings | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS, done: frozenset[str] = frozenset()
    ) -> None:
        self.s3, self.extensions, self.done = s3 or S3Settings(), tuple(extensions), frozenset(done)

    def __call__(self, batch) -> pa.Table:
        out, node = [], node_id()
        for shard in to_rows(batch):
            shard_uri = shard["shard_uri"]
            start = time.perf_counter()
            for source_uri, data, error in iter_shard(shard_uri, s3=self.s3, extensions=self.extensions):
                if error is None:
                    image_id = shard_member_id(shard_uri, source_uri.split("#", 1)[1])
                else:
                    image_id = image_id_for(shard_uri)
                row = {"image_id": image_id, "source_uri": source_uri, "status": STATUS_OK, "error": None,
                       "data": data, "node_read": node}
                if image_id in self.done:
                    row.update(status=STATUS_SKIPPED, data=None)
                elif error is not None:
                    _fail(row, error)
                row["t_read"] = time.perf_counter() - start
                start = time.perf_counter()
                out.append(row)
        return to_table(out, READ_COLUMNS)


class ManifestBytes:
    """Rows of a Parquet manifest that carries image bytes -> image rows (+ data); done ids ``skipped``.

    The source URI is ``<manifest>#<key>`` with ``key`` from ``key_column`` or the content hash.
    """

    def __init__(self, *, bytes_column: str = "bytes", key_column: str = "key", done: frozenset[str] = frozenset()) -> None:
        self.bytes_column, self.key_column, self.done = bytes_column, key_column, frozenset(done)

    def __call__(self, batch) -> pa.Table:
        out, node = [], node_id()
        for item in to_rows(batch):
            start = time.perf_counter()
            data = item.get(self.bytes_column)
            key = item.get(self.key_column)
            manifest = item.get("path") or "manifest"
            if key is None or key == "":
                key = content_key(data or b"")
            source_uri = f"{manifest}#{key}"
            image_id = image_id_for(source_uri, relative=str(key))
            row = {"image_id": image_id, "source_uri": source_uri, "status": STATUS_OK, "error": None,
                   "data": data, "node_read": node}
            if image_id in self.done:
                row.update(status=STATUS_SKIPPED, data=None)
            elif data is None:
                _fail(row, f"manifest column {self.bytes_column!r} is null")
            row["t_read"] = time.perf_counter() - start
            out.append(row)
        return to_table(out, READ_COLUMNS)


# ----------------------------------------------------------------------------- decode


class DecodeStage:
    """data -> pixels (uint8 RGB, EXIF-oriented), width, height; bad images become error rows."""

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(pixels=None, width=None, height=None, node_decode=node)
            if _pending(row):
                try:
                    rgb = decode_image(row.get("data"), max_pixels=self.max_pixels)
                    row.update(pixels=rgb.tobytes(), height=rgb.shape[0], width=rgb.shape[1])
                except DecodeError as exc:
                    _fail(row, str(exc))
            row["t_decode"] = time.perf_counter() - start
        return to_table(rows, DECODE_COLUMNS)


def pixels_of(row: Mapping[str, Any]) -> np.ndarray:
    """The row's RGB image as a writable uint8 H x W x 3 array (pydensecrf needs writable buffers)."""
    return np.frombuffer(bytearray(row["pixels"]), dtype=np.uint8).reshape(row["height"], row["width"], 3)


# ----------------------------------------------------------------------------- network


def resolve_device(device: str) -> "torch.device":  # noqa: F821 - torch imported lazily
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("network.device: 'cuda' requested but torch sees no CUDA device on this node")
    return torch.device(device)


def local_weights(uri: str, *, s3: S3Settings | None = None) -> str:
    """A local path for a checkpoint URI (object-store checkpoints are copied to a temp file once)."""
    fs, path = filesystem_for(uri, s3=s3)
    if is_local(fs):
        return path
    target = os.path.join(tempfile.gettempdir(), "deeplab-batch-weights", path.replace("/", "_"))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        fs.get_file(path, tmp)
        os.replace(tmp, target)
    return target


class NetworkStage:
    """pixels -> coarse fp16 logits (C x ceil((H-1)/8)+1 x ceil((W-1)/8)+1), batched and padded.

    Preprocessing (mean, channel order, input size) comes from the checkpoint's record.
    Every batch is padded to ``record.input_size``; an image with a longer side is
    shrunk to fit for the network and its scores are resampled (bilinear,
    align_corners) to the coarse grid of its full size, so the CRF still runs at
    full resolution.
    """

    def __init__(self, *, weights: str, s3: S3Settings | None = None, device: str = "auto", threads: int = 0) -> None:
        import torch

        from pipeline.weights import load_checkpoint

        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.model, self.record = load_checkpoint(local_weights(weights, s3=s3), map_location=self.device)

    def _network_input(self, image: np.ndarray) -> np.ndarray:
        size = self.record.input_size
        height, width = image.shape[:2]
        if max(height, width) > size:
            from PIL import Image

            scale = size / max(height, width)
            shape = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
            image = np.asarray(Image.fromarray(image).resize(shape, Image.BILINEAR))
        if self.record.channel_order == "RGB":  # prepare_batch flips RGB->BGR; undo it for RGB models
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image)

    def forward(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Coarse fp16 logits for full-size RGB images (one padded forward pass)."""
        import torch
        import torch.nn.functional as F

        from pipeline.inference import coarse_logits

        inputs = [self._network_input(im) for im in images]
        scores = coarse_logits(
            self.model, inputs, input_size=self.record.input_size, mean_bgr=self.record.mean_bgr,
            device=self.device, dtype=torch.float32,
        )
        out = []
        for image, small, s in zip(images, inputs, scores, strict=True):
            if small.shape[:2] != image.shape[:2]:
                grid = (coarse_side(image.shape[0]), coarse_side(image.shape[1]))
                s = F.interpolate(s[None], size=grid, mode="bilinear", align_corners=True)[0]
            out.append(s.to(torch.float16).numpy())
        return out

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending = [r for r in rows if _pending(r)]
        if pending:
            for row, scores in zip(pending, self.forward([pixels_of(r) for r in pending]), strict=True):
                row["logits"] = scores.tobytes()
        per_image = (time.perf_counter() - start) / max(len(pending), 1)
        for row in rows:
            row.update(node_network=node, num_classes=self.record.num_classes, model_sha256=self.record.sha256)
            row["t_network"] = per_image if _pending(row) else 0.0
        return to_table(rows, NETWORK_COLUMNS)


# ----------------------------------------------------------------------------- CRF


def coarse_side(size: int) -> int:
    from pipeline.preprocess import coarse_size

    return coarse_size(size)


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


class CRFStage:
    """pixels + coarse logits -> mask: upsample x8, crop to H x W, dense CRF (or softmax), argmax.

    ``params`` is a :class:`pipeline.crf.CRFParams` (or None for no CRF); ``backend`` is
    ``pydensecrf`` (CPU) or ``torch`` (``device`` cpu/cuda/auto).
    """

    def __init__(self, *, params=None, backend: str = "pydensecrf", device: str = "cpu", threads: int = 1) -> None:
        import torch

        self.params, self.backend = params, backend
        self.device = str(resolve_device(device)) if backend == "torch" else "cpu"
        if threads > 0:
            torch.set_num_threads(threads)

    def probabilities(self, images: Sequence[np.ndarray], logits: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image: upsample the coarse logits to H x W, then CRF marginals (or softmax without CRF)."""
        import torch

        from pipeline.preprocess import upsample_logits

        full = [
            upsample_logits(torch.from_numpy(scores), height=image.shape[0], width=image.shape[1]).float()
            for image, scores in zip(images, logits, strict=True)
        ]
        if self.params is None:
            return [torch.softmax(f, dim=0).numpy() for f in full]
        from pipeline.crf import refine_batch

        return refine_batch(
            list(images), [np.ascontiguousarray(f.numpy()) for f in full], self.params,
            backend=self.backend, device=self.device,
        )

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending = [r for r in rows if _pending(r)]
        images, logits = [], []
        for row in pending:
            c, h, w = row["num_classes"], coarse_side(row["height"]), coarse_side(row["width"])
            images.append(pixels_of(row))
            logits.append(np.frombuffer(row["logits"], dtype=np.float16).reshape(c, h, w).astype(np.float32))
        probs = self.probabilities(images, logits) if pending else []
        for row, p in zip(pending, probs, strict=True):
            labels, counts, confidence = label_statistics(p)
            row.update(mask=labels.tobytes(), class_pixels=counts, class_mean_confidence=confidence)
        per_image = (time.perf_counter() - start) / max(len(pending), 1)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        for row in rows:
            if not _pending(row):
                row.update(mask=None, class_pixels=None, class_mean_confidence=None)
            row.update(node_crf=node, t_crf=per_image if _pending(row) else 0.0, crf_rss_mb=rss_mb)
        return to_table(rows, CRF_COLUMNS)


# ----------------------------------------------------------------------------- write


class WriteStage:
    """mask -> ``masks/<id>.png``; then all rows of the batch -> one committed ``segments/`` file.

    Masks are written first, the segments file last: a row is visible only once its
    mask is. ``skipped`` rows are returned (for counting) but not written. Returns
    small per-row results (:data:`RESULT_COLUMNS`) for the driver's progress and summary.
    """

    def __init__(
        self,
        *,
        layout: OutputLayout,
        run_id: str,
        palette: Sequence[Sequence[int]] | None = None,
        crf: Mapping[str, Any] | None = None,
        metadata: Mapping[bytes, bytes] | None = None,
    ) -> None:
        self.layout, self.run_id, self.palette = layout, run_id, palette
        self.crf, self.metadata = (dict(crf) if crf else None), metadata

    def segment_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        ok = row["status"] == STATUS_OK
        return {
            "image_id": row["image_id"],
            "source_uri": row["source_uri"],
            "status": row["status"],
            "error": row.get("error"),
            "width": row.get("width"),
            "height": row.get("height"),
            "mask_uri": row.get("mask_uri"),
            "class_pixels": row.get("class_pixels") if ok else None,
            "class_mean_confidence": row.get("class_mean_confidence") if ok else None,
            "model_sha256": row.get("model_sha256"),
            "crf": self.crf if ok else None,
            "timings": {f"{s}_s": row.get(f"t_{s}") for s in STAGES},
            "nodes": {s: row.get(f"node_{s}") for s in STAGES},
            "run_id": self.run_id,
        }

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        written = []
        for row in rows:
            start = time.perf_counter()
            row.update(node_write=node, mask_uri=None)
            if row["status"] == STATUS_SKIPPED:
                row["t_write"] = 0.0
                continue
            if _pending(row):
                labels = np.frombuffer(row["mask"], dtype=np.uint8).reshape(row["height"], row["width"])
                try:
                    row["mask_uri"] = self.layout.write_mask(row["image_id"], labels, palette=self.palette)
                except storage_errors() as exc:
                    _fail(row, f"cannot write mask: {_describe(exc)}")
            row["t_write"] = time.perf_counter() - start
            written.append(row)
        if written:
            self.layout.write_segments([self.segment_row(r) for r in written], metadata=self.metadata)
        return to_table(rows, RESULT_COLUMNS)


__all__ = [
    "COLUMN_TYPES",
    "CRFStage",
    "DecodeStage",
    "ExpandShards",
    "ManifestBytes",
    "NetworkStage",
    "ReadBytes",
    "RESULT_COLUMNS",
    "STATUS_SKIPPED",
    "WriteStage",
    "label_statistics",
    "local_weights",
    "node_id",
    "to_rows",
    "to_table",
]
