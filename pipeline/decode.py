"""Bytes -> uint8 RGB, the way the whole corpus is decoded.

* EXIF orientation is applied (the mask matches the image as viewers show it);
* L, LA, P, PA, RGBA, CMYK, YCbCr, 1, I, I;16, F become RGB (alpha dropped,
  16/32-bit rescaled to 8 bits);
* a pixel-count limit, checked from the header before any pixel is decoded,
  stops decompression bombs (a PNG that declares 100000 x 100000).

Every failure raises :class:`DecodeError` with a one-line reason; the decode stage
turns it into an error row.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.failures import DataError

DEFAULT_MAX_PIXELS = 50_000_000

#: What Pillow and its format plugins raise on malformed files (struct.error, IndexError,
#: KeyError, SyntaxError ... come from plugins parsing headers and EXIF).
DECODE_FAILURES: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError, struct.error, IndexError, KeyError,
    OverflowError, ZeroDivisionError,
)


class DecodeError(DataError):
    """This input is not an image we can segment; ``str(error)`` is the reason for the row (kind ``data``)."""


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        scale = 65535 if mode.startswith("I;16") or values.max(initial=0) <= 65535 else int(values.max())
        gray = np.clip(values * 255 // max(scale, 1), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(np.nanmin(values)), float(np.nanmax(values))
        gray = ((values - low) / (high - low) * 255 if high > low else np.zeros_like(values)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode != "RGB":
        image = image.convert("RGBA" if mode in ("P", "PA") and "transparency" in image.info else mode).convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` into a C-contiguous uint8 H x W x 3 RGB array (EXIF orientation applied)."""
    if data is None or len(data) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about every oddity of a corrupt file
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"image too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                    )
                if width == 0 or height == 0:
                    raise DecodeError(f"image has no pixels: {width}x{height}")
                image.load()
                oriented = ImageOps.exif_transpose(image)
                rgb = _to_rgb(oriented)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"image too large (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not a recognised image format") from exc
    except DECODE_FAILURES as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DecodeError(f"cannot decode image: {reason}"[:300]) from exc
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError(f"unsupported image layout after conversion: shape {rgb.shape}")
    return np.ascontiguousarray(rgb)
