"""Where the network and the CRF run, and where their weights come from: one answer for every job.

:func:`resolve_device` turns the configured ``auto | cpu | cuda`` into a torch device
(``segment``'s actors, ``evaluate``, ``predict``); :func:`local_weights` gives a
local path for a checkpoint URI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from pipeline.io.uris import S3Settings, filesystem_for, is_local

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:  # noqa: F821 - torch imported lazily
    """``auto`` -> cuda when torch sees a CUDA device, else cpu; ``cuda`` without one is a ValueError.

    Also takes ``cuda:N`` and a ``torch.device`` (the CRF's torch backend is called with either).
    """
    import torch

    name = str(device)  # str(torch.device("cuda", 0)) == "cuda:0"
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"device: expected one of {DEVICES} or 'cuda:N', got {device!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as exc:  # e.g. "cuda:x"
        raise ValueError(f"device: expected one of {DEVICES} or 'cuda:N', got {device!r} ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but torch sees no CUDA device on this node; "
                         "use cpu, or auto to use a GPU only when there is one")
    return resolved


def local_weights(uri: str, *, s3: S3Settings | None = None) -> str:
    """A local path for a checkpoint URI; object-store checkpoints are copied to a temp file.

    The copy is named after the object's identity (ETag, size, modification time),
    so a checkpoint replaced under the same key is downloaded again.
    """
    fs, path = filesystem_for(uri, s3=s3)
    if is_local(fs):
        return path
    fs.invalidate_cache(path)
    info = fs.info(path)
    identity = "|".join(str(info.get(k)) for k in ("ETag", "etag", "md5Hash", "size", "LastModified", "mtime",
                                                    "updated", "generation"))
    digest = hashlib.sha256(f"{uri}\n{identity}".encode()).hexdigest()[:16]
    name = os.path.basename(path) or "weights"
    target = os.path.join(tempfile.gettempdir(), "deeplab-batch-weights", f"{digest}-{name}")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.tmp"
        try:
            fs.get_file(path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target
