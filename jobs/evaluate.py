"""Score a model (raw network and CRF-refined, in one run) or existing masks on a VOC-format dataset.

Writes metrics.json, metrics.parquet, images.parquet, trimap_accuracy.png,
trimap_miou.png, class_iou.png and a self-contained report.html under --out.
Exit codes: 0 done, 1 the run stalled (--stall-timeout), 2 bad arguments or bad
data (the message names the file).
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch make-demo --data-only --data-dir data/demo-voc   # the demo dataset (once)
  deeplab-batch evaluate --data data/demo-voc --split val --out out/eval
  deeplab-batch evaluate --data VOCdevkit/VOC2012 --weights largefov.safetensors --crf-params largefov --limit 100
  deeplab-batch evaluate --data VOCdevkit/VOC2012 --predictions out/segment --out out/eval-segment
  deeplab-batch evaluate --data VOCdevkit/VOC2012 --predictions s3://bucket/masks/ --classes voc
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.crf import BACKENDS
    from pipeline.evaluation.runner import DEFAULT_STALL_TIMEOUT_S
    from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH

    parser.add_argument("--data", required=True, help="VOC-format root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
    parser.add_argument("--split", default="val", help="split name: ImageSets/Segmentation/<split>.txt (default: val)")
    parser.add_argument(
        "--weights",
        default=None,
        help="checkpoint path or URI (default: the bundled 5-class demo model; with --predictions: its class names)",
    )
    parser.add_argument(
        "--crf-params",
        default=None,
        help="CRF preset name or JSON/YAML file, e.g. one written by tune-crf (default: the preset of the model's variant, else largefov)",
    )
    parser.add_argument("--crf-backend", choices=BACKENDS, default="pydensecrf", help="dense CRF implementation (default: pydensecrf)")
    parser.add_argument(
        "--crf-resolution",
        default="network",
        help="working resolution of the CRF, as segment's crf.resolution: 'network' (the longer side at the "
        "model's input size), 'full', or a longer side in pixels (default: network)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="network device (default: auto)")
    parser.add_argument(
        "--predictions",
        default=None,
        help="score existing masks instead of running a model: folder/URI with <id>.png or masks/<id>[-<hash>].png",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="with --predictions: 'voc' or a classes file (default: the model record a `segment` output "
        "stores, else the class names of --weights)",
    )
    parser.add_argument("--out", default="out/evaluate", help="output folder (default: out/evaluate)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N ids of the split (0 = all)")
    parser.add_argument("--max-width", type=int, default=DEFAULT_MAX_WIDTH, help="widest trimap band in pixels (default: 40)")
    parser.add_argument("--samples", type=int, default=4, help="sample overlays in the report (default: 4)")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images per network batch (segment's network.batch_size; default: 4)"
    )
    parser.add_argument(
        "--crf-actors",
        type=int,
        default=0,
        help="CRF actors (segment's crf.pool_size; with --predictions: scoring tasks at a time); "
        "default: sized by segment's resource planner from the cluster's free CPUs",
    )
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        help="fail when the run makes no progress for this many seconds (default: %(default)g; 0 = wait forever)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines on the console")


def run(args: argparse.Namespace) -> int:
    from pipeline.crf import default_preset
    from pipeline.data.voc import VOCDataset
    from pipeline.evaluation.report import write_report
    from pipeline.evaluation.runner import (
        EvaluationDataError,
        demo_model_hint,
        evaluate_model,
        evaluate_predictions,
    )
    from pipeline.execution import Stalled, init_ray
    from pipeline.resolution import check_resolution
    from pipeline.weights import DEMO_CHECKPOINT, read_record

    weights = str(args.weights or DEMO_CHECKPOINT)
    if args.limit < 0 or args.max_width < 1 or args.samples < 0 or args.batch_size < 1 or args.stall_timeout < 0:
        print(
            "error: --limit, --samples and --stall-timeout must be >= 0, --max-width and --batch-size >= 1",
            file=sys.stderr,
        )
        return 2
    if args.crf_actors < 0:
        print(f"error: --crf-actors: expected >= 0, got {args.crf_actors}", file=sys.stderr)
        return 2
    try:
        crf_resolution = check_resolution(args.crf_resolution, name="--crf-resolution")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = None
    try:
        if args.predictions is not None:
            class_names, palette, classes_from = prediction_classes(args)
        else:
            record = read_record(weights)
        init_ray(args.ray_address, num_cpus=args.num_cpus, verbose=args.verbose)
        common = {
            "root": args.data,
            "split": args.split,
            "limit": args.limit,
            "max_width": args.max_width,
            "num_samples": args.samples,
            "progress": not args.no_progress,
            "stall_timeout_s": args.stall_timeout,
        }
        if args.predictions is not None:
            result = evaluate_predictions(
                predictions=args.predictions,
                class_names=tuple(class_names),
                workers=args.crf_actors,
                meta={"classes_from": classes_from},
                **common,
            )
        else:
            palette = record.palette
            result = evaluate_model(
                weights=weights,
                crf_params=args.crf_params or default_preset(record.variant),
                crf_backend=args.crf_backend,
                crf_resolution=crf_resolution,
                device=args.device,
                batch_size=args.batch_size,
                crf_actors=args.crf_actors,
                **common,
            )
    except (EvaluationDataError, FileNotFoundError, ValueError) as error:
        message = str(error)
        if record is not None and args.weights is None:
            message = demo_model_hint(message, record=record)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except Stalled as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    evaluation = result.evaluation
    paths = evaluation.write(args.out)
    dataset = VOCDataset(args.data, split=args.split)

    def load_example(image_id: str):
        _, image, label = dataset[dataset.ids.index(image_id)]
        return image, label

    paths.update(write_report(args.out, evaluation, samples=result.samples, load_example=load_example, palette=palette))
    print(f"{evaluation.num_images} images of {args.data} ({args.split})")
    for line in evaluation.summary_lines():
        print(line)
    print(f"wrote {paths['json']}, {paths['parquet']}, {paths['html']}")
    return 0


def prediction_classes(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple, str]:
    """(class names, palette, where they came from) for ``--predictions``.

    ``--classes``, else ``--weights``, else the model record a ``segment`` output stores.
    """
    from pipeline.evaluation.predictions import segment_model_record
    from pipeline.weights import read_record, resolve_classes

    if args.classes is not None:
        names, palette = resolve_classes(args.classes)
        return tuple(names), palette, f"--classes {args.classes}"
    if args.weights is not None:
        record = read_record(args.weights)
        return record.class_names, record.palette, f"--weights {args.weights}"
    stored = segment_model_record(args.predictions)
    if stored is None:
        raise ValueError(
            f"{args.predictions}: no model record found (it holds no segments/*.parquet or class_stats.parquet "
            "written by `deeplab-batch segment`), so the class names are unknown: pass --classes voc|FILE "
            "or --weights CKPT"
        )
    palette = tuple(tuple(int(v) for v in colour) for colour in stored["palette"])
    return tuple(stored["class_names"]), palette, stored["found_in"]


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
