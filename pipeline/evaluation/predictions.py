"""Finding already-produced masks for the ids of a split.

``evaluate --predictions DIR_OR_URI`` accepts a folder (local or fsspec URI)
holding ``<id>.png`` or a ``masks/`` subfolder of them (the layout ``segment``
writes). A file matches the split id ``X`` when its stem is ``X``,
``X-<hash>`` or ``<folders>__X-<hash>`` with a hash of 16 hex digits (10 in outputs of the
first release) (``segment``'s
``image_id_for``: a slug of the source path relative to its input, folders joined
by ``__``, plus a short hash of the source URI). Every split id must have exactly
one match; ids without one, and ids with several, are errors that list them.

When the folder is a ``segment`` output, :func:`segment_model_record` reads the
model record ``segment`` stored in its Parquet key-value metadata (class names,
palette, sha256), so ``evaluate --predictions`` needs no ``--classes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pipeline.io.ids import ID_HASH_CHARS, LEGACY_ID_HASH_CHARS
from pipeline.io.uris import filesystem_for, join_uri, unstrip

MASK_SUBDIR = "masks"
MASK_SUFFIX = ".png"
_HASHED = re.compile(rf"^(?P<id>.+)-(?:[0-9a-f]{{{ID_HASH_CHARS}}}|[0-9a-f]{{{LEGACY_ID_HASH_CHARS}}})$")
_FOLDER_SEP = "__"  # image_id_for joins the folders of a relative path with "__"


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
        if m is None:
            continue
        slug = m.group("id")
        if slug not in wanted and _FOLDER_SEP in slug:
            slug = slug.rsplit(_FOLDER_SEP, 1)[1]  # JPEGImages__2007_000032-<hash> -> 2007_000032
        if slug in wanted:
            found.setdefault(slug, []).append(f)
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


def segment_model_record(uri: str) -> dict | None:
    """The model record ``segment`` stored with its output at ``uri``, or None when there is none.

    Read from the key-value metadata of ``segments/*.parquet`` (else ``class_stats.parquet``),
    key ``pipeline.outputs.MODEL_METADATA_KEY``; only the Parquet footers are read.
    """
    import pyarrow.parquet as pq

    from pipeline.outputs import CLASS_STATS_FILE, MODEL_METADATA_KEY, SEGMENTS_DIR

    fs, root = filesystem_for(uri)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"{uri}: predictions folder does not exist")
    try:
        segments = sorted(p for p in fs.find(f"{root}/{SEGMENTS_DIR}") if p.endswith(".parquet"))
    except FileNotFoundError:
        segments = []
    candidates = [*segments[:1], f"{root}/{CLASS_STATS_FILE}"]
    for path in candidates:
        if not fs.isfile(path):
            continue
        with fs.open(path, "rb") as f:
            metadata = pq.read_schema(f).metadata or {}
        raw = metadata.get(MODEL_METADATA_KEY)
        if raw is None:
            continue
        where = unstrip(fs, path, like=uri)
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: metadata {MODEL_METADATA_KEY.decode()} is not valid JSON ({exc})") from None
        names, palette = record.get("class_names"), record.get("palette")
        if not isinstance(names, list) or not names or not isinstance(palette, list) or len(palette) != len(names):
            raise ValueError(
                f"{where}: metadata {MODEL_METADATA_KEY.decode()}: expected class_names and a palette of the "
                f"same length, got {len(names or [])} names and {len(palette or [])} colours"
            )
        return {**record, "found_in": where}
    return None
