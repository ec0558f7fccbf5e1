"""The evaluation's stages: thin callables on batches, testable without Ray.

The model path is ``segment``'s, with a VOC reader in front and the scorer behind:

* :class:`VOCReadStage` reads the image of each split index into the rows
  ``segment``'s decode stage emits (``pixels``, ``width``, ``height``, ``status``);
* :class:`pipeline.stages.network.NetworkStage` (segment's, unchanged) adds the
  coarse 1/8 fp16 ``logits``;
* :class:`ScoreStage` reads each row's label again (by image id), upsamples the
  logits (bilinear x8), refines them with the dense CRF and turns both label maps
  into count arrays (``image_counts``).

:class:`PredictionScoreStage` scores masks that already exist (no model).

A row that cannot be read or scored (missing file, size mismatch, class id out
of range) carries its reason in ``error``; the driver stops the run on the
first such row, naming the file (an evaluation over a partial set is not a score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.data.voc import VOCDataset, read_rgb
from pipeline.evaluation.scoring import CRF, NETWORK, PREDICTIONS, image_counts
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH

COUNT_KEYS = ("confusion", "missed", "trimap")
#: Errors that make a row an error row (and stop the run): bad or missing data.
DATA_ERRORS = (ValueError, OSError)


def _empty(ndim: int, dtype) -> np.ndarray:
    return np.zeros((0,) * ndim, dtype=dtype)


def _zero_counts(num_classes: int, max_width: int) -> dict[str, np.ndarray]:
    """Counts of an error row (same shapes as ``image_counts``, so columns stay uniform)."""
    return {
        "confusion": np.zeros((num_classes, num_classes), np.int64),
        "missed": np.zeros(num_classes, np.int64),
        "trimap": np.zeros((max_width, num_classes, num_classes + 1), np.int64),
    }


def _named(path: Any, exc: BaseException) -> str:
    """``exc`` as one line that names ``path`` (Pillow's messages do not always)."""
    message = str(exc) or type(exc).__name__
    return message if str(path) in message else f"{path}: {message}"


class VOCReadStage:
    """``{"index"}`` -> decoded rows (``DECODE_COLUMNS``) of the split's images, for segment's network stage.

    ``image_id`` is the VOC id, ``source_uri`` the image file; an image that cannot be
    read becomes an error row (``status`` error, ``error`` naming the file) that the
    network passes through. The label is not carried: :class:`ScoreStage` reads it.
    """

    def __init__(self, dataset: VOCDataset, *, max_side: int | None = None) -> None:
        self.dataset, self.max_side = dataset, max_side

    def __call__(self, batch):
        from pipeline.outputs import STATUS_OK
        from pipeline.resolution import shrink
        from pipeline.stages.common import DECODE_COLUMNS, fail, to_rows, to_table

        rows = []
        for item in to_rows(batch):
            image_id = self.dataset.ids[int(item["index"])]
            path = self.dataset.image_path(image_id)
            row: dict[str, Any] = {"image_id": image_id, "source_uri": str(path), "status": STATUS_OK, "error": None}
            try:
                image = read_rgb(path)
                work = shrink(image, self.max_side)  # as segment's decode stage
                row.update(width=image.shape[1], height=image.shape[0], pixels=work.tobytes(),
                           pixels_width=work.shape[1], pixels_height=work.shape[0])
            except DATA_ERRORS as exc:
                fail(row, _named(path, exc))
            rows.append(row)
        return to_table(rows, DECODE_COLUMNS)


class ScoreStage:
    """Network rows -> counts of the raw network (``network_*``) and of the CRF (``crf_*``).

    The ground truth is read here from ``dataset`` by image id (checked against the
    image's size and ``num_classes``). Rows whose id is in ``sample_ids`` also keep
    both label maps (``network_mask``, ``crf_mask``) for the report; the others get
    empty arrays. Error rows (unreadable image, failed network) count nothing and
    keep their error.
    """

    def __init__(
        self,
        *,
        dataset: VOCDataset,
        num_classes: int,
        crf_params,
        crf_backend: str = "pydensecrf",
        crf_device: str = "cpu",
        max_width: int = DEFAULT_MAX_WIDTH,
        sample_ids: Sequence[str] = (),
    ) -> None:
        from pipeline.crf import load_params
        from pipeline.devices import resolve_device

        self.dataset = dataset
        self.num_classes = int(num_classes)
        self.params = load_params(crf_params)
        self.crf_backend = crf_backend
        # as segment's CRF stage: only the torch backend has a device (pydensecrf refuses any but cpu)
        self.crf_device = str(resolve_device(crf_device)) if crf_backend == "torch" else "cpu"
        self.max_width = int(max_width)
        self.sample_ids = frozenset(sample_ids)

    def predict(self, image: np.ndarray, logits: np.ndarray, size: tuple[int, int] | None = None):
        """(network labels, CRF labels), uint8 at ``size`` (default the image's): segment's CRF stage
        (:func:`pipeline.stages.crf.network_and_crf` at the image's working resolution, then
        :func:`pipeline.resolution.to_original`), without the CRF and with it."""
        from pipeline.resolution import to_original
        from pipeline.stages.crf import network_and_crf

        size = size or image.shape[:2]
        (network,), (marginals,) = network_and_crf([image], [logits], self.params, backend=self.crf_backend,
                                                   device=self.crf_device)
        return to_original(network, *size)[0], to_original(marginals, *size)[0]

    def example(self, row: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(working-resolution image, label at the original size, coarse logits) of an ``ok`` network row;
        the label is read and checked here."""
        from pipeline.stages.crf import logits_of
        from pipeline.stages.decode import pixels_of

        label = self.dataset.read_label(str(row["image_id"]), size=(int(row["height"]), int(row["width"])))
        return pixels_of(row), label, logits_of(row)

    def __call__(self, batch) -> dict:
        from pipeline.outputs import STATUS_OK
        from pipeline.stages.common import to_rows

        out: dict[str, list] = {"image_id": [], "error": [], "network_mask": [], "crf_mask": []}
        for method in (NETWORK, CRF):
            for key in COUNT_KEYS:
                out[f"{method}_{key}"] = []
        for row in to_rows(batch):
            image_id = str(row["image_id"])
            error = "" if row["status"] == STATUS_OK else str(row["error"] or f"{image_id}: {row['status']}")
            counts = {}
            masks = {NETWORK: _empty(2, np.uint8), CRF: _empty(2, np.uint8)}
            if not error:
                try:
                    image, label, logits = self.example(row)
                except DATA_ERRORS as exc:
                    error = str(exc)
            if not error:
                network, crf = self.predict(image, logits, label.shape)
                try:
                    for method, pred in ((NETWORK, network), (CRF, crf)):
                        counts[method] = image_counts(pred, label, num_classes=self.num_classes, max_width=self.max_width)
                except ValueError as exc:
                    error = f"{image_id}: {exc}"
                if image_id in self.sample_ids:
                    masks = {NETWORK: network, CRF: crf}
            for method in (NETWORK, CRF):
                c = counts.get(method) or _zero_counts(self.num_classes, self.max_width)
                for key in COUNT_KEYS:
                    out[f"{method}_{key}"].append(c[key])
                out[f"{method}_mask"].append(masks[method])
            out["image_id"].append(image_id)
            out["error"].append(error)
        return out


def read_prediction(uri: str) -> np.ndarray:
    """Class ids of a predicted mask (palette/grayscale PNG) at a local path or fsspec URI."""
    from PIL import Image

    from pipeline.io.uris import filesystem_for

    fs, path = filesystem_for(uri)
    with fs.open(path, "rb") as f, Image.open(f) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{uri}: a predicted mask must be a palette (P) or grayscale (L) PNG, got mode {im.mode}")
        return np.asarray(im)


class PredictionScoreStage:
    """``{"index"}`` -> counts of existing masks (``predictions_*``); ``files`` maps image id -> mask URI."""

    def __init__(
        self,
        *,
        root: str,
        split: str,
        num_classes: int,
        files: dict[str, str],
        max_width: int = DEFAULT_MAX_WIDTH,
        sample_ids: Sequence[str] = (),
    ) -> None:
        self.dataset = VOCDataset(root, split=split, num_classes=num_classes)
        self.num_classes = int(num_classes)
        self.files = dict(files)
        self.max_width = int(max_width)
        self.sample_ids = frozenset(sample_ids)

    def score(self, index: int) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
        image_id, _, label = self.dataset[index]
        uri = self.files[image_id]
        pred = read_prediction(uri)
        if pred.shape != label.shape:
            raise ValueError(
                f"{uri}: predicted mask is {pred.shape[1]}x{pred.shape[0]} but the ground truth "
                f"{self.dataset.label_path(image_id)} is {label.shape[1]}x{label.shape[0]}"
            )
        try:
            counts = image_counts(pred, label, num_classes=self.num_classes, max_width=self.max_width)
        except ValueError as exc:
            raise ValueError(f"{uri}: {exc}") from None
        return image_id, counts, pred

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"image_id": [], "error": [], "predictions_mask": []}
        for key in COUNT_KEYS:
            out[f"{PREDICTIONS}_{key}"] = []
        for index in batch["index"]:
            image_id = self.dataset.ids[int(index)]
            try:
                image_id, counts, pred = self.score(int(index))
                error = ""
            except DATA_ERRORS as exc:
                counts, pred, error = None, None, str(exc)
            if counts is None:
                counts = _zero_counts(self.num_classes, self.max_width)
            for key in COUNT_KEYS:
                out[f"{PREDICTIONS}_{key}"].append(counts[key])
            keep = pred is not None and image_id in self.sample_ids
            out["predictions_mask"].append(pred if keep else _empty(2, np.uint8))
            out["image_id"].append(image_id)
            out["error"].append(error)
        return out

