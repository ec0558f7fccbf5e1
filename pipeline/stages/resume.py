"""What is left to do once inputs are joined against the rows already under the output.

``pipeline.graph`` does the distributed part: a left anti-join of the index rows
with the ``source_uri`` of every row that is done (``ok``, or a ``data`` error),
then, when some earlier rows are ``storage`` errors, a left outer join with those
(``prior_run``), then a group-by ``source_uri`` when inputs can repeat. These
callables are the per-batch and per-group steps of that plan.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.ids import image_id_for
from pipeline.io.sources import with_image_ids
from pipeline.stages.common import LOCATOR_COLUMNS, PENDING_COLUMNS, to_table
from pipeline.stages.tally import RunTally

#: The column the storage-error side of the outer join brings: the run that wrote that row.
PRIOR_RUN = "prior_run"
#: The join key: 128 bits of BLAKE2b of ``source_uri`` (16 bytes a row in the shuffle instead of
#: the whole URI; two URIs collide with probability ~n^2 / 2^129, never in practice).
URI_KEY = "uri_key"
URI_KEY_TYPE = pa.binary(16)


def uri_keys(uris: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The join key of each ``source_uri``."""
    return pa.array([hashlib.blake2b(u.encode("utf-8"), digest_size=16).digest() for u in uris.to_pylist()],
                    type=URI_KEY_TYPE)


def with_uri_key(batch: pa.Table) -> pa.Table:
    """Index rows + their join key (:data:`URI_KEY`)."""
    return batch.append_column(URI_KEY, uri_keys(batch.column("source_uri")))


class CountPending:
    """Adds the batch's row count to the tally's ``pending`` (inputs without a done row); passes rows through.

    """

    def __init__(self, *, tally: Any = None) -> None:
        self.tally = tally if tally is not None else RunTally()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.tally.add(pending=batch.num_rows)
        return batch


def one_per_source(group: pa.Table) -> pa.Table:
    """One row for a group of rows with the same ``source_uri``, with ``retry`` and ``duplicates`` set.

    The group holds each occurrence of the input (a URI listed twice, a tar member or
    manifest key repeated) times each earlier ``storage`` error row of it (one per run,
    ``prior_run``). The row kept is the first occurrence (smallest locator);
    ``duplicates`` counts the other occurrences; ``retry`` says an earlier run's row
    for it was a storage error (this run's row supersedes it).
    """
    n = group.num_rows
    if n == 0:
        return to_table([], PENDING_COLUMNS)
    runs = pc.unique(group.column(PRIOR_RUN).drop_null()) if PRIOR_RUN in group.column_names else pa.array([])
    occurrences = n // max(len(runs), 1)
    keys = [(name, "ascending") for name in LOCATOR_COLUMNS if name in group.column_names]
    first = int(pc.sort_indices(group, sort_keys=keys)[0].as_py()) if keys else 0
    row = {name: group.column(name)[first].as_py() for name in PENDING_COLUMNS if name in group.column_names}
    row["image_id"] = image_id_for(row["source_uri"], relative=row.get("relative"))
    row["retry"] = len(runs) > 0
    row["duplicates"] = int(np.int32(occurrences - 1))
    return to_table([row], PENDING_COLUMNS)


class OnePerSource:
    """:func:`one_per_source` that also adds the group's input rows to the tally's ``pending``.

    Run by the group-by right after the joins: Ray 2.60's hash group-by fails on the
    column-less empty blocks a map stage between them can pass on, so the count is
    taken here rather than by :class:`CountPending`.
    """

    __name__ = "OnePerSource"  # Ray names the operator after its function

    def __init__(self, *, tally: Any = None) -> None:
        self.tally = tally if tally is not None else RunTally()

    def __call__(self, group: pa.Table) -> pa.Table:
        if group.num_rows:
            runs = pc.unique(group.column(PRIOR_RUN).drop_null()) if PRIOR_RUN in group.column_names else []
            self.tally.add(pending=group.num_rows // max(len(runs), 1))
        return one_per_source(group)


def mark_new(batch: pa.Table) -> pa.Table:
    """Index rows that need no grouping -> pending rows: their ids, ``retry`` False, no ``duplicates``."""
    n = batch.num_rows
    columns = {name: batch.column(name) for name in batch.column_names if name in PENDING_COLUMNS}
    columns["image_id"] = pa.array(with_image_ids(batch), type=pa.string())
    columns["retry"] = pa.array(np.zeros(n, dtype=bool))
    columns["duplicates"] = pa.array(np.zeros(n, dtype=np.int32))
    return pa.table({name: columns[name] for name in PENDING_COLUMNS})
