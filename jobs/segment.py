"""Segment an image corpus on Ray Data: object storage in, palette masks and per-class statistics out.

Reads a folder/prefix of images, tar shards (WebDataset layout) or a Parquet
manifest from s3://, gs://, file:// or a plain path; decodes on CPU, runs DeepLab V1
on a fixed pool of GPU actors (CPU actors without GPUs), refines with the dense
CRF on a CPU pool (or the GPU with --crf-backend torch) and writes
masks/<image_id>.png, segments/*.parquet (one row per input), class_stats.parquet
and _run.json under --output. A rerun over the same output resumes: only images
without a row (or whose row is a storage error) are processed. With no
--input/--output it segments the bundled sample corpus with the demo model into ./out/.

Exit codes: 0 done (error rows are results, not failures); 2 bad arguments,
configuration, weights, an unusable input/output location, or an output made
with other weights / CRF parameters (nothing was run); 1 the Ray job itself
failed, stalled, or its final files could not be written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
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
                        help="process only images without a row under --output. Every run does this (a rerun "
                             "resumes); the flag only states it for scheduled runs. In every mode the summary and "
                             "_run.json report new / skipped (already had a row) / failed counts")
    parser.add_argument("--allow-mixed", dest="allow_mixed", action="store_true", default=None,
                        help="resume into an output whose rows were made with other weights or CRF parameters "
                             "(refused by default)")
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
                         ("limit", "input.limit"), ("ray_address", "ray.address"), ("progress", "ray.progress"),
                         ("allow_mixed", "output.allow_mixed")):
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


def _inside(child: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return child.rstrip("/") == parent or child.startswith(parent + "/")


def _mixed_settings(existing, *, model_sha256: str, crf_record, output: str) -> str | None:
    """Why resuming into ``output`` would mix models or CRF settings (None when it would not)."""
    from pipeline.outputs import crf_key, prior_settings

    prior = prior_settings(existing)
    models = {k: n for k, n in prior["model_sha256"].items() if k != model_sha256}
    if models:
        old = ", ".join(f"{k} ({n} rows)" for k, n in sorted(models.items()))
        return (f"output {output} holds rows made with model sha256 {old}; this run's weights have sha256 "
                f"{model_sha256}. Write to a new --output, or pass --allow-mixed to add rows from other weights")
    new_crf = crf_key(crf_record)
    crfs = {k: n for k, n in prior["crf"].items() if k != new_crf}
    if crfs:
        old = "; ".join(f"{k} ({n} rows)" for k, n in sorted(crfs.items()))
        return (f"output {output} holds rows made with CRF parameters {old}; this run uses {new_crf}. "
                f"Write to a new --output, or pass --allow-mixed to add rows with other CRF parameters")
    return None


def segment(config, *, config_dict: dict[str, Any] | None = None, echo=print) -> int:
    """Run the job for a resolved configuration; returns the exit code."""
    from pipeline.config import ConfigError, to_dict
    from pipeline.io.sources import discover
    from pipeline.io.uris import ERROR_STORAGE, InputError, check_writable, normalize_uri, storage_errors
    from pipeline.outputs import OutputLayout, metadata_for, write_class_stats, write_run_json

    started = _dt.datetime.now(_dt.UTC)
    t0 = time.perf_counter()
    config_dict = config_dict or to_dict(config)
    output = normalize_uri(config.output.uri)

    # Everything that can be checked before any work: weights, CRF parameters, input, output.
    try:
        from pipeline.stages import local_weights
        from pipeline.weights import DEMO_CHECKPOINT, checkpoint_sha256, read_record

        weights = normalize_uri(config.model.weights) if config.model.weights else str(DEMO_CHECKPOINT)
        weights_file = local_weights(weights, s3=config.s3)
        record = read_record(weights_file)
        model_sha256 = record.sha256 or checkpoint_sha256(weights_file)
    except (InputError, OSError, ValueError) as exc:
        _err(f"weights {config.model.weights or 'demo model'}: {exc}")
        return EXIT_USAGE
    crf_params, crf_record = None, None
    if config.crf.enabled:
        try:
            from pipeline.crf import default_preset, load_params

            crf_params = load_params(config.crf.params or default_preset(record.variant))
        except (OSError, ValueError) as exc:
            _err(f"crf.params: {exc}")
            return EXIT_USAGE
        crf_record = {"backend": config.crf.backend, **crf_params.to_dict()}
    try:
        source = discover(config.input.uri, s3=config.s3, fmt=config.input.format,
                          extensions=config.input.extensions, uri_column=config.input.uri_column,
                          bytes_column=config.input.bytes_column)
        if source.listed and _inside(output, source.uri):
            _err(f"--output {output} is inside --input {source.uri}: the next run would read its masks as "
                 "inputs; write the output outside the input folder/prefix")
            return EXIT_USAGE
        check_writable(output, s3=config.s3)
        layout = OutputLayout(uri=output, s3=config.s3)
        existing = layout.read_segments(columns=["image_id", "status", "error_kind", "model_sha256", "crf"])
    except InputError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except storage_errors() as exc:
        _err(f"output {output}: cannot read the rows of earlier runs ({type(exc).__name__}: {exc})")
        return EXIT_USAGE
    if source.empty:
        _err(f"input {config.input.uri}: no images ({', '.join(config.input.extensions)}), .tar shards or manifest found")
        return EXIT_USAGE
    if not config.output.allow_mixed:
        mixed = _mixed_settings(existing, model_sha256=model_sha256, crf_record=crf_record, output=output)
        if mixed:
            _err(mixed)
            return EXIT_USAGE

    done = frozenset(layout.done_ids(existing))
    pending_retry = set(existing.column("image_id").to_pylist()) - done  # storage errors of earlier runs
    images = [r for r in source.images if r["image_id"] not in done]
    skipped = len(source.images) - len(images)
    if config.input.limit:
        images = images[: config.input.limit]
    run_id = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"

    import ray
    import ray.data
    from ray.data.exceptions import ExecutionTimeoutError

    from pipeline.graph import RemoteLedger, build_dataset, cluster_resources, configure_context, plan_resources

    work = bool(images or (source.streamed and not (config.input.limit and len(images) >= config.input.limit)))
    plan = None
    if work:
        if not ray.is_initialized():
            address = config.ray.address or None
            ray.init(address=address, logging_level="WARNING", log_to_driver=False,
                     include_dashboard=False if address is None else None)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        configure_context(config)
        cpus, gpus, custom = cluster_resources()
        try:
            plan = plan_resources(config, cpus=cpus, gpus=gpus, custom=custom)
        except ConfigError as exc:
            _err(str(exc))
            return EXIT_USAGE
    resolved = {**config_dict, "resolved": {"weights": weights, "model_sha256": model_sha256,
                                             "crf_params": crf_record, "plan": plan.to_dict() if plan else None,
                                             "run_id": run_id}}
    metadata = metadata_for(config=resolved, model=record.to_dict())

    counts = {"new": 0, "ok": 0, "error": 0, "error_storage": 0, "retried": 0, "skipped": skipped,
              "duplicates": source.duplicates, "unread": 0}
    errors: list[tuple[str, str]] = []
    unread: dict[str, str] = {}
    crf_rss = 0.0
    try:
        if work:
            ledger = RemoteLedger(done) if source.streamed else None
            ds = build_dataset(source, images=images, config=config, plan=plan, weights=weights,
                               crf_params=crf_params, layout=layout, run_id=run_id,
                               palette=record.palette, crf_record=crf_record, metadata=metadata,
                               ledger=ledger, limit=config.input.limit)
            bar = _progress(total=None if source.streamed else len(images), enabled=config.ray.progress)
            columns = ["image_id", "source_uri", "status", "error", "error_kind", "crf_rss_mb"]
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.select(columns).to_pylist():
                    counts["new"] += 1
                    counts[row["status"]] = counts.get(row["status"], 0) + 1
                    if row["error_kind"] == ERROR_STORAGE:
                        counts["error_storage"] += 1
                    if row["image_id"] in pending_retry:
                        counts["retried"] += 1
                    if row["error"] and len(errors) < 20:
                        errors.append((row["source_uri"], row["error"]))
                    crf_rss = max(crf_rss, row["crf_rss_mb"] or 0.0)
                    bar.update(1)
            bar.close()
            if ledger is not None:
                seen = ledger.counts()
                counts["skipped"] += seen["skipped"]
                counts["duplicates"] += seen["duplicates"]
                unread = seen["unread"]
                counts["unread"] = len(unread)
    except ExecutionTimeoutError as exc:
        _err(f"the run made no progress for ray.no_progress_timeout_s = {config.ray.no_progress_timeout_s:g} s: "
             f"a stage is stuck or cannot be scheduled (check pool sizes against the cluster's CPUs, GPUs and "
             f"custom resources); rows committed so far are kept, a rerun resumes. "
             f"{' '.join(str(exc).split())[:1500]}")
        return EXIT_FAILED
    except ray.exceptions.RayError as exc:
        _err(f"the Ray job failed: {' '.join(str(exc).split())[:2000]}")
        return EXIT_FAILED
    try:
        rows = layout.read_segments(columns=["status", "error_kind", "width", "height", "class_pixels"])
        stats = write_class_stats(layout, class_names=record.class_names, metadata=metadata, rows=rows)
    except InputError as exc:
        _err(str(exc))
        return EXIT_FAILED
    except ValueError as exc:  # rows with another number of classes (--allow-mixed across class lists)
        _err(f"output {output}: {exc}")
        return EXIT_FAILED
    except storage_errors() as exc:
        _err(f"output {output}: cannot read the segments rows back ({type(exc).__name__}: {exc})")
        return EXIT_FAILED
    statuses = rows.column("status").to_pylist()
    kinds = rows.column("error_kind").to_pylist()
    totals = {"rows": rows.num_rows, "ok": statuses.count("ok"), "error": statuses.count("error"),
              "pending_retry": sum(1 for st, k in zip(statuses, kinds) if st == "error" and k == ERROR_STORAGE)}
    elapsed = time.perf_counter() - t0
    summary = {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "duration_s": round(elapsed, 3),
        "input": config.input.uri,
        "output": output,
        "counts": counts,
        "output_rows": totals,
        "unread": unread,
        "throughput_images_per_s": round(counts["new"] / elapsed, 3) if elapsed > 0 else None,
        "crf_worker_peak_rss_mb": round(crf_rss, 1),
        "model": {"sha256": model_sha256, "variant": record.variant, "num_classes": record.num_classes,
                  "source": record.source},
        "config": resolved,
    }
    try:
        write_run_json(layout, summary)
    except InputError as exc:
        _err(str(exc))
        return EXIT_FAILED
    echo(f"segmented {counts['new']} new image(s) in {elapsed:.1f} s ({summary['throughput_images_per_s']} images/s): "
         f"{counts['ok']} ok, {counts['error']} failed ({counts['error_storage']} storage errors, retried by the "
         f"next run), {counts['skipped']} skipped (already had a row), {counts['duplicates']} duplicate(s) dropped")
    for uri, reason in errors[:10]:
        echo(f"  error {uri}: {reason}")
    for uri, reason in list(unread.items())[:10]:
        echo(f"  not read (retried by the next run) {uri}: {reason}")
    echo(f"output: {totals['rows']} rows ({totals['ok']} ok, {totals['error']} error, "
         f"{totals['pending_retry']} waiting for a retry)")
    echo("class statistics over all rows under the output:")
    echo(_summary_table(stats))
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
