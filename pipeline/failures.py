"""What a failure means, decided in one place: *data*, *transient* or *bug*.

* **data**: the input itself cannot be segmented (not an image, too large, a shape the
  CRF cannot represent). The row is an error row of kind ``data`` and is final: no run
  retries it.
* **transient**: the world, not the input: storage that does not answer, CUDA out of
  memory, a device error, host memory running out. The stage retries it within the run
  with backoff (out of memory: one image at a time, after freeing the device's cache);
  what still fails becomes an error row of kind ``transient`` (or ``storage`` for I/O),
  which the next run retries. A lost actor or node is Ray's to retry (actor restarts
  and task retries), below this code.
* **bug**: anything else (``TypeError``, ``KeyError``, an unexpected ``ValueError`` from
  our own code or pyarrow's ``ArrowInvalid``). It is never stored as a row and never
  retried silently: the exception propagates, the Ray job fails and ``segment`` exits 1
  with the traceback.

:func:`classify` is the rule; :func:`pipeline.stages.common.each_row` applies it to every
per-row computation of the network and CRF stages.
"""

from __future__ import annotations

DATA = "data"
TRANSIENT = "transient"
BUG = "bug"
KINDS: tuple[str, ...] = (DATA, TRANSIENT, BUG)

#: Attempts of one image after a transient failure, within the run, and the first backoff (doubled each time).
TRANSIENT_ATTEMPTS = 3
TRANSIENT_BACKOFF_S = 0.5
#: Words of a torch RuntimeError that come from the device or its driver, not from our code.
DEVICE_MARKERS: tuple[str, ...] = (
    "out of memory", "CUDA error", "CUDA driver", "cuDNN error", "CUBLAS_STATUS", "cuBLAS", "NCCL", "ECC error",
    "device-side", "no CUDA-capable device", "CUDA-capable device(s) is/are busy", "HIP error",
)


class DataError(ValueError):
    """This input cannot be segmented; ``str(error)`` is the reason its row carries (kind ``data``)."""


class TransientFailure(RuntimeError):
    """A transient failure that outlasted the retries within the run: the row's kind is ``transient``."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Host or device memory ran out (CUDA's OutOfMemoryError is a RuntimeError saying so)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _storage_types() -> tuple[type[BaseException], ...]:
    from pipeline.io.uris import storage_errors

    return storage_errors()


def classify(exc: BaseException) -> str:
    """``data``, ``transient`` or ``bug`` for an exception raised while working on an image."""
    if isinstance(exc, DataError):
        return DATA
    if isinstance(exc, TransientFailure) or is_out_of_memory(exc):
        return TRANSIENT
    if isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in DEVICE_MARKERS):
        return TRANSIENT
    if isinstance(exc, _storage_types()):
        return TRANSIENT
    return BUG


__all__ = [
    "BUG", "DATA", "DEVICE_MARKERS", "KINDS", "TRANSIENT", "TRANSIENT_ATTEMPTS", "TRANSIENT_BACKOFF_S", "DataError",
    "TransientFailure", "classify", "is_out_of_memory",
]
