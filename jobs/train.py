"""Fine-tune DeepLab V1 on a VOC-format dataset (single process, the paper's recipe).

Writes a native checkpoint whose record carries the classes and, when a
validation split is given, the network-only mIoU measured on it.
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs.cli import job_main
from pipeline.crf import default_preset
from pipeline.evaluation.runner import evaluate_model_in_process, reference_metric
from pipeline.model import VARIANTS
from pipeline.train import TrainConfig, config_dict, train
from pipeline.weights import ModelRecord, load_checkpoint, resolve_classes, save_checkpoint

EXAMPLES = """examples:
  deeplab-batch convert-torchvision vgg16-397923af.pth init.safetensors --variant largefov
  deeplab-batch train --data VOCdevkit/VOC2012 --classes voc --init init.safetensors --out largefov.safetensors
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="VOC-format root (JPEGImages/, SegmentationClass/, ImageSets/)")
    parser.add_argument("--out", required=True, help="checkpoint to write (path or fsspec URI)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--val-split", default=None, help="split to score after training (recorded in the checkpoint)")
    parser.add_argument("--init", default=None, help="checkpoint to start from (e.g. from convert-torchvision)")
    parser.add_argument("--variant", default="largefov", choices=VARIANTS)
    parser.add_argument("--classes", default=None, help="'voc' or a classes file (one name [R G B] per line)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (< 1 for small models)")
    defaults = TrainConfig(data="")
    for field in ("crop_size", "batch_size", "iterations", "lr", "momentum", "weight_decay", "power",
                  "step_size", "gamma", "classifier_lr_mult", "clip_grad_norm", "seed", "threads"):
        value = getattr(defaults, field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--lr-policy", choices=("poly", "step"), default=defaults.lr_policy)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, preprocessing = None, {}
    if args.init:
        model, init_record = load_checkpoint(args.init)
        names, palette = init_record.class_names, init_record.palette
        variant, width = init_record.variant, init_record.width
        preprocessing = {"mean_bgr": init_record.mean_bgr, "channel_order": init_record.channel_order}
        if args.classes or args.num_classes:
            requested, _ = resolve_classes(args.classes, num_classes=args.num_classes)
            if len(requested) != init_record.num_classes:
                raise SystemExit(f"--init has {init_record.num_classes} classes but --classes/--num-classes ask for {len(requested)}")
            names = requested
    else:
        names, palette = resolve_classes(args.classes, num_classes=args.num_classes)
        variant, width = args.variant, args.width
    config = TrainConfig(
        data=args.data, split=args.split, variant=variant, num_classes=len(names), width=width,
        crop_size=args.crop_size, batch_size=args.batch_size, iterations=args.iterations, lr=args.lr,
        classifier_lr_mult=args.classifier_lr_mult, momentum=args.momentum, weight_decay=args.weight_decay,
        lr_policy=args.lr_policy, power=args.power, step_size=args.step_size, gamma=args.gamma,
        clip_grad_norm=args.clip_grad_norm, seed=args.seed, threads=args.threads,
    )
    model, history = train(config, model=model, **preprocessing)
    record = ModelRecord(
        variant=variant, num_classes=len(names), class_names=names, palette=palette, width=width, **preprocessing,
        source=f"deeplab-batch train on {args.data} ({args.split})",
        notes=json.dumps({"train_config": config_dict(config), "final_loss": history[-1]["loss"]}),
    )
    record = save_checkpoint(args.out, model=model, record=record)
    summary = ""
    if args.val_split:
        preset = default_preset(variant)
        run_ = evaluate_model_in_process(root=args.data, split=args.val_split, weights=args.out, crf_params=preset)
        metric = reference_metric(run_, crf_params=preset)
        record = save_checkpoint(args.out, model=model, record=record.replace(reference_metric=metric))
        summary = f", {args.val_split} mIoU {metric['miou']:.4f} (with CRF {metric['miou_crf']:.4f})"
    print(f"wrote {args.out} (sha256 {record.sha256[:12]}…){summary}")
    return 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
