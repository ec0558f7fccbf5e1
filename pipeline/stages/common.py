"""What every stage shares: the column types, row <-> table conversion and per-row failure handling.

Rows carry ``status``: ``ok`` rows are worked on; ``error`` rows (a one-line
``error`` and its ``error_kind``: ``data``, ``storage`` or ``transient``) pass through
untouched, so every input reaches the writer exactly once. A failure of one row (a bad
image, a CRF that cannot run on it, a GPU out of memory) never fails the batch: the batch
is retried one row at a time and only that row becomes an error row, after retries when
the failure is transient. A bug fails the job (:mod:`pipeline.failures`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipeline.io.uris import ERROR_DATA, ERROR_TRANSIENT
from pipeline.outputs import STAGES, STATUS_ERROR, STATUS_OK, one_line

COLUMN_TYPES: dict[str, pa.DataType] = {
    "image_id": pa.string(),
    "source_uri": pa.string(),
    "relative": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
    "byte_offset": pa.int64(),
    "byte_size": pa.int64(),
    "row_group": pa.int32(),
    "row_index": pa.int32(),
    "retry": pa.bool_(),
    "duplicates": pa.int32(),
    "data": pa.large_binary(),
    "pixels": pa.large_binary(),
    "pixels_width": pa.int32(),
    "pixels_height": pa.int32(),
    "width": pa.int32(),
    "height": pa.int32(),
    "logits": pa.large_binary(),
    "num_classes": pa.int32(),
    "mask": pa.large_binary(),
    "mask_uri": pa.string(),
    "segments_file": pa.string(),
    "class_pixels": pa.list_(pa.int64()),
    "class_mean_confidence": pa.list_(pa.float32()),
    "model_sha256": pa.string(),
    "crf_rss_mb": pa.float64(),
    "mean_confidence": pa.float32(),
    "confident_fraction": pa.float32(),
    "mean_entropy": pa.float32(),
    "crf_agreement": pa.float32(),
    "ignored_pixels": pa.int64(),
    "confidence": pa.large_binary(),
    "confidence_uri": pa.string(),
    "image": pa.large_binary(),
    "image_ext": pa.string(),
    **{f"t_{stage}": pa.float64() for stage in STAGES},
    **{f"node_{stage}": pa.string() for stage in STAGES},
}

#: An input before it is read: its URI, the readable part of its id, where its bytes are (tar member
#: range, manifest row).
LOCATOR_COLUMNS = ("byte_offset", "byte_size", "row_group", "row_index")
INDEX_COLUMNS = ("source_uri", "relative", "status", "error", "error_kind", *LOCATOR_COLUMNS)
#: What resume adds: the image id, whether the row retries an earlier storage error, how many repeats were dropped.
PENDING_COLUMNS = ("image_id", *INDEX_COLUMNS, "retry", "duplicates")
#: Carried by every stage from read on.
BASE_COLUMNS = ("image_id", "source_uri", "status", "error", "error_kind", "retry", "duplicates", "t_read",
                "node_read")
READ_COLUMNS = (*BASE_COLUMNS, "data")
#: ``image``/``image_ext``: with training output, the image as a training sample holds it (its bytes, upright;
#: ``pipeline.training.samples.upright_image``), carried to the writer; null otherwise.
TRAINING_IMAGE_COLUMNS = ("image", "image_ext")
DECODE_COLUMNS = (*BASE_COLUMNS, "width", "height", "t_decode", "node_decode", "pixels_width", "pixels_height",
                  "pixels", *TRAINING_IMAGE_COLUMNS)
NETWORK_COLUMNS = (*DECODE_COLUMNS, "num_classes", "model_sha256", "t_network", "node_network", "logits")
#: Per-image quality scores (:class:`pipeline.resolution.Quality`), in the CRF stage's rows and the segments rows.
QUALITY_COLUMNS = ("mean_confidence", "confident_fraction", "mean_entropy", "crf_agreement", "ignored_pixels")
CRF_COLUMNS = (
    *BASE_COLUMNS, "width", "height", "t_decode", "node_decode", "num_classes", "model_sha256",
    "t_network", "node_network", "class_pixels", "class_mean_confidence", *QUALITY_COLUMNS, "crf_rss_mb", "t_crf",
    "node_crf", "mask", "confidence", *TRAINING_IMAGE_COLUMNS,
)
RESULT_COLUMNS = (
    *BASE_COLUMNS, "width", "height", "mask_uri", "segments_file", "class_pixels", "crf_rss_mb",
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


def fail(row: dict[str, Any], reason: str, *, kind: str = ERROR_DATA) -> None:
    """Make ``row`` an error row with a one-line ``reason`` and its ``error_kind`` (``data``: final;
    ``storage``/``transient``: retried by the next run)."""
    row["status"] = STATUS_ERROR
    row["error"] = one_line(reason)
    row["error_kind"] = kind


def failure_kind(exc: BaseException) -> str:
    """The ``error_kind`` of a row whose item ended with ``exc`` (from :func:`each_row`)."""
    from pipeline.failures import TransientFailure

    return ERROR_TRANSIENT if isinstance(exc, TransientFailure) else ERROR_DATA


def is_pending(row: Mapping[str, Any]) -> bool:
    """Whether a stage still has work to do on ``row`` (it is not an error row)."""
    return row.get("status") == STATUS_OK


def each_row(
    fn: Callable[[list[Any]], Sequence[Any]], items: Sequence[Any], *, batched: bool = True,
    after_failure: Callable[[], None] | None = None, attempts: int | None = None, backoff_s: float | None = None,
) -> list[Any]:
    """``fn`` over ``items``: one call for all (``batched``), else or after a failure one call per item.

    Failures are classified (:func:`pipeline.failures.classify`): a **bug** propagates at
    once (the job fails loudly); a **data** failure is that item's result (its row becomes
    a final error row); a **transient** one (out of memory, a device or storage error) is
    retried for that item alone, ``attempts`` times with a doubling backoff, calling
    ``after_failure`` (free the device cache) before each retry; if it still fails the
    item's result is a :class:`~pipeline.failures.TransientFailure` (a row the next run
    retries). Returns one result or exception per item.
    """
    from pipeline.failures import BUG, DATA, TRANSIENT_ATTEMPTS, TRANSIENT_BACKOFF_S, TransientFailure, classify

    attempts = TRANSIENT_ATTEMPTS if attempts is None else attempts
    backoff_s = TRANSIENT_BACKOFF_S if backoff_s is None else backoff_s
    if not items:
        return []
    if batched and len(items) > 1:
        try:
            return list(fn(list(items)))
        except Exception as exc:
            if classify(exc) == BUG:
                raise
            if after_failure is not None:
                after_failure()  # then one at a time: isolates a bad item, and is the smaller batch after OOM
    out: list[Any] = []
    for item in items:
        for attempt in range(1, attempts + 1):
            try:
                (result,) = fn([item])
                out.append(result)
                break
            except Exception as exc:
                kind = classify(exc)
                if kind == BUG:
                    raise
                if after_failure is not None:
                    after_failure()
                if kind == DATA:
                    out.append(exc)
                    break
                if attempt == attempts:
                    failure = TransientFailure(f"{type(exc).__name__}: {exc} (after {attempts} attempts)")
                    out.append(failure)
                    break
                time.sleep(backoff_s * 2 ** (attempt - 1))
    return out
