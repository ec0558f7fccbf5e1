"""Coarse-to-fine grid search of the dense CRF's w1, sigma_alpha, sigma_beta on Ray Tune.

The network runs once on the first --images ids of the split (scores cached under
--cache); each candidate setting is scored by the mIoU of the CRF labels. Writes
best_crf.json (a preset file for `segment --crf-params` and `evaluate --crf-params`)
and tuning.json (every setting tried) under --out. Exit codes: 0 done, 2 bad
arguments or bad data.
"""

from __future__ import annotations

import argparse
import os
import sys

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch make-demo --data-only --data-dir data/demo-voc   # the demo dataset (once)
  deeplab-batch tune-crf --data data/demo-voc --images 8 --coarse-grid "w1=4,8;sigma_alpha=30,90;sigma_beta=3,9" --rounds 1
  deeplab-batch tune-crf --data VOCdevkit/VOC2012 --weights largefov.safetensors --images 100
  deeplab-batch evaluate --data VOCdevkit/VOC2012 --weights largefov.safetensors --crf-params out/tune-crf/best_crf.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.crf import BACKENDS
    from pipeline.evaluation.tuning import DEFAULT_ROUNDS

    parser.add_argument("--data", required=True, help="VOC-format root (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/)")
    parser.add_argument("--split", default="val", help="split to tune on (default: val)")
    parser.add_argument("--images", type=int, default=100, help="tune on the first N ids of the split (default: 100, as the paper)")
    parser.add_argument(
        "--weights", default=None, help="checkpoint path or URI (default: the bundled 5-class demo model, for data/demo-voc)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="preset/file giving the fixed settings (w2, sigma_gamma, iterations, normalization); default: the model variant's preset",
    )
    parser.add_argument(
        "--coarse-grid",
        default="",
        help='first grid, e.g. "w1=5,7.5,10;sigma_alpha=50,60,70,80,90,100;sigma_beta=3,5,7,10" (the default); omitted names keep the default',
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="refinement rounds after the coarse grid (default: 2)")
    parser.add_argument("--out", default="out/tune-crf", help="output folder (default: out/tune-crf)")
    parser.add_argument("--cache", default=None, help="cache folder of network scores (default: <out>/cache)")
    parser.add_argument("--crf-backend", choices=BACKENDS, default="pydensecrf", help="dense CRF implementation (default: pydensecrf)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="network device (default: auto)")
    parser.add_argument(
        "--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per Ray Tune trial (default: 1, at most the cluster's)"
    )
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # Ray Tune's default console output ignores verbose=0; the legacy reporter honours it
    # (we show our own progress bar per round). Must be set before ray.tune is used.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

    from pathlib import Path

    from pipeline.crf import CRFParams, default_preset
    from pipeline.evaluation.runner import demo_model_hint
    from pipeline.evaluation.tuning import (
        cache_examples,
        parse_grid,
        save_result,
        search,
        trial_resources,
    )
    from pipeline.execution import init_ray
    from pipeline.weights import DEMO_CHECKPOINT, read_record

    weights = str(args.weights or DEMO_CHECKPOINT)
    if args.images < 1 or args.rounds < 0 or args.cpus_per_trial <= 0:
        print("error: --images must be >= 1, --rounds >= 0 and --cpus-per-trial > 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    record = None
    try:
        grid = parse_grid(args.coarse_grid)
        record = read_record(weights)
        base = args.base or default_preset(record.variant)
        init_ray(args.ray_address, num_cpus=args.num_cpus)
        resources = trial_resources(
            crf_backend=args.crf_backend, device=args.device, cpus_per_trial=args.cpus_per_trial
        )
        examples, num_classes = cache_examples(
            root=args.data,
            split=args.split,
            weights=weights,
            num_images=args.images,
            cache_dir=args.cache or out / "cache",
            device=args.device,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:
        message = str(error)
        if record is not None and args.weights is None:
            message = demo_model_hint(message, record=record)
        print(f"error: {message}", file=sys.stderr)
        return 2
    result = search(
        examples,
        num_classes=num_classes,
        coarse_grid=grid,
        rounds=args.rounds,
        base=base,
        backend=args.crf_backend,
        device=resources["device"],
        storage=out / "ray_tune",
        cpus_per_trial=resources["cpu"],
        progress=not args.no_progress,
    )
    paths = save_result(
        out,
        result,
        meta={
            "data": str(args.data),
            "split": args.split,
            "images": [e.image_id for e in examples],
            "weights": weights,
            "model_sha256": record.sha256,
            "coarse_grid": {k: list(v) for k, v in grid.items()},
            "rounds": args.rounds,
            "crf_backend": args.crf_backend,
        },
    )
    params: CRFParams = result.params()
    print(
        f"best over {len(result.trials)} settings on {len(examples)} images: "
        f"w1={params.w1:g} sigma_alpha={params.sigma_alpha:g} sigma_beta={params.sigma_beta:g} "
        f"(w2={params.w2:g} sigma_gamma={params.sigma_gamma:g}) mIoU {100 * result.best_miou:.2f}"
    )
    print(f"wrote {paths['preset']} (use with --crf-params) and {paths['trials']}")
    return 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
