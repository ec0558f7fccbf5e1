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
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="where to write the model")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated dataset here")
    parser.add_argument("--data-only", action="store_true",
                        help="only write the demo dataset (VOC format) to --data-dir; no training")


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import build_demo, write_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.data_only:
        if args.data_dir is None:
            print("error: --data-only needs --data-dir", file=sys.stderr)
            return 2
        write_dataset(args.data_dir)
        print(f"wrote the demo dataset (VOC format, splits train and val) to {args.data_dir}")
        return 0
    record = build_demo(checkpoint=args.checkpoint, data_dir=args.data_dir)
    print(f"wrote {args.checkpoint}: held-out mIoU {record.reference_metric['miou']:.4f}")
    return 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
