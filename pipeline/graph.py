"""The Ray Data wiring: inputs -> index -> resume -> read -> decode -> network -> CRF -> write. Composition only.

Every operator here is a stage from :mod:`pipeline.stages` or a Ray Data
primitive; nothing per image passes through the driver:

* **inputs** (:func:`input_dataset`): a listing is walked by tasks, one top-level
  sub-prefix each (pages of :data:`~pipeline.io.sources.LIST_PAGE` files); manifests
  are indexed one row group per task; tar shards are indexed from their headers.
  Rows carry no bytes yet.
* **resume** (:func:`pending_dataset`): a hash-partitioned left anti-join with the
  ``source_uri`` of the done rows under the output (joined on a 128-bit key of it); when some earlier rows are
  storage errors, a left outer join with those (to mark retries); a group-by on
  ``source_uri`` where inputs can repeat. Then ``limit`` and a streaming
  repartition into read tasks of ``read.batch_size`` images.
* **work**: read bytes, decode, network pool, CRF pool, write (masks + one
  segments file per ``output.rows_per_file`` rows, and with ``output.training.format`` one
  training shard committed with it: ``pipeline.training.store``).

Resources come from :func:`pipeline.resources.plan_resources`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import SegmentConfig
from pipeline.io.sources import InputPlan
from pipeline.io.uris import S3Settings, filesystem_for, is_local
from pipeline.outputs import OutputLayout, done_mask, retry_mask
from pipeline.resources import ResourcePlan
from pipeline.stages import (
    CountPending,
    CRFStage,
    DecodeStage,
    IndexFiles,
    IndexManifestGroups,
    ListPrefixes,
    ManifestUris,
    NetworkStage,
    ReadBytes,
    ReadSegments,
    WriteStage,
    mark_new,
)
from pipeline.stages.resume import (
    PRIOR_RUN,
    URI_KEY,
    OnePerSource,
    uri_keys,
    with_uri_key,
)
from pipeline.training.store import TrainingStore

#: Listed files per indexing task (tar shards are indexed from their headers).
INDEX_BATCH = 256
#: Segments files read per task when resume reads the output's rows.
PRIOR_FILES_PER_TASK = 4
#: Rows per join partition: bounds the memory of each hash-join worker.
JOIN_ROWS_PER_PARTITION = 250_000
MAX_JOIN_PARTITIONS = 512
#: CPUs of the small bookkeeping tasks (listing, indexing, counting).
TASK_CPUS = 0.25


def arrow_filesystem(uri: str, *, s3: S3Settings | None = None):
    """A ``pyarrow.fs`` filesystem for Ray's readers (None for local paths)."""
    fs, _ = filesystem_for(uri, s3=s3)
    if is_local(fs):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def rebatch(ds, rows: int):
    """``ds`` in blocks of at most ``rows`` rows (Ray's streaming repartition), run as a TASK_CPUS task.

    Ray 2.60's ``repartition`` takes no resource arguments and runs its tasks with
    one CPU each, which can never be scheduled on a node whose actor pools leave
    less free (the run stalls): its logical operator is given ``TASK_CPUS`` here.
    """
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if op is not None and hasattr(op, "ray_remote_args"):
        object.__setattr__(op, "ray_remote_args", {**op.ray_remote_args, "num_cpus": TASK_CPUS})
    return ds


