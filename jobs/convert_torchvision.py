"""Convert torchvision's ImageNet VGG-16 into an initial DeepLab V1 checkpoint for fine-tuning.

The 13 convolutions are copied, fc6/fc7 are decimated to the variant's shape
(the DeepLab authors' vgg16_20M recipe, see docs/weights.md), torchvision's RGB
mean/std normalisation is folded into conv1_1 so the checkpoint takes the
pipeline's BGR mean-subtracted input, and fc8 (plus the MSc branches) is
initialised afresh. The .pth is read with torch.load(weights_only=True): no
arbitrary objects are unpickled. A .safetensors of the same state dict works too.
Exit codes: 0 written, 1 the input is not a VGG-16 state dict, 2 bad command line.
"""

from __future__ import annotations

import argparse

from jobs.cli import job_main
from jobs.convert_caffe import add_common_arguments, convert_and_save

EXAMPLES = """examples:
  deeplab-batch convert-torchvision vgg16-397923af.pth models/init-largefov.safetensors --variant largefov
  deeplab-batch convert-torchvision vgg16.safetensors s3://bucket/models/init.safetensors \\
      --variant msc-largefov --classes my-classes.txt --seed 1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="VGG16.pth", help="torchvision vgg16 state dict (.pth or .safetensors)")
    add_common_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh fc8 / MSc initialisation")


def run(args: argparse.Namespace) -> int:
    from pipeline.convert.torchvision import convert_torchvision

    return convert_and_save(
        "convert-torchvision",
        args.output,
        lambda: convert_torchvision(
            args.input,
            variant=args.variant,
            num_classes=args.num_classes,
            classes=args.classes,
            seed=args.seed,
            input_size=args.input_size,
            notes=args.notes,
        ),
    )


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
