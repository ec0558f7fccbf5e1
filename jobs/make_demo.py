"""Regenerate the bundled demo model and sample corpus (``make demo-model``).

Generates the synthetic shapes dataset, trains the small LargeFOV with the
project's training loop, scores the held-out split with the project's
evaluation code and records the mIoU in the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.cli import job_main
from pipeline.weights import DEMO_CHECKPOINT

EXAMPLES = """examples:
  deeplab-batch make-demo                                   # retrain the bundled demo model (minutes)
  deeplab-batch make-demo --data-only --data-dir data/demo-voc   # the demo dataset alone (seconds)
  deeplab-batch make-demo --data-only --scale 4 --data-dir data/demo-voc-x4   # the same scenes at 4x resolution
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="where to write the model")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated dataset here")
    parser.add_argument("--data-only", action="store_true",
                        help="only write the demo dataset (VOC format) to --data-dir; no training")
    parser.add_argument("--scale", type=int, default=1,
                        help="with --data-only: render the same scenes this many times larger (default 1)")


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import build_demo, write_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.scale < 1:
        print(f"error: --scale: expected an integer >= 1, got {args.scale}", file=sys.stderr)
        return 2
    if args.data_only:
        if args.data_dir is None:
            print("error: --data-only needs --data-dir", file=sys.stderr)
            return 2
        write_dataset(args.data_dir, scale=args.scale)
        at = f" at {args.scale}x resolution" if args.scale > 1 else ""
        print(f"wrote the demo dataset (VOC format, splits train and val){at} to {args.data_dir}")
        return 0
    if args.scale != 1:
        print("error: --scale applies to --data-only (the demo model trains at scale 1)", file=sys.stderr)
        return 2
    record = build_demo(checkpoint=args.checkpoint, data_dir=args.data_dir)
    print(f"wrote {args.checkpoint}: held-out mIoU {record.reference_metric['miou']:.4f}")
    return 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
