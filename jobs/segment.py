"""Segment an image corpus on Ray Data: object storage in, palette masks and per-class statistics out.

Reads a folder/prefix of images, tar shards (WebDataset layout) or a Parquet
manifest from s3://, gs://, file:// or a plain path; decodes on CPU, runs DeepLab V1
on a fixed pool of GPU actors (CPU actors without GPUs), refines with the dense
CRF on a CPU pool (or the GPU with --crf-backend torch) and writes
masks/<image_id>.png, segments/*.parquet (one row per input), class_stats.parquet
and _run.json under --output. A rerun over the same output resumes: only images
without a row are processed. With no --input/--output it segments the bundled
sample corpus with the demo model into ./out/.

Exit codes: 0 done (error rows are results, not failures); 2 bad arguments,
configuration, weights or an unusable input/output location (nothing was run);
1 the Ray job itself failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from jobs.cli import job_main

EXAMPLES = """examples:
  deeplab-batch segment                                  # bundled samples + demo model -> ./out/
  deeplab-batch segment --input s3://bucket/images/ --output s3://bucket/run1/ --weights s3://bucket/largefov.safetensors
  deeplab-batch segment --input shards/ --output out/ --config jobs/configs/segment.example.yaml --no-crf
  deeplab-batch segment --input manifest.parquet --output s3://bucket/run2/ --crf-backend torch --incremental
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
    parser.add_argument("--limit", type=int, metavar="N", help="process at most N new images")
    parser.add_argument("--incremental", action="store_true",
                        help="process only images without a row under --output (what every run does; "
                             "stated explicitly for scheduled runs)")
    parser.add_argument("--ray-address", metavar="ADDRESS", help="Ray cluster to use (default: RAY_ADDRESS or local)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def resolve_config(args: argparse.Namespace):
    """Configuration file + command-line flags -> SegmentConfig (raises ConfigError)."""
    from pipeline.config import load_config, override

    config = load_config(args.config)
    changes: dict[str, Any] = {}
    for flag, dotted in (("input", "input.uri"), ("output", "output.uri"), ("weights", "model.weights"),
                         ("crf", "crf.enabled"), ("crf_backend", "crf.backend"), ("crf_params", "crf.params"),
                         ("limit", "input.limit"), ("ray_address", "ray.address"), ("progress", "ray.progress")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[dotted] = value
    config = override(config, **changes) if changes else config
    if not config.input.uri and not config.output.uri:  # the embedded default: samples + demo model
        config = override(config, **{"input.uri": str(SAMPLES_DIR), "output.uri": DEFAULT_OUTPUT})
    return config


def _summary_table(stats, *, new_ok: int) -> str:
    lines = [f"  {'class':<16}{'pixels':>14}{'images':>8}{'mean %':>9}"]
    for row in stats.to_pylist():
        frac = row["mean_fraction"]
        pct = "-" if frac != frac else f"{100 * frac:.2f}"
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
    """Run the job for a resolved configuration; returns the exit code."""
    from pipeline.config import to_dict
    from pipeline.io.sources import discover
    from pipeline.io.uris import InputError, check_writable, normalize_uri
    from pipeline.outputs import OutputLayout, metadata_for, write_class_stats, write_run_json
    from pipeline.stages import STATUS_SKIPPED, local_weights

    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    config_dict = config_dict or to_dict(config)
    output = normalize_uri(config.output.uri)

    # Everything that can be checked before any work: weights, CRF parameters, input, output.
    try:
        from pipeline.weights import DEMO_CHECKPOINT, read_record

        weights = config.model.weights or str(DEMO_CHECKPOINT)
        record = read_record(local_weights(weights, s3=config.s3))
    except (OSError, ValueError) as exc:
        _err(f"weights {config.model.weights or 'demo model'}: {exc}")
        return EXIT_USAGE
    crf_params, crf_record = None, None
    if config.crf.enabled:
        try:
            from pipeline.crf import load_params

            crf_params = load_params(config.crf.params)
        except ValueError as exc:
            _err(f"crf.params: {exc}")
            return EXIT_USAGE
        crf_record = {"backend": config.crf.backend, **crf_params.to_dict()}
    try:
        source = discover(config.input.uri, s3=config.s3, fmt=config.input.format,
                          extensions=config.input.extensions, uri_column=config.input.uri_column,
                          bytes_column=config.input.bytes_column)
        check_writable(output, s3=config.s3)
    except InputError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if source.empty:
        _err(f"input {config.input.uri}: no images ({', '.join(config.input.extensions)}), .tar shards or manifest found")
        return EXIT_USAGE

    layout = OutputLayout(uri=output, s3=config.s3)
    done = frozenset(layout.done_ids())
    images = [r for r in source.images if r["image_id"] not in done]
    skipped = len(source.images) - len(images)
    if config.input.limit:
        images = images[: config.input.limit]
    run_id = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"

    import ray
    import ray.data

    from pipeline.graph import build_dataset, cluster_resources, configure_context, plan_resources

    work = bool(images or source.shards or source.byte_manifests)
    plan = None
    if work:
        if not ray.is_initialized():
            address = config.ray.address or None
            ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                     include_dashboard=False if address is None else None)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        configure_context(config)
        cpus, gpus, custom = cluster_resources()
        plan = plan_resources(config, cpus=cpus, gpus=gpus, custom=custom)
    resolved = {**config_dict, "resolved": {"weights": weights, "model_sha256": record.sha256,
                                             "crf_params": crf_record, "plan": plan.to_dict() if plan else None,
                                             "run_id": run_id}}
    metadata = metadata_for(config=resolved, model=record.to_dict())

    counts = {"ok": 0, "error": 0, "skipped": skipped}
    errors: list[tuple[str, str]] = []
    crf_rss = 0.0
    try:
        if work:
            ds = build_dataset(source, images=images, config=config, plan=plan, weights=weights,
                               crf_params=crf_params, layout=layout, run_id=run_id,
                               palette=record.palette, crf_record=crf_record, metadata=metadata,
                               done=done, limit=config.input.limit)
            bar = _progress(total=len(images) if not (source.shards or source.byte_manifests) else None,
                            enabled=config.ray.progress)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.select(["image_id", "source_uri", "status", "error", "crf_rss_mb"]).to_pylist():
                    if row["status"] == STATUS_SKIPPED:
                        counts["skipped"] += 1
                        continue
                    counts[row["status"]] = counts.get(row["status"], 0) + 1
                    if row["error"] and len(errors) < 20:
                        errors.append((row["source_uri"], row["error"]))
                    crf_rss = max(crf_rss, row["crf_rss_mb"] or 0.0)
                    bar.update(1)
            bar.close()
        stats = write_class_stats(layout, class_names=record.class_names, metadata=metadata)
    except ray.exceptions.RayError as exc:
        _err(f"the Ray job failed: {' '.join(str(exc).split())[:2000]}")
        return EXIT_FAILED
    elapsed = time.perf_counter() - t0
    processed = counts["ok"] + counts["error"]
    summary = {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "duration_s": round(elapsed, 3),
        "input": config.input.uri,
        "output": output,
        "counts": {"new": processed, **counts, "total_rows": len(done) + processed},
        "throughput_images_per_s": round(processed / elapsed, 3) if elapsed > 0 else None,
        "crf_worker_peak_rss_mb": round(crf_rss, 1),
        "model": {"sha256": record.sha256, "variant": record.variant, "num_classes": record.num_classes,
                  "source": record.source},
        "config": resolved,
    }
    write_run_json(layout, summary)
    echo(f"segmented {processed} new image(s) in {elapsed:.1f} s ({summary['throughput_images_per_s']} images/s): "
         f"{counts['ok']} ok, {counts['error']} error, {counts['skipped']} skipped (already done)")
    for uri, reason in errors[:10]:
        echo(f"  error {uri}: {reason}")
    echo("class statistics over all rows under the output:")
    echo(_summary_table(stats, new_ok=counts["ok"]))
    echo(f"masks: {layout.path('masks')}/   rows: {layout.path('segments')}/   summary: {layout.path('_run.json')}")
    return EXIT_OK


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(*, total: int | None, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="segment", file=sys.stderr)


main = job_main(__name__)
if __name__ == "__main__":
    raise SystemExit(main())
