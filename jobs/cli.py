"""``deeplab-batch``: one console script, one subcommand per job.

Each job lives in its own module ``jobs/<name>.py`` and exposes

* ``add_arguments(parser: argparse.ArgumentParser) -> None``
* ``run(args: argparse.Namespace) -> int`` (the exit code)

and ends with ``if __name__ == "__main__": raise SystemExit(main())`` where
``main = job_main(__name__)`` so ``python -m jobs.NAME`` works too.
Modules are imported only when their subcommand runs, so ``--help`` is fast
and a heavy dependency (Ray, torch) is loaded only by the jobs that need it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# subcommand -> (module, one-line help). The order is the order in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("jobs.segment", "segment an image corpus on Ray Data (masks + Parquet statistics)"),
    "report": ("jobs.report", "rebuild the HTML run report of a segment output (bounded sample, self-contained)"),
    "export": ("jobs.export", "training data (WebDataset / HF Parquet) from a segment output, on Ray Data"),
    "predict": ("jobs.predict", "segment a few local images without Ray (palette PNGs + overlays)"),
    "evaluate": ("jobs.evaluate", "score a model or existing masks on a VOC-format dataset"),
    "tune-crf": ("jobs.tune_crf", "coarse-to-fine grid search of the CRF parameters"),
    "submit": ("jobs.submit", "submit a job to a Ray cluster through the Jobs API"),
    "train": ("jobs.train", "fine-tune DeepLab V1 on a VOC-format dataset"),
    "make-demo": ("jobs.make_demo", "regenerate the demo dataset, demo model and sample corpus"),
    "convert-caffe": ("jobs.convert_caffe", "convert the authors' .caffemodel into a native checkpoint"),
    "convert-torchvision": ("jobs.convert_torchvision", "convert torchvision's VGG-16 into an initial checkpoint"),
}

EPILOG = """examples:
  deeplab-batch predict pipeline/assets/samples --out out/predict
  deeplab-batch segment --input s3://bucket/images/ --output s3://bucket/run1/
  deeplab-batch convert-caffe train2_iter_8000.caffemodel largefov.ckpt --variant largefov --classes voc
"""


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


def build_parser(prog: str = "deeplab-batch") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="DeepLab V1 (atrous VGG-16 + fully connected CRF) batch segmentation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
    name, rest = argv[0], argv[1:]
    return job_main(COMMANDS[name][0], prog=f"deeplab-batch {name}")(rest)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every Ray Data job shares: where it runs, and what its console shows."""
    parser.add_argument("--ray-address", metavar="ADDRESS", help="Ray cluster to use (default: RAY_ADDRESS or local)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    parser.add_argument("--verbose", action="store_true", default=None,
                        help="show Ray's own log lines on the console (else they go to Ray's log files only)")


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, the one form of a job's error line."""
    print(f"error: {message}", file=sys.stderr)


def job_main(module_name: str, *, prog: str | None = None) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv)`` of one job module: parse its arguments and run it."""

    def _main(argv: Sequence[str] | None = None) -> int:
        module = importlib.import_module(module_name)
        help_text = next((h for m, h in COMMANDS.values() if m == module_name), None)
        parser = argparse.ArgumentParser(
            prog=prog or f"python -m {module_name}",
            description=(module.__doc__ or help_text or "").strip() or None,
            epilog=getattr(module, "EXAMPLES", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if not hasattr(args, "verbose"):  # jobs without Ray's console noise
            return int(module.run(args) or 0)
        from jobs.console import native_logs_aside

        with native_logs_aside(enabled=not args.verbose):
            return int(module.run(args) or 0)

    return _main


if __name__ == "__main__":
    raise SystemExit(main())
