"""One ``segment`` run, start to end: check -> plan -> resume -> pipeline -> commit -> statistics -> summary.

:func:`run_segment` is the whole job as a library call; ``jobs/segment.py`` only
parses flags, calls it and prints. Failures are exceptions that say which exit
code they mean (:class:`UsageError`: nothing was run; :class:`RunFailed`: the run
itself failed). Nothing here holds a per-image object for the corpus: inputs,
resume and the pipeline are Ray datasets (:mod:`pipeline.graph`); the output's
state is one summary per segments file (:mod:`pipeline.outputs.index`); the
driver only counts the rows this run writes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.config import ConfigError, SegmentConfig, to_dict
from pipeline.io.uris import RETRY_KINDS, InputError, normalize_uri, storage_errors

#: How many error rows the summary names.
MAX_REPORTED_ERRORS = 20
#: How much of a failed stage's traceback the error message keeps (its end, where the cause is).
MAX_TRACEBACK_CHARS = 8000


class SegmentError(Exception):
    """A run that did not complete; ``exit_code`` says how (see ``jobs/segment.py``)."""

    exit_code = 1


class UsageError(SegmentError):
    """Bad arguments, configuration, weights, input or output location, or mixed settings: nothing was run."""

    exit_code = 2


class RunFailed(SegmentError):
    """The Ray job failed or stalled, or its final files could not be written. Committed rows are kept."""

    exit_code = 1


@dataclass
class RunResult:
    """What a finished run reports (``summary`` is also written to ``_run.json``)."""

    summary: dict[str, Any]
    class_stats: pa.Table
    errors: list[tuple[str, str]] = field(default_factory=list)  # (source_uri, reason), the first few
    paths: dict[str, str] = field(default_factory=dict)


@dataclass
class Counts:
    """The driver's running counts of the rows this run writes (O(1) memory)."""

    new: int = 0
    ok: int = 0
    error: int = 0
    error_storage: int = 0
    retried: int = 0
    duplicates: int = 0
    crf_rss_mb: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def add(self, batch: pa.Table) -> int:
        columns = batch.select(["source_uri", "status", "error", "error_kind", "retry", "duplicates",
                                "crf_rss_mb"]).to_pydict()
        for i, status in enumerate(columns["status"]):
            self.new += 1
            if status == "ok":
                self.ok += 1
            else:
                self.error += 1
                self.error_storage += columns["error_kind"][i] in RETRY_KINDS
                if len(self.errors) < MAX_REPORTED_ERRORS:
                    self.errors.append((columns["source_uri"][i], columns["error"][i]))
            self.retried += bool(columns["retry"][i])
            self.duplicates += columns["duplicates"][i] or 0
            self.crf_rss_mb = max(self.crf_rss_mb, columns["crf_rss_mb"][i] or 0.0)
        return batch.num_rows


def _inside(child: str, parent: str) -> bool:
    parent = parent.rstrip("/")
    return child.rstrip("/") == parent or child.startswith(parent + "/")


def _mixed_settings(prior: dict[str, dict[str, int]], *, model_sha256: str, crf_record, output: str) -> str | None:
    """Why resuming into ``output`` would mix models or CRF settings (None when it would not)."""
    from pipeline.outputs import crf_key

    models = {k: n for k, n in prior["model_sha256"].items() if k != model_sha256}
    if models:
        old = ", ".join(f"{k} ({n} segments files)" for k, n in sorted(models.items()))
        return (f"output {output} holds rows made with model sha256 {old}; this run's weights have sha256 "
                f"{model_sha256}. Write to a new --output, or pass --allow-mixed to add rows from other weights")
    new_crf = crf_key(crf_record)
    crfs = {k: n for k, n in prior["crf"].items() if k != new_crf}
    if crfs:
        old = "; ".join(f"{k} ({n} segments files)" for k, n in sorted(crfs.items()))
        hint = ""
        if all('"resolution": "full"' in k for k in crfs) and '"resolution": "full"' not in new_crf:
            hint = (" (rows refined at full resolution, as releases before crf.resolution did: set "
                    "crf.resolution = 'full' to continue them)")
        return (f"output {output} holds rows made with CRF parameters {old}; this run uses {new_crf}{hint}. "
                f"Write to a new --output, or pass --allow-mixed to add rows with other CRF parameters")
    return None


