"""Object-storage I/O for the batch job: URIs and filesystems, input sources, image ids.

* :mod:`pipeline.io.uris`: ``S3Settings`` and ``filesystem_for(uri)`` (fsspec; s3://, gs://,
  file:// and plain paths), atomic writes, existence checks with clear errors.
* :mod:`pipeline.io.ids`: ``image_id_for(source_uri, relative=...)``, stable and file-name safe.
* :mod:`pipeline.io.sources`: discovering what an ``--input`` names (a folder of images, tar
  shards in WebDataset layout, a Parquet manifest) and reading bytes per row.
"""

from pipeline.io.ids import image_id_for
from pipeline.io.uris import ERROR_DATA, ERROR_STORAGE, InputError, S3Settings, filesystem_for, join_uri

__all__ = ["ERROR_DATA", "ERROR_STORAGE", "InputError", "S3Settings", "filesystem_for", "image_id_for", "join_uri"]
