"""The bundled demo: a small LargeFOV trained on the synthetic shapes dataset, and a sample corpus.

The demo model is for trying the pipeline end to end, not for real images: it
knows five classes of textured shapes (``pipeline.data.synthetic``). For real
use, convert the authors' weights (``deeplab-batch convert-caffe``) or train on
real data (``deeplab-batch train``). ``make demo-model`` regenerates both assets
with the settings below; the same seeds give the same data, and the same
training run on the same torch build and thread count.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image

from pipeline.constants import voc_palette
from pipeline.data import synthetic
from pipeline.evaluation.runner import evaluate_model_in_process, reference_metric
from pipeline.train import TrainConfig, config_dict, train
from pipeline.weights import DEMO_CHECKPOINT, ModelRecord, save_checkpoint

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).parent / "assets" / "samples"
DATASET = {"num_train": 600, "num_val": 100, "seed": 0, "min_size": 128, "max_size": 192}
SAMPLES = {"count": 24, "seed": 1, "min_size": 160, "max_size": 240}
TRAIN = dict(
    split="train", variant="largefov", num_classes=len(synthetic.CLASS_NAMES), width=0.125,
    crop_size=129, batch_size=8, iterations=12000, lr=0.01, lr_policy="poly", clip_grad_norm=5.0,
    seed=0, threads=1,
)
INPUT_SIZE = 321  # images are padded to this side, as the network stage of `segment` does
CRF_PRESET = "largefov"


def write_samples(out_dir: Path = SAMPLES_DIR) -> list[Path]:
    """The sample corpus: synthetic scenes the demo model never saw (another seed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("sample_*"):
        old.unlink()
    paths = []
    for index in range(SAMPLES["count"]):
        image, _ = synthetic.render_sample(
            SAMPLES["seed"], index, min_size=SAMPLES["min_size"], max_size=SAMPLES["max_size"]
        )
        path = out_dir / f"sample_{index:03d}.jpg"
        Image.fromarray(image).save(path, quality=synthetic.JPEG_QUALITY)
        paths.append(path)
    return paths


def write_dataset(root: Path, *, scale: int = 1) -> Path:
    """The demo's VOC-format dataset (train 600 / val 100): exactly as the demo model saw it at ``scale`` 1;
    the same scenes ``scale`` times larger otherwise (:func:`pipeline.data.synthetic.render_sample`)."""
    return synthetic.generate_dataset(root, **DATASET, scale=scale)


def build_demo(*, checkpoint: Path = DEMO_CHECKPOINT, data_dir: Path | None = None) -> ModelRecord:
    """Generate the dataset, train, score the held-out split, write the checkpoint and the samples."""
    work = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="deeplab-demo-"))
    try:
        write_dataset(work)
        config = TrainConfig(data=str(work), **TRAIN)
        model, history = train(config)
        record = ModelRecord(
            variant=config.variant, num_classes=config.num_classes, class_names=synthetic.CLASS_NAMES,
            palette=tuple(voc_palette(config.num_classes)), width=config.width, input_size=INPUT_SIZE,
            source="demo: trained by `make demo-model` on pipeline.data.synthetic shapes",
            notes=json.dumps({"train_config": {**config_dict(config), "data": "<generated>"},
                              "final_loss": history[-1]["loss"], "torch": torch.__version__}),
        )
        save_checkpoint(checkpoint, model=model, record=record)
        # Scored from the saved file by the same stages as `deeplab-batch evaluate`.
        run = evaluate_model_in_process(root=str(work), split="val", weights=str(checkpoint), crf_params=CRF_PRESET)
        metric = {**reference_metric(run, crf_params=CRF_PRESET),
                  "dataset": f"pipeline.data.synthetic {json.dumps(DATASET, sort_keys=True)}"}
        log.info("held-out mIoU %.4f (network), %.4f (with CRF)", metric["miou"], metric["miou_crf"])
        record = save_checkpoint(checkpoint, model=model, record=record.replace(reference_metric=metric))
        write_samples()
        return record
    finally:
        if data_dir is None:
            shutil.rmtree(work, ignore_errors=True)
