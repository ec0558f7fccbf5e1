"""Segment an image corpus on Ray Data: object storage in, palette masks and per-class statistics out.

Reads a folder/prefix of images, tar shards (WebDataset layout) or a Parquet
manifest from s3://, gs://, file:// or a plain path; decodes on CPU, runs DeepLab V1
on a fixed pool of GPU actors (CPU actors without GPUs), refines with the dense
CRF on a CPU pool (or the GPU with --crf-backend torch) and writes
masks/<image_id>.png, segments/*.parquet (one row per input), class_stats.parquet
and _run.json under --output (with --training, also training shards under
training/: docs/training-data.md). A rerun over the same output resumes: only images
without a row (or whose row is a storage error) are processed. With no
--input/--output it segments the bundled sample corpus with the demo model into ./out/.

Exit codes: 0 done (error rows are results, not failures); 2 bad arguments,
configuration, weights, an unusable input/output location, or an output made
with other weights / CRF parameters (nothing was run); 1 the Ray job itself
failed, stalled, or its final files could not be written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from jobs.cli import add_ray_arguments, job_main, print_error

EXAMPLES = """examples:
  deeplab-batch segment                                  # bundled samples + demo model -> ./out/
  deeplab-batch segment --input s3://bucket/images/ --output s3://bucket/run1/ --weights s3://bucket/largefov.safetensors
  deeplab-batch segment --input shards/ --output out/ --config jobs/configs/segment.example.yaml --no-crf
  deeplab-batch segment --input manifest.parquet --output s3://bucket/run2/ --crf-backend torch --incremental
  deeplab-batch segment --input s3://bucket/images/ --output s3://bucket/seg/ --training webdataset --ignore-below 0.9