def _load_model(config: SegmentConfig):
    from pipeline.devices import local_weights
    from pipeline.weights import DEMO_CHECKPOINT, checkpoint_sha256, read_record

    try:
        weights = normalize_uri(config.model.weights) if config.model.weights else str(DEMO_CHECKPOINT)
        weights_file = local_weights(weights, s3=config.s3)
        record = read_record(weights_file)
        return weights, record, record.sha256 or checkpoint_sha256(weights_file)
    except (InputError, OSError, ValueError) as exc:
        raise UsageError(f"weights {config.model.weights or 'demo model'}: {exc}") from exc


def _crf_settings(config: SegmentConfig, record):
    if not config.crf.enabled:
        return None, None
    from pipeline.crf import default_preset, load_params

    try:
        params = load_params(config.crf.params or default_preset(record.variant))
    except (OSError, ValueError) as exc:
        raise UsageError(f"crf.params: {exc}") from exc
    from pipeline.resolution import describe

    return params, {"backend": config.crf.backend, **params.to_dict(), "resolution": describe(config.crf.resolution)}


def prepare_output(layout, *, target_rows: int, map_fn=None):
    """The output's state, with killed compactions finished, small leftovers compacted and every live file summarised.

    Costs one listing, the index, and a read of the files the index does not cover
    (written by a killed run or an older release); their summaries join the index.
    """
    from pipeline.outputs.compaction import compact
    from pipeline.outputs.index import load_state, summarize_uncovered, write_index

    state = load_state(layout)
    new = compact(layout, state, target_rows=target_rows, map_fn=map_fn) if target_rows else []
    new += summarize_uncovered(layout, state)
    write_index(layout, state, new)
    return state


def _finish_training(layout, config: SegmentConfig, *, class_names, recovered: dict[str, int]) -> dict[str, Any] | None:
    """After the work, with training output: merge small shards (Ray tasks), ``id2label.json``.

    Returns the ``training`` section of ``_run.json`` (None without training output).
    """
    from pipeline.outputs.compaction import ray_map
    from pipeline.training.store import TrainingStore, write_id2label

    training = config.output.training
    if not training.enabled:
        return None
    store = TrainingStore(layout=layout, format=training.format, ignore_below=training.ignore_below)
    merged = store.merge(target_bytes=training.shard_mb * 1024**2, map_fn=ray_map)
    write_id2label(layout, class_names)
    shards = store.shards()
    return {"format": training.format, "ignore_below": training.ignore_below, "shards": len(shards),
            "bytes": sum(shards.values()), "merged_now": len(merged), "recovered_at_start": recovered}


