"""Bytes -> uint8 RGB (EXIF-oriented) at the working resolution, original width and height; bad images become
``data`` error rows."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.resolution import shrink
from pipeline.stages.common import (
    DECODE_COLUMNS,
    fail,
    is_pending,
    node_id,
    to_rows,
    to_table,
)
from pipeline.training.samples import SkipImage, upright_image


class DecodeStage:
    """data -> pixels (uint8 RGB, EXIF-oriented), width, height; bad images become error rows.

    ``width``/``height`` are the original (oriented) size, the size of the mask. The
    ``pixels`` (``pixels_width`` x ``pixels_height``) are shrunk here to ``max_side``
    (:func:`pipeline.resolution.shrink`) when the next stages need no more: a 12 MP
    photo leaves this stage as ~0.6 MB, not 36 MB. None keeps the original size
    (``crf.resolution: full``, or slide mode, whose network wants native pixels).
    With ``training_image`` (``segment --training``) the row also carries the image as a
    training sample holds it (``image``, ``image_ext``: the stored bytes, or an upright
    re-encode when EXIF rotates them) to the writer, so no stage reads the source twice.
    """

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                 training_image: bool = False) -> None:
        self.max_pixels, self.max_side, self.training_image = max_pixels, max_side, training_image

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(pixels=None, width=None, height=None, pixels_width=None, pixels_height=None,
                       image=None, image_ext=None, node_decode=node)
            if is_pending(row):
                try:
                    rgb = decode_image(row.get("data"), max_pixels=self.max_pixels)
                    work = shrink(rgb, self.max_side)
                    row.update(pixels=work.tobytes(), height=rgb.shape[0], width=rgb.shape[1],
                               pixels_height=work.shape[0], pixels_width=work.shape[1])
                    if self.training_image:
                        row["image"], row["image_ext"], _ = upright_image(row["data"], decoded=rgb)
                    del rgb, work
                except (DecodeError, SkipImage) as exc:
                    fail(row, str(exc))
            row["t_decode"] = time.perf_counter() - start
        return to_table(rows, DECODE_COLUMNS)


def pixels_shape(row: Mapping[str, Any]) -> tuple[int, int]:
    """(h, w) of the row's ``pixels``: its working resolution (the original size when it was not shrunk)."""
    if row.get("pixels_height") is None:
        return int(row["height"]), int(row["width"])
    return int(row["pixels_height"]), int(row["pixels_width"])


def pixels_of(row: Mapping[str, Any]) -> np.ndarray:
    """The row's RGB pixels as a writable uint8 h x w x 3 array (pydensecrf needs writable buffers)."""
    return np.frombuffer(bytearray(row["pixels"]), dtype=np.uint8).reshape(*pixels_shape(row), 3)
