"""The evaluation's stages: thin callables on dict batches, testable without Ray.

* :class:`NetworkStage` reads image + label of each split index and runs the
  network once (coarse 1/8 logits, fp16, via ``pipeline.inference.record_logits``).
* :class:`ScoreStage` upsamples the logits (bilinear x8), refines them with the
  dense CRF and turns both label maps into count arrays (``image_counts``).
* :class:`PredictionScoreStage` scores masks that already exist (no model).

A row that cannot be read or scored (missing file, size mismatch, class id out
of range) carries its reason in ``error``; the driver stops the run on the
first such row, naming the file (an evaluation over a partial set is not a score).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.data.voc import VOCDataset
from pipeline.evaluation.scoring import CRF, NETWORK, PREDICTIONS, image_counts
from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH

COUNT_KEYS = ("confusion", "missed", "trimap")
#: Errors that make a row an error row (and stop the run): bad or missing data.
DATA_ERRORS = (ValueError, OSError)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device; use --device cpu or auto")
    return device


def _empty(ndim: int, dtype) -> np.ndarray:
    return np.zeros((0,) * ndim, dtype=dtype)


def _zero_counts(num_classes: int, max_width: int) -> dict[str, np.ndarray]:
    """Counts of an error row (same shapes as ``image_counts``, so columns stay uniform)."""
    return {
        "confusion": np.zeros((num_classes, num_classes), np.int64),
        "missed": np.zeros(num_classes, np.int64),
        "trimap": np.zeros((max_width, num_classes, num_classes + 1), np.int64),
    }


class NetworkStage:
    """``{"index"}`` -> ``{"image_id", "image", "label", "logits" (C x h x w fp16), "error"}``.

    The scores come from :func:`pipeline.inference.record_logits`, the entry point
    ``segment`` uses (padding, mean, channel order and the shrinking of images
    larger than the record's ``input_size``), so evaluate scores what segment produces.
    """

    def __init__(self, *, root: str, split: str, weights: str, device: str = "auto") -> None:
        from pipeline.weights import load_checkpoint

        self.device = resolve_device(device)
        self.model, self.record = load_checkpoint(weights, map_location=self.device)
        self.dataset = VOCDataset(root, split=split, num_classes=self.record.num_classes)

    def __call__(self, batch: dict) -> dict:
        import torch

        from pipeline.inference import record_logits

        ids, images, labels, errors = [], [], [], []
        for index in batch["index"]:
            try:
                image_id, image, label = self.dataset[int(index)]
                error = ""
            except DATA_ERRORS as exc:
                image_id, image, label, error = self.dataset.ids[int(index)], _empty(3, np.uint8), _empty(2, np.uint8), str(exc)
            ids.append(image_id)
            images.append(image)
            labels.append(label)
            errors.append(error)
        ok = [i for i, e in enumerate(errors) if not e]
        logits: list[np.ndarray] = [_empty(3, np.float16) for _ in ids]
        if ok:
            scores = record_logits(
                self.model, self.record, [images[i] for i in ok], device=self.device, dtype=torch.float16
            )
            for i, s in zip(ok, scores):
                logits[i] = s.numpy()
        return {"image_id": ids, "image": images, "label": labels, "logits": logits, "error": errors}


class ScoreStage:
    """Network rows -> counts of the raw network (``network_*``) and of the CRF (``crf_*``).

    Rows whose id is in ``sample_ids`` also keep both label maps (``network_mask``,
    ``crf_mask``) for the report; the others get empty arrays.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        crf_params,
        crf_backend: str = "pydensecrf",
        crf_device: str = "cpu",
        max_width: int = DEFAULT_MAX_WIDTH,
        sample_ids: Sequence[str] = (),
    ) -> None:
        from pipeline.crf import load_params

        self.num_classes = int(num_classes)
        self.params = load_params(crf_params)
        self.crf_backend = crf_backend
        self.crf_device = resolve_device(crf_device)
        self.max_width = int(max_width)
        self.sample_ids = frozenset(sample_ids)

    def predict(self, image: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(network labels, CRF labels), uint8 H x W."""
        import torch

        from pipeline.crf import refine
        from pipeline.preprocess import upsample_logits

        height, width = image.shape[:2]
        full = upsample_logits(torch.from_numpy(np.asarray(logits, dtype=np.float32)), height=height, width=width)
        network = full.argmax(dim=0).to(torch.uint8).numpy()
        marginals = refine(
            np.array(image, dtype=np.uint8, order="C"),  # a writable copy: Ray's zero-copy batches are read-only
            np.ascontiguousarray(full.numpy(), dtype=np.float32),
            self.params,
            backend=self.crf_backend,
            device=self.crf_device,
        )
        return network, np.asarray(marginals).argmax(axis=0).astype(np.uint8)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"image_id": [], "error": [], "network_mask": [], "crf_mask": []}
        for method in (NETWORK, CRF):
            for key in COUNT_KEYS:
                out[f"{method}_{key}"] = []
        for image_id, image, label, logits, error in zip(
            batch["image_id"], batch["image"], batch["label"], batch["logits"], batch["error"]
        ):
            counts = {}
            masks = {NETWORK: _empty(2, np.uint8), CRF: _empty(2, np.uint8)}
            if not error:
                network, crf = self.predict(image, logits)
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
            out["image_id"].append(str(image_id))
            out["error"].append(str(error))
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

