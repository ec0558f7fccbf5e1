"""Stable, file-name-safe image ids derived from source URIs.

An id is a readable slug of the path (relative to the input root where there is
one) plus a short hash of the full source URI: the slug makes ``masks/<id>.png``
findable by eye, the hash keeps two sources apart whose slugs collide (``a b.jpg``
and ``a_b.jpg``). The same source URI always gives the same id, which is what
resuming relies on.
"""

from __future__ import annotations

import hashlib
import re

ID_HASH_CHARS = 10
MAX_SLUG_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _drop_extension(name: str) -> str:
    head, sep, last = name.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    return f"{head}{sep}{stem}"


def image_id_for(source_uri: str, *, relative: str | None = None) -> str:
    """The id of the image at ``source_uri``: ``<slug>-<hash>``.

    ``relative`` is the part of the URI that reads well (the key under the input
    prefix, ``shard/member`` inside a tar); without it the URI minus its scheme.
    """
    if not source_uri:
        raise ValueError("source_uri: expected a non-empty URI, got ''")
    readable = relative if relative is not None else _SCHEME.sub("", source_uri)
    readable = _drop_extension(readable.strip("/")).replace("/", "__").replace("#", "__")
    slug = _UNSAFE.sub("_", readable).strip("._-")[:MAX_SLUG_CHARS] or "image"
    digest = hashlib.sha1(source_uri.encode("utf-8")).hexdigest()[:ID_HASH_CHARS]
    return f"{slug}-{digest}"


def is_safe_id(image_id: str) -> bool:
    """Whether ``image_id`` can be used as a file name as is (no separators, no leading dot)."""
    return bool(_SAFE_ID.match(image_id)) and len(image_id) <= MAX_SLUG_CHARS + ID_HASH_CHARS + 1
