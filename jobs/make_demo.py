"""Regenerate the bundled demo model and sample corpus (``make demo-model``).

Generates the synthetic shapes dataset, trains the small LargeFOV with the
project's training loop, scores the held-out split with the project's
evaluation code and records the mIoU in the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs.cli import job_main
from pipeline.weights import DEMO_CHECKPOINT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT, help="where to write the model")
    parser.add_argument("--data-dir", type=Path, default=None, help="keep the generated dataset here")


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import build_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = build_demo(checkpoint=args.checkpoint, data_dir=args.data_dir)
    print(f"wrote {args.checkpoint}: held-out mIoU {record.reference_metric['miou']:.4f}")
    return 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
