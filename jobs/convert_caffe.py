"""Convert the DeepLab authors' released .caffemodel into a native checkpoint.

Reads the protobuf wire format directly (no Caffe needed; old V1 and newer
schemas), maps the layers by name onto the chosen variant (dilations come from
the variant, never from the file), checks every shape, and writes one
.safetensors file with the model record (class names, palette, mean, checksum).
Exit codes: 0 written, 1 the input does not fit the variant or is unreadable,
2 bad command line.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch convert-caffe train2_iter_8000.caffemodel models/largefov.safetensors \\
      --variant largefov --classes voc --reference-split voc12-val --reference-miou 0.6225
  deeplab-batch convert-caffe model.caffemodel s3://bucket/models/msc.safetensors \\
      --variant msc-largefov --rename fc8_data_voc12=fc8_data
  deeplab-batch convert-caffe vgg16_20M.caffemodel models/init.safetensors \\
      --variant largefov --num-classes 1000   # ImageNet init as released (1000-class fc8)
"""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared with convert-torchvision: OUT, --variant, classes, input size, notes."""
    from pipeline.constants import DEFAULT_INPUT_SIZE
    from pipeline.model import VARIANTS

    parser.add_argument("output", metavar="OUT", help="the checkpoint to write (.safetensors; path or s3:// URI)")
    parser.add_argument("--variant", required=True, choices=VARIANTS, help="the network the weights belong to")
    parser.add_argument(
        "--classes",
        metavar="voc|FILE",
        help="class names: 'voc' (21 PASCAL VOC classes) or a text file, one 'name' or 'name R G B' per line",
    )
    parser.add_argument("--num-classes", type=int, help="number of classes (default: from --classes or the weights)")
    parser.add_argument(
        "--input-size",
        type=int,
        default=DEFAULT_INPUT_SIZE,
        help=f"side (8k+1) images are padded to at test time (default {DEFAULT_INPUT_SIZE})",
    )
    parser.add_argument("--notes", default="", help="free text stored in the record")


def report(output: str, *, model, record) -> None:
    """One summary line per fact, on stdout."""
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output}")
    print(f"  variant {record.variant}, {record.num_classes} classes, width {record.width}, {params:,} parameters")
    print(f"  sha256 {record.sha256}")
    print(f"  source {record.source}")


def convert_and_save(job: str, output: str, convert) -> int:
    """Shared tail of the convert jobs: ``convert()`` -> (model, record), save, report; errors -> 1.

    Conversion, format and record errors are ``ValueError``/``FileNotFoundError`` naming the
    problem; they are printed as one ``JOB: error: ...`` line, and nothing is written.
    """
    from pipeline.weights import save_checkpoint

    try:
        model, record = convert()
        record = save_checkpoint(output, model=model, record=record)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{job}: error: {exc}", file=sys.stderr)
        return 1
    report(output, model=model, record=record)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.caffemodel", help="the .caffemodel file (local path or fsspec URI)")
    add_common_arguments(parser)
    parser.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="FILE_NAME=MODEL_NAME",
        help="map a layer of the file onto a model layer (repeatable); fc8_voc12 -> fc8 is automatic",
    )
    parser.add_argument(
        "--ignore-extra-layers",
        action="store_true",
        help="drop layers with weights that the variant has no place for (default: error)",
    )
    parser.add_argument("--reference-split", help="split the reference metric was measured on, e.g. voc12-val")
    parser.add_argument("--reference-miou", type=float, help="published mIoU on --reference-split (0..1)")


def _renames(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ValueError(f"--rename: expected FILE_NAME=MODEL_NAME, got {pair!r}")
        out[source] = target
    return out


def run(args: argparse.Namespace) -> int:
    from pipeline.convert.caffe import convert_caffemodel

    reference = None
    if args.reference_miou is not None:
        reference = {"split": args.reference_split or "unknown", "miou": args.reference_miou}
    return convert_and_save(
        "convert-caffe",
        args.output,
        lambda: convert_caffemodel(
            args.input,
            variant=args.variant,
            classes=args.classes,
            num_classes=args.num_classes,
            rename=_renames(args.rename),
            allow_extra=args.ignore_extra_layers,
            input_size=args.input_size,
            reference_metric=reference,
            notes=args.notes,
        ),
    )


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
