"""Score a model (raw network and CRF-refined, in one run) or existing masks on a VOC-format dataset.

Writes metrics.json, metrics.parquet, images.parquet, trimap_accuracy.png,
trimap_miou.png, class_iou.png and a self-contained report.html under --out.
Exit codes: 0 done, 2 bad arguments or bad data (the message names the file).
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch evaluate --data data/demo-voc --split val --out out/eval
  deeplab-batch evaluate --data VOC2012 --weights largefov.safetensors --crf-params largefov --limit 100
  deeplab-batch evaluate --data VOC2012 --predictions s3://bucket/run1/ --out out/eval-run1
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.crf import BACKENDS
    from pipeline.evaluation.trimap import DEFAULT_MAX_WIDTH

    parser.add_argument("--data", required=True, help="VOC-format root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
    parser.add_argument("--split", default="val", help="split name: ImageSets/Segmentation/<split>.txt (default: val)")
    parser.add_argument("--weights", default=None, help="checkpoint path or URI (default: the bundled demo model)")
    parser.add_argument(
        "--crf-params",
        default=None,
        help="CRF preset name or JSON/YAML file, e.g. one written by tune-crf (default: the preset of the model's variant, else largefov)",
    )
    parser.add_argument("--crf-backend", choices=BACKENDS, default="pydensecrf", help="dense CRF implementation (default: pydensecrf)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="network device (default: auto)")
    parser.add_argument(
        "--predictions",
        default=None,
        help="score existing masks instead of running a model: folder/URI with <id>.png or masks/<id>[-<hash>].png",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="with --predictions: 'voc' or a classes file (default: the class names of --weights / the demo model)",
    )
    parser.add_argument("--out", default="out/evaluate", help="output folder (default: out/evaluate)")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N ids of the split (0 = all)")
    parser.add_argument("--max-width", type=int, default=DEFAULT_MAX_WIDTH, help="widest trimap band in pixels (default: 40)")
    parser.add_argument("--samples", type=int, default=4, help="sample overlays in the report (default: 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per network batch (default: 4)")
    parser.add_argument("--crf-actors", type=int, default=0, help="CRF / scoring actors (default: CPUs - 1)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def default_crf_params(variant: str) -> str:
    from pipeline.crf import PRESETS

    return variant if variant in PRESETS else "largefov"


def run(args: argparse.Namespace) -> int:
    from pipeline.data.voc import VOCDataset
    from pipeline.evaluation.report import write_report
    from pipeline.evaluation.runner import EvaluationDataError, evaluate_model, evaluate_predictions, init_ray
    from pipeline.weights import DEMO_CHECKPOINT, read_record, resolve_classes

    weights = str(args.weights or DEMO_CHECKPOINT)
    if args.limit < 0 or args.max_width < 1 or args.samples < 0 or args.batch_size < 1:
        print("error: --limit and --samples must be >= 0, --max-width and --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        record = read_record(weights) if (args.predictions is None or args.classes is None) else None
        init_ray(address=args.ray_address, num_cpus=args.num_cpus)
        _quiet_ray_data()
        common = {
            "root": args.data,
            "split": args.split,
            "limit": args.limit,
            "max_width": args.max_width,
            "num_samples": args.samples,
            "progress": not args.no_progress,
        }
        if args.predictions is not None:
            if args.classes is not None:
                class_names, palette = resolve_classes(args.classes)
            else:
                class_names, palette = record.class_names, record.palette
            result = evaluate_predictions(
                predictions=args.predictions, class_names=tuple(class_names), workers=args.crf_actors, **common
            )
        else:
            palette = record.palette
            result = evaluate_model(
                weights=weights,
                crf_params=args.crf_params or default_crf_params(record.variant),
                crf_backend=args.crf_backend,
                device=args.device,
                batch_size=args.batch_size,
                crf_actors=args.crf_actors,
                **common,
            )
    except (EvaluationDataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

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


def _quiet_ray_data() -> None:
    """Our tqdm bar shows progress; Ray Data's own bars would interleave with it."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
