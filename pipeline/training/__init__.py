"""Training data (docs/training-data.md): shards written by ``segment --training`` and by ``deeplab-batch export``.

* :mod:`pipeline.training.rules`: the documented rules (sample keys, the split, the ignore threshold,
  the label PNG, the HF features);
* :mod:`pipeline.training.samples`: one image's sample (the image upright, its label and record);
* :mod:`pipeline.training.shards`: shards written whole (WebDataset tar, HF Parquet), and export's write stage;
* :mod:`pipeline.training.store`: ``segment --training``'s shards under ``<output>/training/``, committed
  with the segments rows, recovered after kills and merged after runs (each image exactly once);
* :mod:`pipeline.training.select`: which rows export takes (Ray Data stage over segments files);
* :mod:`pipeline.training.export`: the export job (driver: listing, merging, stale shards, sampling.json).

Not to be confused with :mod:`pipeline.train`, the fine-tuning loop of DeepLab itself.
"""

from pipeline.training.export import ExportError, ExportOptions, run_export
from pipeline.training.rules import IGNORE_INDEX, sample_key, split_of

__all__ = ["IGNORE_INDEX", "ExportError", "ExportOptions", "run_export", "sample_key", "split_of"]