"""

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "samples"
DEFAULT_OUTPUT = "out"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", metavar="URI", help="folder/prefix of images or .tar shards, or a .parquet manifest")
    parser.add_argument("--output", metavar="URI", help="folder/prefix for masks/, segments/, class_stats.parquet")
    parser.add_argument("--weights", metavar="URI", help="checkpoint (.safetensors); default: the bundled demo model")
    parser.add_argument("--config", metavar="FILE", help="configuration file (.yaml/.toml); flags override it")
    parser.add_argument("--crf", dest="crf", action=argparse.BooleanOptionalAction, default=None,
                        help="refine with the dense CRF (default: on)")
    parser.add_argument("--crf-backend", choices=("pydensecrf", "torch"), help="CRF implementation")
    parser.add_argument("--crf-params", metavar="NAME_OR_FILE", help="CRF preset (largefov, deeplab, msc, "
                        "msc-largefov) or a JSON/YAML file of parameters")
    parser.add_argument("--crf-resolution", metavar="RES", help="where the CRF refines: network (default: the "
                        "model's input size), full, or a longer side in pixels (crf.resolution)")
    parser.add_argument("--confidence", action="store_true", default=None,
                        help="also write confidence/<image_id>.png: the chosen class's marginal, 8-bit (255 = 1.0)")
    parser.add_argument("--ignore-below", type=float, metavar="T", help="threshold of the rows' confident_fraction "
                        "and ignored_pixels, and of the ignore label (255) in --training labels "
                        "(output.training.ignore_below; default 0 = none)")
    parser.add_argument("--training", choices=("webdataset", "hf-parquet"), metavar="FORMAT",
                        help="also write training data under OUTPUT/training/ as the run goes: webdataset (.tar "
                             "shards) or hf-parquet (output.training.format; implies --confidence; "
                             "docs/training-data.md)")
    parser.add_argument("--limit", type=int, metavar="N", help="process at most N new images")
    parser.add_argument("--incremental", action="store_true",
                        help="process only images without a row under --output. Every run does this (a rerun "
                             "resumes); the flag only states it for scheduled runs. In every mode the summary and "
                             "_run.json report new / skipped (already had a row) / failed counts")
    parser.add_argument("--allow-mixed", dest="allow_mixed", action="store_true", default=None,
                        help="resume into an output whose rows were made with other weights or CRF parameters "
                             "(refused by default)")
    parser.add_argument("--wait-for-lock", dest="wait_for_lock", type=float, metavar="SECONDS",
                        help="when another run holds --output's lease (it is writing there), wait up to SECONDS for "
                             "it to finish instead of stopping at once with exit code 2 (output.wait_for_lock_s)")
    add_ray_arguments(parser)


_err = print_error


def resolve_config(args: argparse.Namespace):
    """Configuration file + command-line flags -> SegmentConfig (raises ConfigError)."""
    from pipeline.config import load_config, override

    config = load_config(args.config)
    changes: dict[str, Any] = {}
    for flag, dotted in (("input", "input.uri"), ("output", "output.uri"), ("weights", "model.weights"),
                         ("crf", "crf.enabled"), ("crf_backend", "crf.backend"), ("crf_params", "crf.params"), ("crf_resolution", "crf.resolution"),
                         ("confidence", "output.confidence"), ("ignore_below", "output.training.ignore_below"),
                         ("training", "output.training.format"),
                         ("limit", "input.limit"), ("ray_address", "ray.address"), ("progress", "ray.progress"), ("verbose", "ray.verbose"),
                         ("allow_mixed", "output.allow_mixed"), ("wait_for_lock", "output.wait_for_lock_s")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[dotted] = value
    config = override(config, **changes) if changes else config
    if not config.input.uri and not config.output.uri:  # the embedded default: samples + demo model
        config = override(config, **{"input.uri": str(SAMPLES_DIR), "output.uri": DEFAULT_OUTPUT})
    return config


def _summary_table(stats) -> str:
    lines = [f"  {'class':<16}{'pixels':>14}{'images':>8}{'mean %':>9}"]
    for row in stats.to_pylist():
        frac = row["mean_fraction"]
        pct = "-" if frac is None or math.isnan(frac) else f"{100 * frac:.2f}"
        lines.append(f"  {row['class_name']:<16}{row['pixels']:>14}{row['images_present']:>8}{pct:>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, to_dict

    try:
        config = resolve_config(args)
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not config.input.uri or not config.output.uri:
        _err("--input and --output go together (give both, or neither for the bundled samples)")
        return EXIT_USAGE
    return segment(config, config_dict=to_dict(config))


def segment(config, *, config_dict: dict[str, Any] | None = None, echo=print) -> int:
    """Run the job (``pipeline.segment.run_segment``) and print its summary; returns the exit code."""
    from pipeline.segment import SegmentError, run_segment

    bar = _progress(enabled=config.ray.progress)
    try:
        result = run_segment(config, config_dict=config_dict, progress=bar.update)
    except SegmentError as exc:
        bar.close()
        _err(str(exc))
        return exc.exit_code
    bar.close()
    summary = result.summary
    counts, totals = summary["counts"], summary["output_rows"]
    echo(f"segmented {counts['new']} new image(s) in {summary['duration_s']:.1f} s "
         f"({summary['throughput_images_per_s']} images/s): {counts['ok']} ok, {counts['error']} failed "
         f"({counts['error_storage']} storage or transient errors, retried by the next run), {counts['skipped']} skipped "
         f"(already had a row), {counts['duplicates']} duplicate(s) dropped")
    for uri, reason in result.errors[:10]:
        echo(f"  error {uri}: {reason}")
    for uri, reason in list(summary["unread"].items())[:10]:
        echo(f"  not read (retried by the next run) {uri}: {reason}")
    echo(f"output: {totals['rows']} rows ({totals['ok']} ok, {totals['error']} error, "
         f"{totals['pending_retry']} waiting for a retry) in {summary['output_files']['segments']} segments file(s)")
    echo("class statistics over all rows under the output:")
    echo(_summary_table(result.class_stats))
    echo(f"masks: {result.paths['masks']}/   rows: {result.paths['segments']}/   summary: {result.paths['summary']}")
    if summary.get("training"):
        training = summary["training"]
        echo(f"training data: {result.paths['training']}/ ({training['format']}, {training['shards']} shard(s), "
             f"{training['bytes'] / 1e6:.1f} MB)")
    echo(f"report: {result.paths.get('report') or 'not written (see the warning above)'}")
    return EXIT_OK


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(*, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(unit="img", desc="segment", file=sys.stderr)


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
