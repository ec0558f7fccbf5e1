"""Rebuild training data from a `segment` output: WebDataset tar shards or HF Parquet, as a Ray Data job.

Reads the output's live segments files in Ray tasks, keeps the ok rows (one per image) that
pass the filters, and writes per split (train/, val/: by a hash of the image id) shards whole:
each image as stored (re-encoded upright when EXIF rotates it), its label (8-bit PNG of class ids,
255 where the confidence is below --ignore-below), and its id and quality scores. Also writes
id2label.json, sampling.json (DAFormer's rare-class sampling inputs over the train split) and
_export.json. A rerun into the same --to replaces its shards; shards it did not write are removed.
See docs/training-data.md.

Exit codes: 0 done (skipped images are counted, not failures); 2 bad arguments, not a segment
output, --ignore-below without confidence maps, an unusable --to; 1 the Ray job failed or stalled.
"""

from __future__ import annotations

import argparse
import re
import sys

from jobs.cli import add_ray_arguments, job_main, print_error

EXAMPLES = """examples:
  deeplab-batch export --from out/ --to data/wds/ --format webdataset --val-fraction 0.05
  deeplab-batch export --from s3://bucket/seg/ --to s3://bucket/train/ --format hf-parquet \\
      --ignore-below 0.95 --min-confident-fraction 0.5 --classes-present person,car --limit 100000
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40, "ki": 2**10, "mi": 2**20,
          "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """Bytes of ``"268435456"``, ``"256MiB"``, ``"300MB"``, ``"1.5GiB"``."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 268435456, 256MiB or 300MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.training.export import (
        DEFAULT_IMAGES_PER_TASK,
        DEFAULT_MIN_CLASS_PIXELS,
    )
    from pipeline.training.rules import FORMATS

    parser.add_argument("--from", dest="source", required=True, metavar="OUTPUT",
                        help="the --output of a segment run (folder or s3:// prefix)")
    parser.add_argument("--to", dest="dest", required=True, metavar="DEST", help="where train/, val/ and the "
                        "JSON files go (folder or s3:// prefix)")
    parser.add_argument("--format", choices=FORMATS, default="webdataset", help="webdataset: .tar shards; "
                        "hf-parquet: Parquet with Image features (datasets.load_dataset('parquet', ...))")
    parser.add_argument("--ignore-below", type=float, default=0.0, metavar="T",
                        help="label 255 (ignored) where the 8-bit confidence c has c/255 < T; needs the output's "
                             "confidence maps (segment --confidence). Default 0: nothing ignored")
    parser.add_argument("--min-confident-fraction", type=float, default=0.0, metavar="F",
                        help="drop images whose share of pixels with confidence >= T is below F (with T = 0: the "
                             "rows' confident_fraction, at the segment run's output.training.ignore_below)")
    parser.add_argument("--classes-present", metavar="C1,C2", default="",
                        help="keep only images whose mask contains every one of these classes (names or ids)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="V",
                        help="share of images in val/ (deterministic: a hash of the image id); default 0")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="export at most N images (0 = all)")
    parser.add_argument("--shard-bytes", type=byte_size, default="256MiB", metavar="SIZE",
                        help="target size of a shard (image + label bytes), e.g. 256MiB (the default)")
    parser.add_argument("--min-class-pixels", type=int, default=DEFAULT_MIN_CLASS_PIXELS, metavar="N",
                        help="sampling.json lists an image under a class when it has at least N pixels of it "
                             f"(default {DEFAULT_MIN_CLASS_PIXELS}, DAFormer's)")
    parser.add_argument("--images-per-task", type=int, default=DEFAULT_IMAGES_PER_TASK, metavar="N",
                        help=f"images per write task (default {DEFAULT_IMAGES_PER_TASK}); a task's shards close at "
                             "its end, so shards hold at most this many images")
    parser.add_argument("--config", metavar="FILE", help="a segment configuration file: its s3: and ray: "
                        "sections are used (endpoint, credentials; address, no_progress_timeout_s)")
    add_ray_arguments(parser)


_err = print_error


def options_from(args: argparse.Namespace):
    """Arguments (+ the configuration file's s3:/ray: sections) -> ExportOptions (raises ConfigError)."""
    from pipeline.config import load_config
    from pipeline.training.export import ExportOptions

    config = load_config(args.config)
    return ExportOptions(
        source=args.source, dest=args.dest, format=args.format, ignore_below=args.ignore_below,
        min_confident_fraction=args.min_confident_fraction,
        classes_present=tuple(c.strip() for c in args.classes_present.split(",") if c.strip()),
        val_fraction=args.val_fraction, limit=args.limit,
        shard_bytes=args.shard_bytes if isinstance(args.shard_bytes, int) else byte_size(args.shard_bytes),
        min_class_pixels=args.min_class_pixels, images_per_task=args.images_per_task, s3=config.s3,
        ray_address=args.ray_address or config.ray.address, no_progress_timeout_s=config.ray.no_progress_timeout_s,
        verbose=bool(args.verbose if args.verbose is not None else config.ray.verbose),
    ), (config.ray.progress if args.progress is None else args.progress)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError

    try:
        options, progress = options_from(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    return export(options, progress=progress)


def export(options, *, progress: bool = False, echo=print) -> int:
    """Run the export (``pipeline.training.export.run_export``) and print its summary; returns the exit code."""
    from pipeline.training.export import ExportError, run_export

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="img", desc="export", file=sys.stderr)
    try:
        summary = run_export(options, progress=bar.update if bar is not None else None)
    except ExportError as exc:
        if bar is not None:
            bar.close()
        _err(str(exc))
        return exc.exit_code
    if bar is not None:
        bar.close()
    counts = summary["counts"]
    shards = summary["shards"]
    echo(f"exported {counts['exported']} image(s) in {summary['duration_s']:.1f} s: {counts['train']} train in "
         f"{len(shards['train'])} shard(s), {counts['val']} val in {len(shards['val'])} shard(s) "
         f"({summary['format']}) -> {summary['dest']}")
    echo(f"rows: {counts.get('rows_read', 0)} read, {counts.get('ok', 0)} ok, {counts.get('duplicates', 0)} "
         f"duplicate(s), dropped by filters: classes {counts.get('dropped_classes', 0)}, confident fraction "
         f"{counts.get('dropped_confident_fraction', 0)}, "
         f"no confidence map {counts.get('dropped_no_confidence_map', 0)}")
    if summary["skipped"]:
        echo("skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(summary["skipped"].items())))
        for example in summary["examples"]:
            echo(f"  {example}")
    if summary["removed_stale_shards"]:
        echo(f"removed {len(summary['removed_stale_shards'])} shard(s) of an earlier export")
    echo("wrote id2label.json, sampling.json, _export.json")
    return EXIT_OK


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
