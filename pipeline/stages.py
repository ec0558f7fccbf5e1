"""The job's stages as plain callables on batches: ``stage(batch) -> batch``.

Each stage does one thing, takes a ``pyarrow.Table`` (or a dict of lists, for
tests) and returns a ``pyarrow.Table`` with the columns the next stage needs
(heavy columns are dropped as soon as they are used). They know nothing about
Ray beyond recording the node they ran on; :mod:`pipeline.graph` wires them.

Rows carry ``status``: ``ok`` rows are worked on; ``error`` rows (a one-line
``error`` and its ``error_kind``: ``data`` or ``storage``) pass through untouched,
so every input reaches the writer exactly once. A failure of one row (a bad
image, a CRF that cannot run on it) never fails the batch: the batch is retried
one row at a time and only the bad row becomes an error row.

Streamed inputs (tar members, manifest bytes) are only known once read: their
stages ask a :class:`RunLedger` which ids to keep (new), which are already under
the output (done: dropped, counted) and which repeat an id of this run
(duplicate: dropped, counted).

Column flow::

    source        image_id, source_uri (or shard_uri / manifest_uri + row_group)
    read/expand   + data (bytes), status, error, error_kind, t_read, node_read
    decode        - data, + pixels (H*W*3 RGB bytes), width, height, t_decode, node_decode
    network       + logits (fp16 C x h x w bytes at 1/8), t_network, node_network
    crf           - pixels, - logits, + mask (H*W uint8 bytes), class_pixels,
                  class_mean_confidence, crf_rss_mb, t_crf, node_crf
    write         - mask, + mask_uri; commits masks and one segments file per batch
"""

from __future__ import annotations

import hashlib
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.io.ids import image_id_for
from pipeline.io.sources import (
    IMAGE_EXTENSIONS,
    fetch_bytes,
    iter_manifest_bytes,
    iter_shard,
    shard_member_id,
)
from pipeline.io.uris import (
    ERROR_DATA,
    ERROR_STORAGE,
    InputError,
    S3Settings,
    _describe,
    filesystem_for,
    is_local,
    storage_errors,
)
from pipeline.outputs import STAGES, STATUS_ERROR, STATUS_OK, OutputLayout, one_line, utc_now

COLUMN_TYPES: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "source_uri": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
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
BASE_COLUMNS = ("image_id", "source_uri", "status", "error", "error_kind", "t_read", "node_read")
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

#: What one row's failure in the network or the CRF raises (CUDA out-of-memory is a RuntimeError).
ROW_FAILURES: tuple[type[BaseException], ...] = (ValueError, RuntimeError, MemoryError)

ADMIT_NEW, ADMIT_DONE, ADMIT_DUPLICATE = "new", "done", "duplicate"


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


def _fail(row: dict[str, Any], reason: str, *, kind: str = ERROR_DATA) -> None:
    row["status"] = STATUS_ERROR
    row["error"] = one_line(reason)
    row["error_kind"] = kind


def _pending(row: Mapping[str, Any]) -> bool:
    return row.get("status") == STATUS_OK


def each_row(
    fn: Callable[[list[Any]], Sequence[Any]], items: Sequence[Any], *, batched: bool = True,
    after_failure: Callable[[], None] | None = None,
) -> list[Any]:
    """``fn`` over ``items``: one call for all (``batched``), else or after a failure one call per item.

    Returns one result per item, or the exception (one of :data:`ROW_FAILURES`) that
    item raised alone; so one bad item fails only itself.
    """
    if not items:
        return []
    if batched and len(items) > 1:
        try:
            return list(fn(list(items)))
        except ROW_FAILURES:
            if after_failure is not None:
                after_failure()
    out: list[Any] = []
    for item in items:
        try:
            (result,) = fn([item])
            out.append(result)
        except ROW_FAILURES as exc:
            if after_failure is not None:
                after_failure()
            out.append(exc)
    return out


# ----------------------------------------------------------------------------- ledger