def run_segment(
    config: SegmentConfig,
    *,
    config_dict: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Run the job for a resolved configuration; ``progress(n)`` is called as rows are committed.

    One writer per output: the output's lease (:mod:`pipeline.outputs.lease`) is taken after
    the checks that write nothing and before the first write, and released however the run ends.
    """
    with contextlib.ExitStack() as held:
        return _run_segment(config, config_dict=config_dict, progress=progress, held=held)


def _run_segment(config: SegmentConfig, *, config_dict: dict[str, Any] | None,
                 progress: Callable[[int], None] | None, held: contextlib.ExitStack) -> RunResult:
    from pipeline.io.sources import plan_input
    from pipeline.io.uris import check_writable
    from pipeline.outputs import OutputLayout, metadata_for, write_run_json
    from pipeline.outputs.index import (
        OutputStateError,
        merge_totals,
        prior_settings,
        write_class_stats,
    )
    from pipeline.outputs.lease import LeaseGuard, take_lease
    from pipeline.training.store import (
        TrainingSettingsError,
        check_settings,
        write_settings,
    )
    from pipeline.training.store import recover as training_recover

    started = _dt.datetime.now(_dt.UTC)
    t0 = time.perf_counter()
    config_dict = config_dict or to_dict(config)
    output = normalize_uri(config.output.uri)
    run_id = f"{started.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"

    # Everything that can be checked before any work: weights, CRF parameters, input, output.
    weights, record, model_sha256 = _load_model(config)
    crf_params, crf_record = _crf_settings(config, record)
    try:
        plan = plan_input(config.input.uri, s3=config.s3, fmt=config.input.format,
                          uri_column=config.input.uri_column, bytes_column=config.input.bytes_column)
        if plan.listed and _inside(output, plan.uri):
            raise UsageError(f"--output {output} is inside --input {plan.uri}: the next run would read its masks as "
                             "inputs; write the output outside the input folder/prefix")
        check_writable(output, s3=config.s3)
        layout = OutputLayout(uri=output, s3=config.s3)
        # This run writes from here on (compaction first): a lease another live run holds stops it (LeaseHeld).
        lease = held.enter_context(take_lease(output, s3=config.s3, ttl_s=config.output.lease_ttl_s,
                                              wait_s=config.output.wait_for_lock_s, owner_id=run_id))
        try:  # before the segments files are compacted: see pipeline.training.store
            recovered = training_recover(layout)
        except storage_errors() as exc:
            raise UsageError(f"output {output}: cannot settle the training shards a killed run left in "
                             f"training/_pending/ ({type(exc).__name__}: {exc})") from exc
        state = prepare_output(layout, target_rows=config.output.compact_rows)
        training_settings = check_settings(layout, fmt=config.output.training.format,
                                           ignore_below=config.output.training.ignore_below,
                                           ok_rows=merge_totals(state.live_summaries()).ok)
    except TrainingSettingsError as exc:
        raise UsageError(f"output {output}: {exc}") from exc
    except InputError as exc:
        raise UsageError(str(exc)) from exc
    except OutputStateError as exc:  # a corrupt segments file, or rows that mix class counts
        raise UsageError(f"output {output}: {exc}") from exc
    except storage_errors() as exc:
        raise UsageError(f"output {output}: cannot read the rows of earlier runs ({type(exc).__name__}: {exc})") from exc
    phases = {"prepare_s": time.perf_counter() - t0}
    if plan.empty:
        raise UsageError(f"input {config.input.uri}: no images ({', '.join(config.input.extensions)}), "
                         ".tar shards or manifest found")
    prior = state.live_summaries()
    if not config.output.allow_mixed:
        mixed = _mixed_settings(prior_settings(prior), model_sha256=model_sha256, crf_record=crf_record,
                                output=output)
        if mixed:
            raise UsageError(mixed)

    import ray

    from pipeline import graph
    from pipeline.execution import (
        Stalled,
        configure_context,
        init_ray,
        stall_guarded,
        wait_for_min_actors,
    )
    from pipeline.outputs.compaction import ray_map
    from pipeline.resources import (
        ResourcesUnavailable,
        cluster_can_grow,
        plan_for_cluster,
        release_resources,
    )
    from pipeline.stages import RemoteTally

    mark = time.perf_counter()
    init_ray(config.ray.address, verbose=config.ray.verbose)
    configure_context(no_progress_timeout_s=config.ray.no_progress_timeout_s)
    phases["ray_init_s"] = time.perf_counter() - mark
    # Pools for the cluster as it is; one too small for the minimum pools (e.g. a head with num-cpus 0, worker
    # groups at zero) asks its autoscaler for the nodes and waits up to ray.autoscale_wait_s.
    mark = time.perf_counter()
    try:
        resources, asked = plan_for_cluster(config, wait_s=config.ray.autoscale_wait_s)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    except ResourcesUnavailable as exc:
        raise RunFailed(str(exc)) from exc
    if asked:  # withdrawn however the run ends
        held.callback(release_resources)
    phases["resources_s"] = time.perf_counter() - mark
    # A pool whose nodes were recycled meanwhile (idle during resume) waits for them again, as long.
    wait_for_min_actors(config.ray.autoscale_wait_s if cluster_can_grow() else 0)
    resolved = {**config_dict, "resolved": {"weights": weights, "model_sha256": model_sha256,
                                             "crf_params": crf_record, "plan": resources.to_dict(),
                                             "run_id": run_id}}
    metadata = metadata_for(config=resolved, model=record.to_dict())
    if training_settings is not None:
        try:
            write_settings(layout, {**training_settings, "run_id": run_id} if training_settings else {})
        except InputError as exc:
            raise RunFailed(str(exc)) from exc

    counts = Counts()
    mark = time.perf_counter()
    tally = RemoteTally()
    held.callback(tally.close)  # however the run ends: a long-lived driver runs many
    try:
        index = graph.input_dataset(plan, config=config, tally=tally)
        pending = graph.pending_dataset(
            index, layout=layout, done_files=[s["file"] for s in prior if s["ok"] + s["error_data"]],
            storage_files=[s["file"] for s in prior if s["error_storage"]] if merge_totals(prior).pending_retry else [],
            prior_rows=sum(s["rows"] for s in prior), may_repeat=plan.kind != "listing",
            limit=config.input.limit, read_batch_size=resources.read_batch_size, tally=tally)
        # Resume runs to completion before the actor pools start: its hash-join workers then have
        # the cluster to themselves (beside the pools they may find no CPU and stall), and the
        # pending rows (URIs and locators, no bytes) wait in the object store, not in the driver.
        pending = pending.materialize()
        results = graph.work_dataset(
            pending, config=config, plan=resources, weights=weights, crf_params=crf_params, layout=layout,
            run_id=run_id, palette=record.palette, crf_record=crf_record, metadata=metadata,
            input_size=record.input_size,
            lease_guard=LeaseGuard(output, owner_id=run_id, ttl_s=config.output.lease_ttl_s, s3=config.s3)
            if config.output.training.enabled else None)
        batches = results.iter_batches(batch_format="pyarrow", batch_size=None)
        for batch in stall_guarded(batches, timeout_s=config.ray.no_progress_timeout_s,
                                   setting="ray.no_progress_timeout_s"):
            n = counts.add(batch)
            if progress is not None:
                progress(n)
        seen = tally.counts()
    except Stalled as exc:
        raise RunFailed(f"{exc} Rows committed so far are kept; a rerun resumes.") from None
    except ray.exceptions.RayError as exc:  # a bug in a stage (never stored as a row) or Ray itself gave up
        text = str(exc)
        text = text if len(text) <= MAX_TRACEBACK_CHARS else "...\n" + text[-MAX_TRACEBACK_CHARS:]
        raise RunFailed(f"the Ray job failed (rows committed so far are kept; a rerun resumes):\n{text}") from exc

    # Commit: compact this run's small files, merge the statistics from the summaries.
    phases["pipeline_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    try:
        lease.confirm()  # still ours (else LeaseLost: another run took it over): the final files are this run's
        training = _finish_training(layout, config, class_names=record.class_names, recovered=recovered)
        state = prepare_output(layout, target_rows=config.output.compact_rows, map_fn=ray_map)
        live = state.live_summaries()
        totals = merge_totals(live)
        stats = write_class_stats(layout, live, class_names=record.class_names, metadata=metadata)
    except InputError as exc:
        raise RunFailed(str(exc)) from exc
    except OutputStateError as exc:  # rows with another number of classes (--allow-mixed across class lists)
        raise RunFailed(f"output {output}: {exc}") from exc
    except storage_errors() as exc:
        raise RunFailed(f"output {output}: cannot compact or summarise the segments files "
                        f"({type(exc).__name__}: {exc})") from exc

    phases["commit_s"] = time.perf_counter() - mark
    elapsed = time.perf_counter() - t0
    inputs, pending_count = seen.get("inputs", 0), seen.get("pending", 0)
    summary = {
        "run_id": run_id,
        "started_at": started.isoformat(),
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "duration_s": round(elapsed, 3),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "input": config.input.uri,
        "output": output,
        "counts": {"inputs": inputs, "new": counts.new, "ok": counts.ok, "error": counts.error,
                   "error_storage": counts.error_storage, "retried": counts.retried,
                   "skipped": max(inputs - pending_count, 0), "duplicates": counts.duplicates,
                   "unread": seen.get("unread_count", 0)},
        "output_rows": totals.to_dict(),
        "output_files": {"segments": len(state.live), "rows_per_file": round(totals.rows / max(len(state.live), 1), 1)},
        "training": training,
        "unread": seen.get("unread", {}),
        "throughput_images_per_s": round(counts.new / elapsed, 3) if elapsed > 0 else None,
        "crf_worker_peak_rss_mb": round(counts.crf_rss_mb, 1),
        "model": {"sha256": model_sha256, "variant": record.variant, "num_classes": record.num_classes,
                  "source": record.source},
        "config": resolved,
    }
    try:
        write_run_json(layout, summary)
    except InputError as exc:
        raise RunFailed(str(exc)) from exc
    paths = {"masks": layout.path("masks"), "segments": layout.path("segments"), "summary": layout.path("_run.json")}
    if training is not None:
        paths["training"] = layout.path("training")
    try:  # <output>/report.html: a view of the output, so a failure to write it never fails the run
        from pipeline.outputs.report import write_report

        paths["report"] = write_report(layout, run=summary, state=state, class_stats=stats)
    except Exception as exc:  # noqa: BLE001
        import warnings

        warnings.warn(f"the run report was not written ({type(exc).__name__}: {exc}); rebuild it with "
                      f"`deeplab-batch report {output}`", RuntimeWarning, stacklevel=2)
    return RunResult(summary=summary, class_stats=stats, errors=counts.errors, paths=paths)


__all__ = ["RunFailed", "RunResult", "SegmentError", "UsageError", "prepare_output", "run_segment"]
