"""Stable, file-name-safe image ids derived from source URIs.

An id is ``<slug>-<hash>``:

* ``hash``: the first 16 hex digits (64 bits) of the SHA-256 of the **full** source
  URI. Two different URIs collide with probability about n^2 / 2^65: at 10^8 images,
  about 3 in 10,000 corpora; the slug makes even that collision need equal tails.
* ``slug``: a readable, file-name-safe form of the path (relative to the input root
  where there is one), keeping its **tail**: the last ``MAX_SLUG_CHARS`` characters,
  cut at a path separator where one is near, so ``.../camera-07/IMG_0042`` stays
  readable however long the common prefix of the corpus is.

The same source URI always gives the same id. Ids of the first release (SHA-1,
40 bits, head of the slug) are not recomputed: resume matches rows on
``source_uri`` (see ``pipeline.resume``), so outputs written by it resume without
reprocessing and keep their ids.
"""

from __future__ import annotations

import hashlib
import re

ID_HASH_CHARS = 16  # 64 bits of SHA-256
LEGACY_ID_HASH_CHARS = 10  # the first release's ids: 40 bits of SHA-1
MAX_SLUG_CHARS = 80
#: The longest id :func:`image_id_for` makes (slug, ``-``, hash).
MAX_ID_CHARS = MAX_SLUG_CHARS + 1 + ID_HASH_CHARS
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SEPARATOR = "__"


def _drop_extension(name: str) -> str:
    head, sep, last = name.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    return f"{head}{sep}{stem}"


def _tail(slug: str, limit: int) -> str:
    """The last ``limit`` characters of ``slug``, starting after a separator when one is in the first quarter."""
    if len(slug) <= limit:
        return slug
    tail = slug[-limit:]
    cut = tail.find(_SEPARATOR)
    if 0 <= cut < limit // 4:
        tail = tail[cut + len(_SEPARATOR):]
    return tail


def uri_digest(source_uri: str) -> str:
    """The 64-bit hash part of an id: 16 hex digits of SHA-256 of the full URI."""
    return hashlib.sha256(source_uri.encode("utf-8")).hexdigest()[:ID_HASH_CHARS]


def image_id_for(source_uri: str, *, relative: str | None = None) -> str:
    """The id of the image at ``source_uri``: ``<slug>-<hash>``.

    ``relative`` is the part of the URI that reads well (the key under the input
    prefix, ``shard/member`` inside a tar); without it the URI minus its scheme.
    This is the id the job assigns to a URI-manifest row (``relative`` None).
    """
    if not source_uri:
        raise ValueError("source_uri: expected a non-empty URI, got ''")
    readable = relative if relative is not None else _SCHEME.sub("", source_uri)
    readable = _drop_extension(readable.strip("/")).replace("/", _SEPARATOR).replace("#", _SEPARATOR)
    slug = _tail(_UNSAFE.sub("_", readable), MAX_SLUG_CHARS).strip("._-") or "image"
    return f"{slug}-{uri_digest(source_uri)}"


def is_safe_id(image_id: str) -> bool:
    """Whether ``image_id`` can be used as a file name as is (no separators, no leading dot)."""
    return bool(_SAFE_ID.match(image_id)) and len(image_id) <= MAX_ID_CHARS
