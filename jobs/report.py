"""Rebuild the HTML run report of a `segment` output (local path or s3://, gs://).

Writes one self-contained page (inline CSS, SVG charts and thumbnails; no script, no
network): counts and times of the last run, per-class pixel share and images per
class, a gallery (image, mask overlay, confidence: a random sample, the least
confident, the richest in each class), the errors grouped by reason, the model
record and the CRF parameters. It reads the merged aggregates (class_stats.parquet,
_index/, _run.json) and a bounded random sample of the rows: at most 16 segments
files, 1,024 rows of each, and the images of at most 64 rows, whatever the size of
the output. `segment` writes the same page to <output>/report.html after each run.

Exit codes: 0 written; 2 not a segment output, or it cannot be read, or --out cannot be written.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch report out                          # -> out/report.html (after `deeplab-batch segment`)
  deeplab-batch report s3://bucket/seg/ --out report.html --config job.yaml   # S3 settings from the config's s3:
  deeplab-batch report out --seed 7 --out /tmp/other-sample.html
"""

EXIT_OK, EXIT_USAGE = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="the --output of a segment run (folder or s3:// prefix)")
    parser.add_argument("--out", metavar="FILE", help="where to write the page (default: OUTPUT/report.html)")
    parser.add_argument("--config", metavar="FILE", help="a segment configuration file: only its s3: section is "
                        "used (endpoint, region, profile); default: the standard AWS environment")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random sample (default: 0)")


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from pipeline.config import ConfigError, load_config
    from pipeline.io.uris import (
        InputError,
        filesystem_for,
        normalize_uri,
        storage_errors,
    )
    from pipeline.outputs import RUN_FILE, SEGMENTS_DIR, OutputLayout
    from pipeline.outputs.index import OutputStateError
    from pipeline.outputs.report import DEFAULT_SEED, write_report

    try:
        s3 = load_config(args.config).s3
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    output = normalize_uri(args.output)
    layout = OutputLayout(uri=output, s3=s3)
    try:
        fs, _ = filesystem_for(output, s3=s3)
        has_rows = fs.exists(filesystem_for(layout.path(SEGMENTS_DIR), s3=s3)[1])
        has_run = fs.exists(filesystem_for(layout.path(RUN_FILE), s3=s3)[1])
        if not (has_rows or has_run):
            _err(f"{output}: not a segment output (no segments/ and no {RUN_FILE})")
            return EXIT_USAGE
        path = write_report(layout, out=args.out, seed=DEFAULT_SEED if args.seed is None else args.seed)
    except (InputError, OutputStateError) as exc:
        _err(str(exc))
        return EXIT_USAGE
    except pa.ArrowException as exc:
        _err(f"{output}: a file cannot be read as Parquet ({type(exc).__name__}: {exc})")
        return EXIT_USAGE
    except storage_errors() as exc:
        _err(f"{output}: cannot be read, or --out cannot be written ({type(exc).__name__}: {exc})")
        return EXIT_USAGE
    print(f"report: {path}")
    return EXIT_OK


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
