"""``sampling.json`` at scale: assembled from the write tasks' fragments, streamed, never gathered in the driver.

The fragments here are written by the test (with pyarrow, in the documented fragment layout)
and the expected file is computed directly from their rows with ``json.dumps(indent=2)``: the
format ``sampling.json`` has always had (docs/training-data.md). Real local Ray runs the sort.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

NUM_CLASSES = 21
ENTRIES = 300_000
FRAGMENTS = 12


def _head(images: int, class_pixels: list[int]) -> dict:
    total = sum(class_pixels)
    return {
        "split": "train", "images": images, "ignore_index": 255, "min_class_pixels": 3000,
        "class_names": {str(c): f"class-{c}" for c in range(NUM_CLASSES)},
        "class_pixels": {str(c): class_pixels[c] for c in range(NUM_CLASSES)},
        "class_frequency": {str(c): class_pixels[c] / total for c in range(NUM_CLASSES)},
        "images_with_class": {str(c): images // (c + 1) for c in range(NUM_CLASSES)},
    }


def test_sampling_json_is_streamed_from_the_fragments_with_the_driver_holding_one_piece(ray_local, tmp_path):
    from pipeline.io.uris import S3Settings
    from pipeline.training.export import (
        SAMPLING_FILE,
        remove_sampling_fragments,
        write_sampling,
    )
    from pipeline.training.shards import FRAGMENT_SCHEMA, SAMPLING_DIR

    rng = random.Random(7)
    images = [f"camera-{rng.randrange(10**6):06d}__IMG_{i:07d}.{rng.choice('ab')}-{rng.getrandbits(64):016x}"
              for i in range(ENTRIES // 2)]
    # classes 0..18 hold entries (class 0 the most), 19 and 20 none: "[]" between and after lists
    rows = [(rng.choice([0, 0, 0, *range(1, 19)]), image_id, rng.randrange(3000, 10**6))
            for image_id in images for _ in range(2)]
    rows = list({(c, i): (c, i, p) for c, i, p in rows}.values())  # one entry per (class, image)
    rng.shuffle(rows)
    folder = tmp_path / "dest" / SAMPLING_DIR
    folder.mkdir(parents=True)
    names = []
    for k in range(FRAGMENTS):
        part = rows[k::FRAGMENTS]
        table = pa.table({"class_id": [r[0] for r in part], "image_id": [r[1] for r in part],
                          "pixels": [r[2] for r in part]}, schema=FRAGMENT_SCHEMA)
        names.append(f"samples-{k:016x}.parquet")
        pq.write_table(table, folder / names[-1])
    stale = pa.table({"class_id": [19], "image_id": ["stale-image"], "pixels": [5000]}, schema=FRAGMENT_SCHEMA)
    pq.write_table(stale, folder / "samples-ffffffffffffffff.parquet")  # a killed export's: not listed, not read

    head = _head(len(images), [sum(p for c2, _, p in rows if c2 == c) + 1 for c in range(NUM_CLASSES)])
    lists = {str(c): sorted([i, p] for c2, i, p in rows if c2 == c) for c in range(NUM_CLASSES)}
    expected = (json.dumps({**head, "samples_with_class": lists}, indent=2) + "\n").encode("utf-8")
    assert lists["19"] == lists["20"] == [] and len(expected) > 20 * 1024**2

    dest = str(tmp_path / "dest")
    # a first assembly of one fragment imports what the driver imports lazily (Ray's sort, pipeline.graph):
    # the measured one below then allocates only what the assembly itself holds
    (tmp_path / "warm-up" / SAMPLING_DIR).mkdir(parents=True)
    shutil.copy(folder / names[0], tmp_path / "warm-up" / SAMPLING_DIR / names[0])
    write_sampling(str(tmp_path / "warm-up"), head, names[:1], rows=1, num_classes=NUM_CLASSES, s3=S3Settings(),
                   timeout_s=120)
    tracemalloc.start()
    try:
        write_sampling(dest, head, names, rows=len(rows), num_classes=NUM_CLASSES, s3=S3Settings(), timeout_s=120)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    written = (tmp_path / "dest" / SAMPLING_FILE).read_bytes()
    assert written == expected
    # the driver held a piece of the text at a time: gathering the entries (as lists, or as the whole text)
    # would take more than the file's size
    assert peak < len(expected) / 4, (peak, len(expected))
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [SAMPLING_DIR, SAMPLING_FILE]  # no temporary

    remove_sampling_fragments(dest, s3=S3Settings())
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [SAMPLING_FILE]


def test_a_failed_assembly_leaves_no_sampling_json(ray_local, tmp_path):
    from pipeline.io.uris import S3Settings
    from pipeline.training.export import SAMPLING_FILE, ExportError, write_sampling
    from pipeline.training.shards import SAMPLING_DIR

    dest = tmp_path / "dest"
    (dest / SAMPLING_DIR).mkdir(parents=True)
    fragment = dest / SAMPLING_DIR / "samples-0.parquet"
    fragment.write_bytes(b"not parquet")
    with pytest.raises(ExportError, match=re.escape(f"sampling fragment {fragment}: unreadable")) as failed:
        write_sampling(str(dest), _head(1, [1] * NUM_CLASSES), ["samples-0.parquet"], rows=1, num_classes=NUM_CLASSES,
                       s3=S3Settings(), timeout_s=120)
    assert failed.value.exit_code == 1
    assert sorted(p.name for p in dest.iterdir()) == [SAMPLING_DIR]  # neither sampling.json nor a temporary
    assert not (dest / SAMPLING_FILE).exists()