def _strip(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def input_dataset(plan: InputPlan, *, config: SegmentConfig, tally: Any):
    """Index rows (:data:`~pipeline.stages.common.INDEX_COLUMNS`) of every input; no bytes read yet."""
    import ray

    s3, cpus = config.s3, TASK_CPUS
    if plan.kind in ("uri_manifest", "byte_manifest"):  # one row group per task
        ds = ray.data.from_items([{"manifest_uri": m, "row_group": g} for m, g in plan.row_groups],
                                 override_num_blocks=max(1, len(plan.row_groups)))
        if plan.kind == "uri_manifest":
            index = ManifestUris(s3=s3, uri_column=config.input.uri_column, tally=tally)
        else:
            index = IndexManifestGroups(s3=s3, bytes_column=config.input.bytes_column,
                                        key_column=config.input.key_column, tally=tally)
        return ds.map_batches(index, batch_format="pyarrow", batch_size=1, num_cpus=cpus)
    parts = []
    if plan.files:
        parts.append(ray.data.from_items([{"source_uri": f} for f in plan.files],
                                         override_num_blocks=max(1, math.ceil(len(plan.files) / INDEX_BATCH))))
    if plan.prefixes:
        prefixes = ray.data.from_items([{"prefix": p} for p in plan.prefixes], override_num_blocks=len(plan.prefixes))
        parts.append(prefixes.map_batches(ListPrefixes(s3=s3), batch_format="pyarrow", batch_size=1, num_cpus=cpus))
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    index = IndexFiles(root=plan.root, fmt=config.input.format, extensions=config.input.extensions, s3=s3,
                       tally=tally)
    return rebatch(ds, INDEX_BATCH).map_batches(index, batch_format="pyarrow", num_cpus=cpus)


def _done_keys(table: pa.Table) -> pa.Table:
    return pa.table({URI_KEY: uri_keys(table.filter(done_mask(table)).column("source_uri"))})


def _storage_keys(table: pa.Table) -> pa.Table:
    storage = retry_mask(table)
    kept = table.filter(pc.and_(pc.invert(done_mask(table)), storage))
    return pa.table({URI_KEY: uri_keys(kept.column("source_uri")), PRIOR_RUN: kept.column("run_id")})


def prior_dataset(layout: OutputLayout, files: Sequence[str], *, columns: Sequence[str]):
    """The ``columns`` of the given segments files (names under ``segments/``) as a Ray dataset.

    :data:`PRIOR_FILES_PER_TASK` files per task, read by :class:`~pipeline.stages.ReadSegments`
    (Ray 2.60's Parquet reader gives a small cluster two tasks whatever the number of files,
    each then holding half the output's rows).
    """
    import ray

    groups = [list(files[i:i + PRIOR_FILES_PER_TASK]) for i in range(0, len(files), PRIOR_FILES_PER_TASK)]
    ds = ray.data.from_items([{"files": g} for g in groups], override_num_blocks=max(1, len(groups)))
    return ds.map_batches(ReadSegments(layout=layout, columns=columns), batch_format="pyarrow", batch_size=1,
                          num_cpus=TASK_CPUS)


def join_partitions(rows: int) -> int:
    """Hash partitions for a join over about ``rows`` rows (each partition's worker holds rows / partitions)."""
    return int(min(MAX_JOIN_PARTITIONS, max(2, math.ceil(rows / JOIN_ROWS_PER_PARTITION))))


def pending_dataset(
    index_ds,
    *,
    layout: OutputLayout,
    done_files: Sequence[str],
    storage_files: Sequence[str],
    prior_rows: int,
    may_repeat: bool,
    limit: int,
    read_batch_size: int,
    tally: Any,
):
    """The index rows a run still has to do (:data:`~pipeline.stages.common.PENDING_COLUMNS`).

    ``done_files``: segments files that hold done rows; ``storage_files``: those that
    hold storage-error rows; ``may_repeat``: inputs can name an image twice (manifests,
    shards); ``prior_rows``: about how many rows the output holds (sizes the join).
    """
    partitions = join_partitions(prior_rows)
    ds = index_ds
    if done_files or storage_files:
        ds = ds.map_batches(with_uri_key, batch_format="pyarrow", num_cpus=TASK_CPUS)
    if done_files:
        done = prior_dataset(layout, done_files, columns=["source_uri", "status", "error_kind"])
        done = done.map_batches(_done_keys, batch_format="pyarrow", num_cpus=TASK_CPUS)
        ds = ds.join(done, join_type="left_anti", num_partitions=partitions, on=(URI_KEY,))
    if storage_files:
        storage = prior_dataset(layout, storage_files, columns=["source_uri", "status", "error_kind", "run_id"])
        storage = storage.map_batches(_storage_keys, batch_format="pyarrow", num_cpus=TASK_CPUS)
        ds = ds.join(storage, join_type="left_outer", num_partitions=partitions, on=(URI_KEY,))
    if storage_files or may_repeat:  # straight after the joins: see OnePerSource
        ds = ds.groupby("source_uri", num_partitions=partitions).map_groups(
            OnePerSource(tally=tally), batch_format="pyarrow", num_cpus=TASK_CPUS)
    else:
        ds = ds.map_batches(CountPending(tally=tally), batch_format="pyarrow", num_cpus=TASK_CPUS)
        ds = ds.map_batches(mark_new, batch_format="pyarrow", num_cpus=TASK_CPUS)
    if limit:
        ds = ds.limit(limit)
    return rebatch(ds, read_batch_size)


def read_and_decode(pending_ds, *, config: SegmentConfig, plan: ResourcePlan, input_size: int):
    """Pending rows -> decoded rows (tasks): bytes read, decoded, shrunk to the working resolution in resize mode.

    ``input_size`` is the checkpoint's; with ``crf.resolution`` it sets the working
    resolution (:func:`pipeline.resolution.max_side`). Slide mode decodes at native size
    (its network wants every pixel) and the network stage shrinks after.
    """
    from pipeline.resolution import max_side

    side = None if config.network.mode == "slide" else max_side(config.crf.resolution, input_size=input_size)
    ds = pending_ds.map_batches(ReadBytes(s3=config.s3, bytes_column=config.input.bytes_column),
                                batch_format="pyarrow", num_cpus=plan.read_num_cpus)
    return ds.map_batches(
        DecodeStage(max_pixels=config.decode.max_pixels, max_side=side,
                    training_image=config.output.training.enabled), batch_format="pyarrow",
        batch_size=plan.decode_batch_size, num_cpus=plan.decode_num_cpus, memory=plan.decode_memory_bytes,
    )


def network_dataset(decoded_ds, *, config: SegmentConfig, plan: ResourcePlan, weights: str, input_size: int):
    """Decoded rows -> working-resolution image + coarse logits (the network's actor pool)."""
    import ray

    from pipeline.resolution import max_side

    return decoded_ds.map_batches(
        NetworkStage, batch_format="pyarrow", batch_size=plan.network_batch_size,
        fn_constructor_kwargs={"weights": weights, "s3": config.s3, "device": plan.network_device,
                               "threads": plan.network_threads, "mode": config.network.mode,
                               "tile_size": config.network.tile_size, "tile_overlap": config.network.tile_overlap,
                               "tile_batch": plan.network_batch_size,
                               "max_side": max_side(config.crf.resolution, input_size=input_size)},
        compute=ray.data.ActorPoolStrategy(min_size=plan.network_bounds[0], max_size=plan.network_bounds[1],
                                           max_tasks_in_flight_per_actor=2),
        num_cpus=plan.network_num_cpus, num_gpus=plan.network_num_gpus,
    )


def crf_dataset(network_ds, *, config: SegmentConfig, plan: ResourcePlan, crf_params):
    """Network rows -> masks and statistics at the original size (the CRF's actor pool)."""
    import ray

    return network_ds.map_batches(
        CRFStage, batch_format="pyarrow", batch_size=plan.crf_batch_size,
        fn_constructor_kwargs={"params": crf_params, "backend": config.crf.backend, "device": plan.crf_device,
                               "threads": max(1, int(plan.crf_num_cpus)), "max_pixels": config.crf.max_pixels,
                               "ignore_below": config.output.training.ignore_below,
                               "confidence": config.output.confidence or config.output.training.enabled},
        compute=ray.data.ActorPoolStrategy(min_size=plan.crf_bounds[0], max_size=plan.crf_bounds[1],
                                           max_tasks_in_flight_per_actor=2),
        num_cpus=plan.crf_num_cpus, num_gpus=plan.crf_num_gpus, resources=plan.crf_resources or None,
    )


def work_dataset(
    pending_ds,
    *,
    config: SegmentConfig,
    plan: ResourcePlan,
    weights: str,
    crf_params,
    layout: OutputLayout,
    run_id: str,
    palette: Sequence[Sequence[int]] | None,
    crf_record: Mapping[str, Any] | None,
    metadata: Mapping[bytes, bytes] | None,
    input_size: int,
    lease_guard=None,
):
    """read -> decode -> network -> CRF -> write over the pending rows; rows are the per-image results.

    ``lease_guard``: checked by the writer before each commit (with training output: see
    :class:`pipeline.outputs.lease.LeaseGuard`)."""
    ds = read_and_decode(pending_ds, config=config, plan=plan, input_size=input_size)
    ds = network_dataset(ds, config=config, plan=plan, weights=weights, input_size=input_size)
    ds = crf_dataset(ds, config=config, plan=plan, crf_params=crf_params)
    training = config.output.training
    store = TrainingStore(layout=layout, format=training.format, ignore_below=training.ignore_below) \
        if training.enabled else None
    writer = WriteStage(layout=layout, run_id=run_id, palette=palette, crf=crf_record, metadata=metadata,
                        training=store, lease_guard=lease_guard)
    return ds.map_batches(writer, batch_format="pyarrow", batch_size=plan.write_batch_size,
                          num_cpus=plan.write_num_cpus)


__all__ = ["arrow_filesystem", "crf_dataset", "input_dataset", "join_partitions", "network_dataset",
           "pending_dataset", "prior_dataset", "read_and_decode", "rebatch", "work_dataset"]
