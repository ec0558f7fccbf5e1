"""Single-process fine-tuning of DeepLab V1, following the paper's recipe.

SGD (momentum 0.9, weight decay 5e-4 on weights, none on biases), the
classifiers (fc8 and the MSc fc8_*) at 10x the learning rate, a ``poly``
(power 0.9) or ``step`` schedule, random crops with mirroring, and a
cross-entropy loss on the labels subsampled by 8 (``label[::8, ::8]`` for an
8k+1 crop), 255 ignored. Data: a VOC-format folder (``pipeline.data.voc``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.constants import CHANNEL_ORDER, IGNORE_LABEL, MEAN_BGR, OUTPUT_STRIDE
from pipeline.data.voc import VOCDataset
from pipeline.inference import fit_for_network
from pipeline.model import VARIANTS, DeepLabV1, deeplab_v1
from pipeline.preprocess import prepare_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    data: str
    split: str = "train"
    variant: str = "largefov"
    num_classes: int = 21
    width: float = 1.0
    crop_size: int = 321
    batch_size: int = 10
    iterations: int = 6000
    lr: float = 1e-3
    classifier_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_policy: Literal["poly", "step"] = "poly"
    power: float = 0.9
    step_size: int = 2000
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0: off (the paper's recipe); > 0 stabilises training from scratch
    seed: int = 0
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        checks = {
            "variant": self.variant in VARIANTS,
            "crop_size": self.crop_size >= 9 and self.crop_size % OUTPUT_STRIDE == 1,
            "batch_size": self.batch_size >= 1,
            "iterations": self.iterations >= 1,
            "lr": self.lr > 0,
            "lr_policy": self.lr_policy in ("poly", "step"),
            "num_classes": self.num_classes >= 2,
        }
        for field, ok in checks.items():
            if not ok:
                hint = " (crop_size must be 8k+1, e.g. 321)" if field == "crop_size" else ""
                raise ValueError(f"{field}: invalid value {getattr(self, field)!r}{hint}")


def learning_rate(config: TrainConfig, iteration: int) -> float:
    if config.lr_policy == "poly":
        return config.lr * (1 - iteration / config.iterations) ** config.power
    return config.lr * config.gamma ** (iteration // config.step_size)


def random_crop(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, *, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pad (mean colour / ignore) to at least size x size, crop at random, mirror half the time."""
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        mean_rgb = np.array(MEAN_BGR[::-1], dtype=np.float32).round().astype(np.uint8)
        image = np.concatenate([image, np.broadcast_to(mean_rgb, (ph, w, 3))], axis=0) if ph else image
        image = np.concatenate([image, np.broadcast_to(mean_rgb, (image.shape[0], pw, 3))], axis=1) if pw else image
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_LABEL)
    h, w = label.shape
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    image, label = image[y : y + size, x : x + size], label[y : y + size, x : x + size]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def make_optimizer(model: DeepLabV1, config: TrainConfig) -> torch.optim.SGD:
    classifier = {id(p) for p in model.classifier_parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        groups.setdefault((id(p) in classifier, name.endswith(".bias")), []).append(p)
    param_groups = [
        {
            "params": params,
            "lr_mult": config.classifier_lr_mult if is_classifier else 1.0,
            "weight_decay": 0.0 if is_bias else config.weight_decay,
        }
        for (is_classifier, is_bias), params in groups.items()
    ]
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum)


def train(
    config: TrainConfig,
    *,
    model: DeepLabV1 | None = None,
    mean_bgr: tuple[float, float, float] = MEAN_BGR,
    channel_order: str = CHANNEL_ORDER,
    log_every: int = 50,
) -> tuple[DeepLabV1, list[dict]]:
    """Fine-tune ``model`` (or a fresh one) and return it with the loss history.

    ``mean_bgr`` and ``channel_order`` are the checkpoint record's (an ``--init``
    checkpoint keeps its own preprocessing).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dataset = VOCDataset(config.data, split=config.split, num_classes=config.num_classes)
    samples = [dataset[i][1:] for i in range(len(dataset))]
    if model is None:
        model = deeplab_v1(config.variant, num_classes=config.num_classes, width=config.width)
    model.train()
    optimizer = make_optimizer(model, config)
    history = []
    start = time.perf_counter()
    for iteration in range(config.iterations):
        lr = learning_rate(config, iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        crops = [random_crop(rng, *samples[int(i)], size=config.crop_size)
                 for i in rng.integers(0, len(samples), size=config.batch_size)]
        inputs = prepare_batch(
            [fit_for_network(c[0], input_size=config.crop_size, channel_order=channel_order) for c in crops],
            input_size=config.crop_size, mean_bgr=mean_bgr,
        )
        # Labels subsampled by 8 onto the score map's grid.
        target = torch.from_numpy(np.stack([c[1][::OUTPUT_STRIDE, ::OUTPUT_STRIDE] for c in crops])).long()
        scores = model(inputs)
        loss = F.cross_entropy(scores, target, ignore_index=IGNORE_LABEL)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at iteration {iteration}; lower lr (now {config.lr})")
        if iteration % log_every == 0 or iteration == config.iterations - 1:
            history.append({"iteration": iteration, "loss": loss.item(), "lr": lr,
                            "seconds": round(time.perf_counter() - start, 1)})
            log.info("iter %d loss %.4f lr %.2e (%.0f s)", iteration, loss.item(), lr, time.perf_counter() - start)
    model.eval()
    return model, history


def config_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
