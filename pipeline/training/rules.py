"""The documented rules of an export, in one place (docs/training-data.md quotes them).

* **key** (:func:`sample_key`): a WebDataset key is the image id with every ``.`` replaced by ``_``
  (WebDataset splits a member name at its first dot: ``<key>.<ext>``). Image ids are
  ``<slug>-<hash>`` (``pipeline.io.ids``); the hash part is kept, so keys stay unique.
* **split** (:func:`split_of`): an image goes to ``val`` when the first 8 bytes of
  SHA-256(image id), read as a big-endian integer and divided by 2^64, are below the
  validation fraction; else to ``train``. The same id always lands in the same split.
* **ignore** (:func:`confidence_cutoff`, :func:`training_label`): a pixel whose 8-bit
  confidence ``c`` (255 = 1.0) has ``c / 255 < T`` gets the label :data:`IGNORE_INDEX` (255).
* **confident fraction** at ``T`` (:func:`confident_pixels`): the pixels with ``c / 255 >= T``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

IGNORE_INDEX = 255
SPLITS: tuple[str, ...] = ("train", "val")
FORMATS: tuple[str, ...] = ("webdataset", "hf-parquet")
#: File suffix of each format's shards (under ``<DEST>/<split>/``).
SHARD_SUFFIX = {"webdataset": ".tar", "hf-parquet": ".parquet"}
SHARD_PREFIX = "shard-"
#: Per-image quality scores carried into the samples (``pipeline.resolution.Quality``).
QUALITY_FIELDS: tuple[str, ...] = ("mean_confidence", "confident_fraction", "mean_entropy", "crf_agreement",
                                   "ignored_pixels")


def sample_key(image_id: str) -> str:
    """The WebDataset key of an image: its id with ``.`` replaced by ``_`` (keys are dot-free)."""
    return image_id.replace(".", "_")


def split_hash(image_id: str) -> float:
    """SHA-256 of the id, first 8 bytes big-endian, / 2^64: uniform in [0, 1)."""
    return int.from_bytes(hashlib.sha256(image_id.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(image_id: str, val_fraction: float) -> str:
    """``"val"`` when :func:`split_hash` is below ``val_fraction``, else ``"train"``."""
    return "val" if val_fraction > 0 and split_hash(image_id) < val_fraction else "train"


def confidence_cutoff(threshold: float) -> int:
    """The smallest 8-bit value ``c`` with ``c / 255 >= threshold`` (256 when none: every pixel is below)."""
    for value in range(256):
        if value / 255.0 >= threshold:
            return value
    return 256


def confident_pixels(confidence: np.ndarray, threshold: float) -> int:
    """Pixels of an 8-bit confidence map at or above ``threshold``."""
    return int(np.count_nonzero(confidence >= confidence_cutoff(threshold)))


def training_label(mask: np.ndarray, confidence: np.ndarray | None, threshold: float) -> np.ndarray:
    """The uint8 label map: class ids, :data:`IGNORE_INDEX` where the confidence is below ``threshold``."""
    label = np.array(mask, dtype=np.uint8, copy=True)
    if threshold > 0:
        if confidence is None:
            raise ValueError("a confidence map is needed to ignore pixels below a threshold")
        if confidence.shape != label.shape:
            raise ValueError(f"confidence map {confidence.shape} and mask {label.shape} differ in size")
        label[confidence < confidence_cutoff(threshold)] = IGNORE_INDEX
    return label


def id2label(class_names: Sequence[str]) -> dict[str, str]:
    """``id2label.json``: ``{"0": "background", ...}``, the convention of HF datasets and models."""
    return {str(i): str(name) for i, name in enumerate(class_names)}


def label_png(label: np.ndarray) -> bytes:
    """An 8-bit grayscale ("L") PNG of the label map: pixel value = class id (255 = ignored), no palette."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def label_counts(label: np.ndarray, num_classes: int) -> list[int]:
    """Pixels per class id in ``label`` (255s not counted)."""
    counts = np.bincount(label.ravel(), minlength=256)
    return [int(v) for v in counts[:num_classes]]


# ----------------------------------------------------------------------------- HF Parquet

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

#: Columns of an hf-parquet shard besides ``image`` and ``label``: (name, Arrow type, datasets dtype).
HF_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("image_id", pa.string(), "string"),
    ("source_uri", pa.string(), "string"),
    ("width", pa.int32(), "int32"),
    ("height", pa.int32(), "int32"),
    ("mean_confidence", pa.float32(), "float32"),
    ("confident_fraction", pa.float32(), "float32"),
    ("mean_entropy", pa.float32(), "float32"),
    ("crf_agreement", pa.float32(), "float32"),
    ("ignored_pixels", pa.int64(), "int64"),
)


def hf_features() -> dict[str, Any]:
    """The ``datasets`` features of an hf-parquet shard (``Features.to_dict()`` form, as ``datasets`` writes them)."""
    features: dict[str, Any] = {"image": {"_type": "Image"}, "label": {"_type": "Image"}}
    for name, _, dtype in HF_COLUMNS:
        features[name] = {"dtype": dtype, "_type": "Value"}
    # "Sequence" of a Value, as datasets < 4 wrote lists: datasets 4+ reads it as List(Value("int64")) and
    # older releases (which know no "List") still load the files
    features["class_pixels"] = {"feature": {"dtype": "int64", "_type": "Value"}, "length": -1, "_type": "Sequence"}
    return features


def hf_schema() -> pa.Schema:
    """Arrow schema of an hf-parquet shard, with the ``huggingface`` metadata that makes ``image``/``label`` Images."""
    fields = [pa.field("image", IMAGE_STRUCT), pa.field("label", IMAGE_STRUCT)]
    fields += [pa.field(name, kind) for name, kind, _ in HF_COLUMNS]
    fields.append(pa.field("class_pixels", pa.list_(pa.int64())))
    metadata = {b"huggingface": json.dumps({"info": {"features": hf_features()}}).encode("utf-8")}
    return pa.schema(fields, metadata=metadata)


def shard_name(split: str, digest: str, number: int, fmt: str) -> str:
    """``shard-<split>-<task digest>-<n>.<tar|parquet>``."""
    return f"{SHARD_PREFIX}{split}-{digest}-{number:05d}{SHARD_SUFFIX[fmt]}"


def task_digest(image_ids: Sequence[str]) -> str:
    """The digest of the images one write task holds: the same images always give the same shard names."""
    return hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()[:16]