class RunLedger:
    """Which streamed ids a run keeps: new ones, not those already under the output or seen this run.

    ``admit([(image_id, claimant), ...])`` answers ``"new"``, ``"done"`` (a row exists:
    dropped and counted as skipped) or ``"duplicate"`` (another input of this run has
    the id: dropped and counted). ``claimant`` names the input's position (``shard@member
    index``, ``manifest@row group:row``), so a retried read task is admitted again
    while a repeated key is not. :mod:`pipeline.graph` runs one as a Ray actor per
    run; stages used alone get a local one (dedupe within the stage object).
    """

    def __init__(self, done: Iterable[str] = ()) -> None:
        self.done = frozenset(done)
        self.claims: dict[str, str] = {}
        self.skipped: set[str] = set()
        self.duplicates: set[str] = set()
        self.unread: dict[str, str] = {}

    def admit(self, entries: Sequence[tuple[str, str]]) -> list[str]:
        out = []
        for image_id, claimant in entries:
            if image_id in self.done:
                self.skipped.add(image_id)
                out.append(ADMIT_DONE)
                continue
            owner = self.claims.setdefault(image_id, claimant)
            if owner == claimant:
                out.append(ADMIT_NEW)
            else:
                self.duplicates.add(claimant)
                out.append(ADMIT_DUPLICATE)
        return out

    def note_unread(self, uri: str, reason: str) -> None:
        """A shard / manifest part that storage could not deliver: no row, reported, retried next run."""
        self.unread[uri] = one_line(reason)

    def counts(self) -> dict[str, Any]:
        return {"skipped": len(self.skipped), "duplicates": len(self.duplicates), "unread": dict(self.unread)}


