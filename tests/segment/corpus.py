"""Tiny test corpora (32-100 px): valid images in odd modes, broken files, tar shards, manifests."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def shapes_image(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """An RGB image with a few flat rectangles (something for the CRF to snap to)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
    for _ in range(3):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0 : y0 + height // 2, x0 : x0 + width // 2] = rng.integers(0, 255, 3)
    return image


def encode(image: Image.Image | np.ndarray, fmt: str, **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 100_000) -> bytes:
    """A valid-looking PNG header declaring side x side pixels, with almost no data."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def good_images(count: int, *, start: int = 0) -> dict[str, bytes]:
    """``{name: bytes}`` of valid JPEG/PNG images between 32 and 100 px."""
    out = {}
    for i in range(start, start + count):
        h, w = 32 + (i * 7) % 60, 40 + (i * 13) % 60
        fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[i % 2]
        out[f"img{i:03d}.{ext}"] = encode(shapes_image(h, w, seed=i), fmt)
    return out


def odd_corpus() -> dict[str, tuple[bytes, tuple[str, str | None, tuple[int, int] | None]]]:
    """``{name: (bytes, (status, error substring, (width, height)))}``: valid odd modes and broken files."""
    rgb = shapes_image(40, 60, seed=3)
    gray16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 20)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees: stored 60x40, shown 40x60
    good_jpeg = encode(rgb, "JPEG")
    good_png = encode(rgb, "PNG")
    return {
        "gray.png": (encode(Image.fromarray(rgb).convert("L"), "PNG"), ("ok", None, (60, 40))),
        "gray_alpha.png": (encode(Image.fromarray(rgb).convert("LA"), "PNG"), ("ok", None, (60, 40))),
        "palette.png": (encode(Image.fromarray(rgb).convert("P"), "PNG"), ("ok", None, (60, 40))),
        "rgba.png": (encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), ("ok", None, (60, 40))),
        "cmyk.jpg": (encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), ("ok", None, (60, 40))),
        "gray16.png": (encode(Image.fromarray(gray16), "PNG"), ("ok", None, (60, 40))),
        "rotated.jpg": (encode(Image.fromarray(rgb), "JPEG", exif=exif), ("ok", None, (40, 60))),
        "image.webp": (encode(rgb, "WEBP"), ("ok", None, (60, 40))),
        "image.bmp": (encode(rgb, "BMP"), ("ok", None, (60, 40))),
        "image.tiff": (encode(rgb, "TIFF"), ("ok", None, (60, 40))),
        "zero.jpg": (b"", ("error", "empty file", None)),
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], ("error", "decode", None)),
        "truncated.png": (good_png[: len(good_png) // 2], ("error", "decode", None)),
        "text.png": (b"this is not an image at all\n" * 4, ("error", "not a recognised image", None)),
        "bomb.png": (bomb_png(), ("error", "too large", None)),
    }


def write_files(folder: Path, files: dict[str, bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def tar_shard(files: dict[str, bytes]) -> bytes:
    """A WebDataset-style tar: ``<key>.<ext>`` image members plus a ``<key>.cls`` side file each."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            for member, payload in ((name, data), (name.rsplit(".", 1)[0] + ".cls", b"0")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def manifest(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()
