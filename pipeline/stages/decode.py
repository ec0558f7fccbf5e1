"""Bytes -> uint8 RGB (EXIF-oriented), width, height; bad images become ``data`` error rows."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.stages.common import DECODE_COLUMNS, fail, node_id, is_pending, to_rows, to_table


class DecodeStage:
    """data -> pixels (uint8 RGB, EXIF-oriented), width, height; bad images become error rows."""

    def __init__(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels

    def __call__(self, batch) -> pa.Table:
        rows, node = to_rows(batch), node_id()
        for row in rows:
            start = time.perf_counter()
            row.update(pixels=None, width=None, height=None, node_decode=node)
            if is_pending(row):
                try:
                    rgb = decode_image(row.get("data"), max_pixels=self.max_pixels)
                    row.update(pixels=rgb.tobytes(), height=rgb.shape[0], width=rgb.shape[1])
                except DecodeError as exc:
                    fail(row, str(exc))
            row["t_decode"] = time.perf_counter() - start
        return to_table(rows, DECODE_COLUMNS)


def pixels_of(row: Mapping[str, Any]) -> np.ndarray:
    """The row's RGB image as a writable uint8 H x W x 3 array (pydensecrf needs writable buffers)."""
    return np.frombuffer(bytearray(row["pixels"]), dtype=np.uint8).reshape(row["height"], row["width"], 3)
