"""``export`` of images that came from byte manifests (``<manifest>.parquet#<key>``), end to end.

One segment run (module fixture, ``--confidence``, demo model, no CRF) over two Parquet
manifests of image bytes with the columns named in the run's configuration (``img``, ``name``):
``a.parquet`` with a key column (one row without a key: segment keys it by the content hash; a
key holding ``#``; an EXIF-rotated JPEG; row groups of two rows) and ``b.parquet`` without one.
Then exports in both formats, read back with ``webdataset`` and ``datasets``: every image is the
manifest's bytes (the rotated one re-encoded upright), every label the output's mask.
``sampling.json`` is compared byte for byte with the file computed here from the exported labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.segment import EXIT_OK, segment
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout
from tests.segment.corpus import EXIF_ORIENTATION, encode

NUM_CLASSES = 5  # the demo model's
CLASS_NAMES = ("background", "disc", "square", "triangle", "star")
SAMPLES = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "samples"


def _content_key(data: bytes) -> str:
    """The key segment gives a manifest row without one: ``sha256:`` + 32 hex digits of the bytes' SHA-256."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


@pytest.fixture(scope="module")
def seg(ray_local, tmp_path_factory):
    from pipeline.config import from_mapping
    from pipeline.weights import DEMO_CHECKPOINT

    scenes = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("sample_*.jpg"))[:7]]
    root = tmp_path_factory.mktemp("export-manifest")
    folder = root / "in"
    folder.mkdir()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored W x H, shown H x W: the scene, upright
    keyed = [("street/0001.png", encode(scenes[0], "PNG")), ("street/0002#b.jpg", encode(scenes[1], "JPEG")),
             (None, encode(scenes[2], "JPEG")),
             ("street/0004.jpg", encode(np.rot90(scenes[3], k=1), "JPEG", exif=exif, quality=95)),
             ("street/0005.png", encode(scenes[4], "PNG"))]
    unkeyed = [encode(scenes[5], "PNG"), encode(scenes[6], "JPEG")]
    a, b = folder / "a.parquet", folder / "b.parquet"
    pq.write_table(pa.table({"name": [k for k, _ in keyed], "img": [d for _, d in keyed]}), a, row_group_size=2)
    pq.write_table(pa.table({"img": unkeyed}), b)
    sources = {f"{a}#{key or _content_key(data)}": data for key, data in keyed}
    sources.update({f"{b}#{_content_key(data)}": data for data in unkeyed})
    rotated_uri = f"{a}#street/0004.jpg"

    out = root / "out"
    config = from_mapping({
        "input": {"uri": str(folder), "format": "manifest", "bytes_column": "img", "key_column": "name"},
        "output": {"uri": str(out), "confidence": True},
        "model": {"weights": str(DEMO_CHECKPOINT)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows = {r["image_id"]: r for r in OutputLayout(uri=str(out)).read_segments().to_pylist()}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    assert sorted(r["source_uri"] for r in rows.values()) == sorted(sources)
    masks = {i: _png(out / "masks" / f"{i}.png") for i in rows}
    confidence = {i: _png(out / "confidence" / f"{i}.png") for i in rows}
    return SimpleNamespace(root=root, out=out, a=a, b=b, rows=rows, masks=masks, confidence=confidence,
                           sources=sources, rotated_uri=rotated_uri, rotated_upright=scenes[3])


def _export(seg, dest: Path, *, source: Path | None = None, **kw) -> dict:
    from jobs.export import export
    from pipeline.training.export import ExportOptions

    options = ExportOptions(source=str(source or seg.out), dest=str(dest), no_progress_timeout_s=120, **kw)
    assert export(options, echo=lambda *_: None) == 0
    return json.loads((dest / "_export.json").read_text())


def _check_image(seg, source_uri: str, data: bytes, size: tuple[int, int]) -> None:
    """The manifest's bytes, untouched; the EXIF-rotated one re-encoded upright (plain PIL: no EXIF handling)."""
    if source_uri != seg.rotated_uri:
        assert data == seg.sources[source_uri]
        return
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.getexif().get(EXIF_ORIENTATION, 1) == 1 and image.size == size
        upright = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert upright.shape == seg.rotated_upright.shape
    error = np.abs(upright - seg.rotated_upright).mean()  # JPEG losses of two generations
    assert error < 12 and np.abs(upright - np.rot90(seg.rotated_upright, k=2)).mean() > 4 * error


def _sampling_json(labels: dict[str, np.ndarray], min_pixels: int) -> bytes:
    """docs/training-data.md's sampling.json over these train labels, laid out as ``json.dumps(indent=2)`` writes it."""
    counts = {i: np.bincount(label[label != 255].ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
              for i, label in labels.items()}
    pixels = [int(sum(n[c] for n in counts.values())) for c in range(NUM_CLASSES)]
    value = {
        "split": "train", "images": len(labels), "ignore_index": 255, "min_class_pixels": min_pixels,
        "class_names": {str(c): name for c, name in enumerate(CLASS_NAMES)},
        "class_pixels": {str(c): pixels[c] for c in range(NUM_CLASSES)},
        "class_frequency": {str(c): pixels[c] / sum(pixels) for c in range(NUM_CLASSES)},
        "images_with_class": {str(c): sum(int(n[c] > 0) for n in counts.values()) for c in range(NUM_CLASSES)},
        "samples_with_class": {str(c): sorted([i, int(n[c])] for i, n in counts.items() if n[c] >= min_pixels)
                               for c in range(NUM_CLASSES)},
    }
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def test_webdataset_holds_the_manifest_bytes_and_sampling_json_is_the_labels(seg, tmp_path):
    import webdataset as wds

    present = sorted(int(n) for m in seg.masks.values() for n in np.bincount(m.ravel(), minlength=NUM_CLASSES) if n)
    min_pixels = present[len(present) // 2]  # some images listed under a class, some not
    dest = tmp_path / "wds"
    summary = _export(seg, dest, format="webdataset", images_per_task=3, min_class_pixels=min_pixels)
    assert summary["skipped"] == {} and summary["counts"]["exported"] == len(seg.rows)

    shards = sorted(str(p) for p in dest.glob("train/shard-*.tar"))
    assert len(shards) >= 3  # 7 images, at most 3 per write task
    labels = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        image_id = meta["image_id"]
        assert sample["__key__"] == image_id.replace(".", "_")
        with Image.open(io.BytesIO(sample["seg.png"])) as image:
            assert image.mode == "L"
            label = np.array(image)
        assert np.array_equal(label, seg.masks[image_id])
        (ext,) = [k for k in sample if k in ("jpg", "png")]
        assert meta["source_uri"] == seg.rows[image_id]["source_uri"]
        _check_image(seg, meta["source_uri"], sample[ext], label.shape[::-1])
        labels[image_id] = label
    assert sorted(labels) == sorted(seg.rows)

    expected = _sampling_json(labels, min_pixels)
    assert (dest / "sampling.json").read_bytes() == expected
    lists = json.loads(expected)["samples_with_class"]
    assert any(lists.values()) and not all(len(v) == len(labels) for v in lists.values())
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        ["_export.json", "id2label.json", "sampling.json", *(Path(s).relative_to(dest).as_posix() for s in shards)])

    _export(seg, dest, format="webdataset", images_per_task=3, min_class_pixels=min_pixels)  # a rerun: same bytes
    assert (dest / "sampling.json").read_bytes() == expected


def test_hf_parquet_with_ignore_below_reads_back_with_datasets(seg, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    values = np.concatenate([c.ravel() for c in seg.confidence.values()]) / 255.0
    threshold = float(np.round(np.quantile(values, 0.3), 3))
    dest = tmp_path / "hf"
    summary = _export(seg, dest, format="hf-parquet", ignore_below=threshold)
    assert summary["skipped"] == {}
    files = sorted(str(p) for p in (dest / "train").glob("shard-*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(loaded.features["image"], datasets.Image)
    raw = loaded.cast_column("image", datasets.Image(decode=False))  # the stored bytes, as datasets keeps them
    assert sorted(loaded["image_id"]) == sorted(seg.rows)
    ignored = 0
    for row, stored in zip(loaded, raw, strict=True):
        image_id = row["image_id"]
        expected = seg.masks[image_id].copy()
        expected[seg.confidence[image_id] / 255.0 < threshold] = 255
        label = np.asarray(row["label"])
        assert row["label"].mode == "L" and np.array_equal(label, expected)
        ignored += int((label == 255).sum())
        assert row["image"].size == label.shape[::-1]
        _check_image(seg, row["source_uri"], stored["image"]["bytes"], label.shape[::-1])
    assert ignored > 0


def test_rows_whose_manifest_or_key_is_gone_are_unreadable_images(seg, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(seg.out, out)
    (name, *_) = sorted(p.name for p in (out / "segments").glob("*.parquet"))
    footer = pq.read_schema(out / "segments" / name).metadata  # the run's configuration: img / name columns
    template = next(iter(seg.rows.values()))
    bad = {"gone-key-0000000000000001": f"{seg.a}#street/0099.png",
           "gone-hash-000000000000002": f"{seg.b}#{_content_key(b'not in the manifest')}",
           "gone-file-000000000000003": f"{seg.root / 'in' / 'gone.parquet'}#street/0001.png"}
    rows = [dict(template, image_id=image_id, source_uri=uri) for image_id, uri in bad.items()]
    for image_id in bad:
        shutil.copy(out / "masks" / f"{template['image_id']}.png", out / "masks" / f"{image_id}.png")
    extra = pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA).replace_schema_metadata(footer)
    pq.write_table(extra, out / "segments" / "part-later-0000000000.parquet")

    summary = _export(seg, tmp_path / "d", source=out)
    assert summary["skipped"] == {"unreadable": 3} and summary["counts"]["exported"] == len(seg.rows)
    examples = {e.split(": ", 1)[0]: e.split(": ", 1)[1] for e in summary["examples"]}
    assert set(examples) == set(bad.values())
    assert examples[bad["gone-key-0000000000000001"]].startswith("no row of the manifest has the key "
                                                                 "'street/0099.png' (column 'name'")
    assert examples[bad["gone-hash-000000000000002"]].startswith("no row of the manifest has the key 'sha256:")
    assert examples[bad["gone-file-000000000000003"]].startswith("cannot read the manifest (FileNotFoundError")


def test_write_task_results_carry_no_image_and_the_fragment_holds_the_sampling_rows(seg, tmp_path):
    from pipeline.outputs.index import load_state
    from pipeline.training.select import SelectRows
    from pipeline.training.shards import SAMPLING_DIR, WriteShards

    layout = OutputLayout(uri=str(seg.out))
    files = sorted(load_state(layout).live)
    selected = SelectRows(layout=layout)({"files": [files], "positions": [list(range(len(files)))]})
    assert set(selected.column("bytes_column").to_pylist()) == {"img"}  # from the segments files' footer
    assert set(selected.column("key_column").to_pylist()) == {"name"}
    dest = tmp_path / "d"
    out = WriteShards(layout=layout, dest=str(dest), fmt="webdataset", ignore_below=0.0, num_classes=NUM_CLASSES,
                      shard_bytes=1 << 30, min_class_pixels=1)(selected)
    (text,) = out.column("result").to_pylist()
    assert not [i for i in seg.rows if i in text]  # no per-image entry travels to the driver
    result = json.loads(text)
    assert result["images"] == {"train": len(seg.rows)} and result["skipped"] == {}
    fragment = pq.read_table(dest / SAMPLING_DIR / result["sampling_fragment"])
    entries = sorted(zip(*(fragment.column(c).to_pylist() for c in ("class_id", "image_id", "pixels")), strict=True))
    expected = sorted((c, i, int(n)) for i, m in seg.masks.items()
                      for c, n in enumerate(np.bincount(m.ravel(), minlength=NUM_CLASSES)) if n)
    assert entries == expected and result["sampling_rows"] == len(expected)


def test_the_reader_finds_every_row_segment_indexed(tmp_path):
    """Keys as segment formed them (an int key column, repeated and missing keys) -> the bytes segment read."""
    from pipeline.stages.index import IndexManifestGroups
    from pipeline.stages.read import ReadBytes
    from pipeline.training.samples import SourceReader

    datas = [f"image {i}".encode() for i in range(7)]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": [7, 7, None, 9, None, 0, 11], "bytes": datas}), path, row_group_size=2)
    index = IndexManifestGroups()({"manifest_uri": [str(path)] * 4, "row_group": [0, 1, 2, 3]})
    firsts: dict[str, bytes] = {}  # segment keeps a repeated key's first row
    for row in ReadBytes()(index).to_pylist():
        firsts.setdefault(row["source_uri"], row["data"])
    uris = sorted(set(index.column("source_uri").to_pylist()))
    assert len(uris) == 6 and f"{path}#0" in uris and f"{path}#7" in uris
    for expected in (uris, ()):  # told the keys up front (one pass), or not
        reader = SourceReader(manifests={str(path): ("bytes", "key")}, expected=expected)
        assert {uri: reader.read(uri) for uri in uris} == {uri: firsts[uri] for uri in uris}
    assert firsts[f"{path}#7"] == datas[0]
