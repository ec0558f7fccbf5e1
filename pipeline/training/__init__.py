"""Training data from a ``segment`` output: ``deeplab-batch export`` (docs/training.md).

* :mod:`pipeline.training.rules`: the documented rules (sample keys, the split, the ignore threshold,
  the label PNG, the HF features);
* :mod:`pipeline.training.samples`: one image's sample (bytes from its source, mask, confidence, label);
* :mod:`pipeline.training.select`: which rows are exported (Ray Data stage over segments files);
* :mod:`pipeline.training.shards`: shards written whole (WebDataset tar, HF Parquet) and the write stage;
* :mod:`pipeline.training.export`: the job (driver: listing, merging, stale shards, sampling.json).

Not to be confused with :mod:`pipeline.train`, the fine-tuning loop of DeepLab itself.
"""

from pipeline.training.export import ExportError, ExportOptions, run_export
from pipeline.training.rules import IGNORE_INDEX, sample_key, split_of

__all__ = ["IGNORE_INDEX", "ExportError", "ExportOptions", "run_export", "sample_key", "split_of"]
