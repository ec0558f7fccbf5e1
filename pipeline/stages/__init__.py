"""The job's stages as plain callables on batches: ``stage(batch) -> batch``, one module per stage.

Each stage does one thing, takes a ``pyarrow.Table`` (or a dict of lists, for
tests) and returns a ``pyarrow.Table`` with the columns the next stage needs
(heavy columns are dropped as soon as they are used). They know nothing about
Ray beyond recording the node they ran on; :mod:`pipeline.graph` wires them.

Column flow::

    index         image_id, source_uri, status, error, error_kind + locator (tar byte range,
                  manifest row group / row)                                  (index.py)
    resume        + retry, duplicates: what is left after the anti-join      (resume.py)
    read          - locator, + data (bytes), t_read, node_read                (read.py)
    decode        - data, + pixels (H*W*3 RGB bytes), width, height           (decode.py)
    network       + logits (fp16 C x h x w bytes at 1/8)                      (network.py)
    crf           - pixels, - logits, + mask (H*W uint8), class_pixels,
                  class_mean_confidence, crf_rss_mb                          (crf.py)
    write         - mask, + mask_uri, segments_file; commits masks and one
                  segments file per batch                                    (write.py)
"""

from pipeline.stages.common import (
    COLUMN_TYPES,
    INDEX_COLUMNS,
    PENDING_COLUMNS,
    RESULT_COLUMNS,
    each_row,
    node_id,
    to_rows,
    to_table,
)
from pipeline.stages.crf import CRFStage, label_statistics
from pipeline.stages.decode import DecodeStage, pixels_of
from pipeline.stages.index import IndexFiles, IndexManifestGroups, ListPrefixes, ManifestUris, ReadSegments
from pipeline.stages.network import NetworkStage
from pipeline.stages.read import ReadBytes
from pipeline.stages.resume import CountPending, OnePerSource, mark_new, one_per_source
from pipeline.stages.tally import RemoteTally, RunTally
from pipeline.stages.write import WriteStage

__all__ = [
    "COLUMN_TYPES",
    "INDEX_COLUMNS",
    "PENDING_COLUMNS",
    "RESULT_COLUMNS",
    "CRFStage",
    "CountPending",
    "DecodeStage",
    "IndexFiles",
    "IndexManifestGroups",
    "ListPrefixes",
    "ManifestUris",
    "NetworkStage",
    "OnePerSource",
    "ReadBytes",
    "ReadSegments",
    "RemoteTally",
    "RunTally",
    "WriteStage",
    "each_row",
    "label_statistics",
    "mark_new",
    "node_id",
    "one_per_source",
    "pixels_of",
    "to_rows",
    "to_table",
]