class _LedgerCalls:
    """Calls on a ledger that is either a :class:`RunLedger` or an object with the same methods."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def admit(self, entries: Sequence[tuple[str, str]]) -> list[str]:
        return list(self.ledger.admit(list(entries))) if entries else []

    def note_unread(self, uri: str, reason: str) -> None:
        self.ledger.note_unread(uri, reason)


def _admitted(rows: list[dict[str, Any]], claimants: list[str], ledger: _LedgerCalls) -> list[dict[str, Any]]:
    answers = ledger.admit([(row["image_id"], c) for row, c in zip(rows, claimants, strict=True)])
    return [row for row, answer in zip(rows, answers, strict=True) if answer == ADMIT_NEW]


# ----------------------------------------------------------------------------- read


class ReadBytes:
    """image_id, source_uri -> + data: one GET per row; an object storage cannot deliver is a ``storage`` error row."""

    def __init__(self, *, s3: S3Settings | None = None) -> None:
        self.s3 = s3 or S3Settings()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(status=STATUS_OK, error=None, error_kind=None, data=None, node_read=node)
            try:
                row["data"] = fetch_bytes(row["source_uri"], s3=self.s3)
            except (InputError, *storage_errors()) as exc:
                _fail(row, f"cannot read: {_describe(exc)}", kind=ERROR_STORAGE)
            row["t_read"] = time.perf_counter() - start
        return to_table(rows, READ_COLUMNS)


class ExpandShards:
    """shard_uri -> one row per new image member of each tar shard (+ data).

    Members already under the output, and repeated member names, are dropped (the
    ledger counts them). A corrupt shard adds one ``data`` error row for the shard;
    a shard storage cannot deliver is noted in the ledger (no row: the rerun retries it).
    """

    def __init__(
        self, *, s3: S3Settings | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS, ledger: Any = None
    ) -> None:
        self.s3, self.extensions = s3 or S3Settings(), tuple(extensions)
        self.ledger = _LedgerCalls(ledger if ledger is not None else RunLedger())

    def __call__(self, batch) -> pa.Table:
        out, node = [], node_id()
        for shard in to_rows(batch):
            shard_uri = shard["shard_uri"]
            rows, claimants = [], []
            start = time.perf_counter()
            for item in iter_shard(shard_uri, s3=self.s3, extensions=self.extensions):
                if item.error_kind == ERROR_STORAGE:
                    self.ledger.note_unread(shard_uri, item.error)
                    continue
                if item.error is None:
                    image_id = shard_member_id(shard_uri, item.source_uri.split("#", 1)[1])
                else:
                    image_id = image_id_for(shard_uri)
                row = {"image_id": image_id, "source_uri": item.source_uri, "status": STATUS_OK, "error": None,
                       "error_kind": None, "data": item.data, "node_read": node}
                if item.error is not None:
                    _fail(row, item.error, kind=item.error_kind or ERROR_DATA)
                row["t_read"] = time.perf_counter() - start
                start = time.perf_counter()
                rows.append(row)
                claimants.append(f"{shard_uri}@{item.index}")
            out += _admitted(rows, claimants, self.ledger)
        return to_table(out, READ_COLUMNS)


class ManifestBytes:
    """manifest_uri, row_group -> one row per new image of that row group of a byte manifest (+ data).

    The source URI is ``<manifest URI>#<key>`` (the full URI, scheme included) with
    ``key`` from ``key_column`` or the content hash. Ids already under the output or
    repeated in this run are dropped (the ledger counts them); a row group storage
    cannot deliver is noted in the ledger (no rows: the rerun retries it).
    """

    def __init__(
        self, *, s3: S3Settings | None = None, bytes_column: str = "bytes", key_column: str = "key", ledger: Any = None
    ) -> None:
        self.s3, self.bytes_column, self.key_column = s3 or S3Settings(), bytes_column, key_column
        self.ledger = _LedgerCalls(ledger if ledger is not None else RunLedger())

    def __call__(self, batch) -> pa.Table:
        out, node = [], node_id()
        for part in to_rows(batch):
            manifest, group = part["manifest_uri"], int(part["row_group"])
            rows, claimants = [], []
            start = time.perf_counter()
            try:
                items = list(iter_manifest_bytes(manifest, group, s3=self.s3, bytes_column=self.bytes_column,
                                                 key_column=self.key_column))
            except (InputError, *storage_errors()) as exc:
                self.ledger.note_unread(f"{manifest} (row group {group})", f"cannot read manifest: {_describe(exc)}")
                continue
            per_row = (time.perf_counter() - start) / max(len(items), 1)
            for key, data, index in items:
                source_uri = f"{manifest}#{key}"
                row = {"image_id": image_id_for(source_uri, relative=key), "source_uri": source_uri,
                       "status": STATUS_OK, "error": None, "error_kind": None, "data": data, "node_read": node,
                       "t_read": per_row}
                if data is None:
                    _fail(row, f"manifest column {self.bytes_column!r} is null")
                rows.append(row)
                claimants.append(f"{manifest}@{group}:{index}")
            out += _admitted(rows, claimants, self.ledger)
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


def resolve_device(device: str) -> torch.device:  # noqa: F821 - torch imported lazily
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("network.device: 'cuda' requested but torch sees no CUDA device on this node")
    return torch.device(device)


def local_weights(uri: str, *, s3: S3Settings | None = None) -> str:
    """A local path for a checkpoint URI; object-store checkpoints are copied to a temp file.

    The copy is named after the object's identity (ETag, size, modification time),
    so a checkpoint replaced under the same key is downloaded again.
    """
    fs, path = filesystem_for(uri, s3=s3)
    if is_local(fs):
        return path
    fs.invalidate_cache(path)
    info = fs.info(path)
    identity = "|".join(str(info.get(k)) for k in ("ETag", "etag", "md5Hash", "size", "LastModified", "mtime",
                                                    "updated", "generation"))
    digest = hashlib.sha256(f"{uri}\n{identity}".encode()).hexdigest()[:16]
    name = os.path.basename(path) or "weights"
    target = os.path.join(tempfile.gettempdir(), "deeplab-batch-weights", f"{digest}-{name}")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


class NetworkStage:
    """pixels -> coarse fp16 logits (C x coarse_size(H) x coarse_size(W)), batched and padded.

    Preprocessing is :func:`pipeline.inference.record_logits` (the checkpoint's
    record: input size, mean, channel order; larger images shrunk for the network,
    scores resampled to their full-size grid). A batch whose forward pass fails is
    retried one image at a time, so only the image that fails becomes an error row.
    """

    def __init__(self, *, weights: str, s3: S3Settings | None = None, device: str = "auto", threads: int = 0) -> None:
        import torch

        from pipeline.weights import load_checkpoint

        self.device = resolve_device(device)
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.model, self.record = load_checkpoint(local_weights(weights, s3=s3), map_location=self.device)

    def forward(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Coarse fp16 logits for full-size RGB images (one padded forward pass)."""
        import torch

        from pipeline.inference import record_logits

        scores = record_logits(self.model, self.record, images, device=self.device, dtype=torch.float16)
        return [s.numpy() for s in scores]

    def _release(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending = [r for r in rows if _pending(r)]
        results = each_row(lambda some: self.forward([pixels_of(r) for r in some]), pending,
                           after_failure=self._release)
        for row, scores in zip(pending, results, strict=True):
            if isinstance(scores, BaseException):
                _fail(row, f"network failed: {_describe(scores)}")
            else:
                row["logits"] = scores.tobytes()
        per_image = (time.perf_counter() - start) / max(len(pending), 1)
        for row in rows:
            row.update(node_network=node, num_classes=self.record.num_classes, model_sha256=self.record.sha256)
            row["t_network"] = per_image if _pending(row) else 0.0
        return to_table(rows, NETWORK_COLUMNS)


# ----------------------------------------------------------------------------- CRF


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
    ``pydensecrf`` (CPU, one image at a time) or ``torch`` (``device`` cpu/cuda/auto,
    batched; a failing batch is retried per image). Images over ``max_pixels`` and
    images the CRF rejects (e.g. pydensecrf's key range on very wide images) become
    error rows.
    """

    def __init__(
        self, *, params=None, backend: str = "pydensecrf", device: str = "cpu", threads: int = 1,
        max_pixels: int | None = None,
    ) -> None:
        import torch

        from pipeline.config import DEFAULT_CRF_MAX_PIXELS

        self.params, self.backend = params, backend
        self.max_pixels = DEFAULT_CRF_MAX_PIXELS if max_pixels is None else max_pixels
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
            list(images),  # writable copies already (pixels_of): pydensecrf fails on read-only arrays
            [np.ascontiguousarray(f.numpy()) for f in full], self.params,
            backend=self.backend, device=self.device,
        )

    def _labels(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, list[int], list[float]]]:
        probs = self.probabilities([image for image, _ in items], [scores for _, scores in items])
        return [label_statistics(p) for p in probs]

    def _release(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def __call__(self, batch) -> pa.Table:
        from pipeline.preprocess import coarse_size

        rows, node = to_rows(batch), node_id()
        start = time.perf_counter()
        pending, items = [], []
        for row in (r for r in rows if _pending(r)):
            pixels = int(row["height"]) * int(row["width"])
            if self.params is not None and pixels > self.max_pixels:
                _fail(row, f"too large for the CRF ({row['width']}x{row['height']} = {pixels} pixels > "
                           f"crf.max_pixels {self.max_pixels})")
                continue
            try:
                c, h, w = row["num_classes"], coarse_size(row["height"]), coarse_size(row["width"])
                scores = np.frombuffer(row["logits"], dtype=np.float16).reshape(c, h, w).astype(np.float32)
                items.append((pixels_of(row), scores))
                pending.append(row)
            except ROW_FAILURES as exc:
                _fail(row, f"CRF failed: {_describe(exc)}")
        results = each_row(self._labels, items, batched=self.backend == "torch", after_failure=self._release)
        done = []
        for row, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                _fail(row, f"CRF failed: {_describe(result)}")
                continue
            labels, counts, confidence = result
            row.update(mask=labels.tobytes(), class_pixels=counts, class_mean_confidence=confidence)
            done.append(row)
        per_image = (time.perf_counter() - start) / max(len(done), 1)
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
    mask is. A mask that cannot be written makes a ``storage`` error row (retried by
    the next run). Returns small per-row results (:data:`RESULT_COLUMNS`) for the
    driver's progress and summary.
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

    def segment_row(self, row: Mapping[str, Any], *, written_at=None) -> dict[str, Any]:
        ok = row["status"] == STATUS_OK
        return {
            "image_id": row["image_id"],
            "source_uri": row["source_uri"],
            "status": row["status"],
            "error": row.get("error"),
            "error_kind": None if ok else (row.get("error_kind") or ERROR_DATA),
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
            "written_at": written_at or utc_now(),
        }

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(node_write=node, mask_uri=None)
            if _pending(row):
                labels = np.frombuffer(row["mask"], dtype=np.uint8).reshape(row["height"], row["width"])
                try:
                    row["mask_uri"] = self.layout.write_mask(row["image_id"], labels, palette=self.palette)
                except storage_errors() as exc:
                    _fail(row, f"cannot write mask: {_describe(exc)}", kind=ERROR_STORAGE)
            row["t_write"] = time.perf_counter() - start
        if rows:
            written_at = utc_now()
            self.layout.write_segments([self.segment_row(r, written_at=written_at) for r in rows],
                                       metadata=self.metadata)
        return to_table(rows, RESULT_COLUMNS)


__all__ = [
    "COLUMN_TYPES",
    "RESULT_COLUMNS",
    "ROW_FAILURES",
    "CRFStage",
    "DecodeStage",
    "ExpandShards",
    "ManifestBytes",
    "NetworkStage",
    "ReadBytes",
    "RunLedger",
    "WriteStage",
    "each_row",
    "label_statistics",
    "local_weights",
    "node_id",
    "to_rows",
    "to_table",
]
