"""Finding already-produced masks for the ids of a split.

``evaluate --predictions DIR_OR_URI`` accepts a folder (local or fsspec URI)
holding ``<id>.png`` or a ``masks/`` subfolder of them (the layout ``segment``
writes). A file matches the split id ``X`` when its stem is ``X`` or
``X-<10 hex digits>`` (``segment``'s ``image_id_for``: a slug of the source
path plus a short hash of the source URI). Every split id must have exactly one
match; ids without one, and ids with several, are errors that list them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.io.ids import ID_HASH_CHARS
from pipeline.io.uris import filesystem_for, join_uri, unstrip

MASK_SUBDIR = "masks"
MASK_SUFFIX = ".png"
_HASHED = re.compile(rf"^(?P<id>.+)-[0-9a-f]{{{ID_HASH_CHARS}}}$")


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(MASK_SUFFIX)]


def list_masks(uri: str) -> tuple[str, list[str]]:
    """(folder actually used, mask URIs in it): ``uri/masks/`` when it exists, else ``uri``."""
    fs, path = filesystem_for(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{uri}: predictions folder does not exist")
    sub = path.rstrip("/") + "/" + MASK_SUBDIR
    folder, folder_uri = (sub, join_uri(uri, MASK_SUBDIR)) if fs.isdir(sub) else (path, uri)
    files = [p for p in fs.ls(folder, detail=False) if p.lower().endswith(MASK_SUFFIX)]
    return folder_uri, sorted(unstrip(fs, p, like=uri) for p in files)


def match_predictions(uri: str, ids: Sequence[str]) -> dict[str, str]:
    """Map every split id to its mask URI (see the module docstring for the rules)."""
    folder, files = list_masks(uri)
    wanted = set(ids)
    found: dict[str, list[str]] = {}
    for f in files:
        stem = _stem(f)
        if stem in wanted:
            found.setdefault(stem, []).append(f)
            continue
        m = _HASHED.match(stem)
        if m and m.group("id") in wanted:
            found.setdefault(m.group("id"), []).append(f)
    missing = [i for i in ids if i not in found]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{folder}: no predicted mask for {len(missing)} of {len(ids)} split ids "
            f"({', '.join(missing[:5])}{more}); expected <id>.png or <id>-<hash>.png"
        )
    ambiguous = {i: fs for i, fs in found.items() if len(fs) > 1}
    if ambiguous:
        first = next(iter(ambiguous))
        raise ValueError(
            f"{folder}: {len(ambiguous)} split ids match several masks, e.g. {first!r}: {ambiguous[first][:3]}"
        )
    return {i: found[i][0] for i in ids}
