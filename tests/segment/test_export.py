"""``export``: training data from a real ``segment`` output, read back with the real consumers.

One segment run (module fixture, ``--confidence``) over plain PNG/JPEG files, an EXIF-rotated
JPEG and a tar shard; then exports in both formats, read with ``webdataset`` into a torch
``DataLoader`` and with ``datasets.load_dataset("parquet", ...)``. Every expected value is
computed here from the output's own files (masks, confidence maps, segments rows) and the
inputs, with the rules written in docs/training-data.md re-implemented independently.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.segment import EXIT_OK, segment
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout
from tests.segment.corpus import EXIF_ORIENTATION, encode, tar_shard

NUM_CLASSES = 5  # the demo model's
CLASS_NAMES = ("background", "disc", "square", "triangle", "star")
SAMPLES = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "samples"
RUN_THRESHOLD = 0.5  # output.training.ignore_below of the segment run


def _rotated_jpeg(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored W x H, shown H x W (rotated 90 degrees clockwise)
    return encode(image, "JPEG", exif=exif, quality=95)


def _hash(image_id: str) -> float:
    """docs/training-data.md: SHA-256(id), first 8 bytes big-endian, / 2^64 (val when below V)."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:16], 16) / 2**64


def _val(image_id: str, fraction: float) -> bool:
    return _hash(image_id) < fraction


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


@pytest.fixture(scope="module")
def seg(ray_local, tmp_path_factory):
    """A segment output (demo model, no CRF, --confidence) of demo scenes: JPEG, PNG, rotated JPEG, tar members.

    The demo model, not the random tiny checkpoint: its masks differ in which classes they hold
    (the tiny one labels every image with the same two classes), which the class filters need.
    """
    from pipeline.config import from_mapping
    from pipeline.weights import DEMO_CHECKPOINT

    scenes = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("sample_*.jpg"))[:9]]
    root = tmp_path_factory.mktemp("export")
    folder = root / "in"
    folder.mkdir()
    sources: dict[str, bytes] = {}
    for i, scene in enumerate(scenes[:6]):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
        sources[str(folder / f"plain{i}.{ext}")] = encode(scene, fmt)
    for path, data in sources.items():
        Path(path).write_bytes(data)
    upright = scenes[6]
    (folder / "rotated.jpg").write_bytes(_rotated_jpeg(np.rot90(upright, k=1)))  # shown: turned back upright
    members = {"m0.png": encode(scenes[7], "PNG"), "m1.jpg": encode(scenes[8], "JPEG")}
    (folder / "shard.tar").write_bytes(tar_shard(members))
    for name, data in members.items():
        sources[f"{folder / 'shard.tar'}#{name}"] = data
    out = root / "out"
    config = from_mapping({
        "input": {"uri": str(folder)},
        "output": {"uri": str(out), "confidence": True, "training": {"ignore_below": RUN_THRESHOLD}},
        "model": {"weights": str(DEMO_CHECKPOINT)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows = {r["image_id"]: r for r in OutputLayout(uri=str(out)).read_segments().to_pylist()}
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows.values())
    rotated_id = next(i for i, r in rows.items() if r["source_uri"].endswith("rotated.jpg"))
    masks = {i: _png(out / "masks" / f"{i}.png") for i in rows}
    confidence = {i: _png(out / "confidence" / f"{i}.png") for i in rows}
    return SimpleNamespace(root=root, out=out, rows=rows, masks=masks, confidence=confidence, sources=sources,
                           rotated_id=rotated_id, rotated_upright=upright)


def _options(seg, dest: Path, **kw):
    from pipeline.training.export import ExportOptions

    return ExportOptions(source=str(seg.out), dest=str(dest), no_progress_timeout_s=120, **kw)


def _run(options) -> int:
    from jobs.export import export

    return export(options, echo=lambda *_: None)


def _wds_samples(dest: Path) -> list[dict]:
    """Every sample of every shard under ``dest``, through webdataset into a torch DataLoader."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    def label(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:  # no .convert(): the label PNG is "L" (class ids)
            assert image.mode == "L"
            return np.array(image)

    shards = sorted(str(p) for p in dest.glob("*/shard-*.tar"))
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode(
        wds.handle_extension("seg.png", label))
    return list(DataLoader(dataset, batch_size=None, num_workers=0))


def _image_member(sample: dict) -> tuple[str, bytes]:
    (ext,) = [k for k in sample if k in ("jpg", "png", "webp", "bmp", "tiff")]
    return ext, sample[ext]


def test_webdataset_export_reads_back_and_a_rerun_replaces_its_shards(seg, tmp_path):
    dest = tmp_path / "wds"
    shard_bytes, min_pixels = 40_000, 3000
    hashes = sorted(_hash(i) for i in seg.rows)  # ids hold the (temporary) input paths: pick V for 3 val images
    val_fraction = (hashes[2] + hashes[3]) / 2
    options = _options(seg, dest, format="webdataset", val_fraction=val_fraction, shard_bytes=shard_bytes,
                       min_class_pixels=min_pixels)
    assert _run(options) == 0
    samples = _wds_samples(dest)
    ids = [json.loads(s["json"])["image_id"] if isinstance(s["json"], bytes) else s["json"]["image_id"]
           for s in samples]
    assert sorted(ids) == sorted(seg.rows)  # each ok image exactly once
    expected_val = {i for i in seg.rows if _val(i, val_fraction)}
    assert len(expected_val) == 3
    for split in ("train", "val"):
        in_split = set()
        for path in (dest / split).glob("shard-*.tar"):
            with tarfile.open(path) as tar:
                in_split |= {m.name.split(".", 1)[0] for m in tar.getmembers()}
        wanted = expected_val if split == "val" else set(seg.rows) - expected_val
        assert in_split == {i.replace(".", "_") for i in wanted}
    train_shards = sorted((dest / "train").glob("shard-train-*.tar"))
    assert len(train_shards) >= 2  # --shard-bytes splits the train split
    for path in train_shards:
        with tarfile.open(path) as tar:
            data = [m for m in tar.getmembers() if not m.name.endswith(".json")]
            assert len(data) == 2 or sum(m.size for m in data) <= shard_bytes  # one image may exceed alone

    for sample in samples:
        meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        image_id, label = meta["image_id"], np.asarray(sample["seg.png"])
        assert sample["__key__"] == image_id.replace(".", "_") and "." not in sample["__key__"]
        assert np.array_equal(label, seg.masks[image_id])  # no --ignore-below: the mask itself
        assert set(np.unique(label).tolist()) <= set(range(NUM_CLASSES))
        row = seg.rows[image_id]
        assert (meta["width"], meta["height"]) == (row["width"], row["height"]) == label.shape[::-1]
        assert meta["class_pixels"] == np.bincount(label.ravel(), minlength=NUM_CLASSES).tolist()
        assert meta["source_uri"] == row["source_uri"]
        for name in ("mean_confidence", "confident_fraction", "mean_entropy", "crf_agreement"):
            assert meta[name] == pytest.approx(row[name], rel=1e-6)
        assert meta["ignored_pixels"] == row["ignored_pixels"]
        ext, data = _image_member(sample)
        with Image.open(io.BytesIO(data)) as image:  # plain PIL: no EXIF handling
            assert image.size == (label.shape[1], label.shape[0])
            if image_id == seg.rotated_id:
                assert ext == "jpg" and image.getexif().get(EXIF_ORIENTATION, 1) == 1
                upright = np.asarray(image.convert("RGB"), dtype=np.int16)
                assert upright.shape == seg.rotated_upright.shape
                error = np.abs(upright - seg.rotated_upright).mean()  # JPEG losses of two generations
                wrong = np.abs(upright - np.rot90(seg.rotated_upright, k=2)).mean()  # upside down
                assert error < 12 and wrong > 4 * error
            else:
                assert data == seg.sources[row["source_uri"]]  # the original bytes, untouched

    sampling = json.loads((dest / "sampling.json").read_text())
    train = sorted(set(seg.rows) - expected_val)
    counts = {i: np.bincount(seg.masks[i].ravel(), minlength=NUM_CLASSES) for i in train}
    assert sampling["images"] == len(train) and sampling["min_class_pixels"] == min_pixels
    assert [sampling["class_pixels"][str(c)] for c in range(NUM_CLASSES)] == \
        np.sum(list(counts.values()), axis=0).tolist()
    assert [sampling["images_with_class"][str(c)] for c in range(NUM_CLASSES)] == \
        [sum(int(n[c] > 0) for n in counts.values()) for c in range(NUM_CLASSES)]
    expected_lists = {str(c): sorted([i, int(n[c])] for i, n in counts.items() if n[c] >= min_pixels)
                      for c in range(NUM_CLASSES)}
    assert sampling["samples_with_class"] == expected_lists
    assert any(expected_lists.values()) and not all(len(v) == len(train) for v in expected_lists.values())
    assert sum(sampling["class_frequency"].values()) == pytest.approx(1.0)
    assert json.loads((dest / "id2label.json").read_text()) == {str(c): n for c, n in enumerate(CLASS_NAMES)}

    # a rerun: same shard names (replaced in place), an earlier export's shard removed, nothing doubled
    before = sorted(p.relative_to(dest).as_posix() for p in dest.glob("*/shard-*.tar"))
    stale = dest / "train" / "shard-train-0123456789abcdef-00000.tar"
    shutil.copy(train_shards[0], stale)
    (dest / "train" / ".shard-train-x-00000.tar.0123.tmp").write_bytes(b"partial")
    assert _run(options) == 0
    after = sorted(p.relative_to(dest).as_posix() for p in dest.glob("*/shard-*.tar"))
    assert after == before and not stale.exists()
    assert not [p for p in dest.rglob(".*")]  # no temporary left visible or hidden
    again = _wds_samples(dest)
    assert sorted(s["__key__"] for s in again) == sorted(i.replace(".", "_") for i in seg.rows)
    summary = json.loads((dest / "_export.json").read_text())
    assert summary["removed_stale_shards"] == ["train/shard-train-0123456789abcdef-00000.tar"]
    assert summary["counts"]["val"] == len(expected_val)


def test_hf_parquet_ignore_below_and_min_confident_fraction(seg, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    values = np.concatenate([c.ravel() for c in seg.confidence.values()]) / 255.0
    threshold = float(np.round(np.quantile(values, 0.4), 3))
    fractions = {i: float(np.mean(c / 255.0 >= threshold)) for i, c in seg.confidence.items()}
    minimum = float(np.median(list(fractions.values())))
    kept = {i for i, f in fractions.items() if f >= minimum}
    assert 0 < len(kept) < len(seg.rows)
    dest = tmp_path / "hf"
    assert _run(_options(seg, dest, format="hf-parquet", ignore_below=threshold,
                         min_confident_fraction=minimum)) == 0

    files = sorted(str(p) for p in (dest / "train").glob("shard-*.parquet"))
    assert files and not list(dest.glob("val/*"))
    schema_meta = json.loads(pq.read_schema(files[0]).metadata[b"huggingface"])
    assert schema_meta["info"]["features"]["image"] == {"_type": "Image"}
    loaded = datasets.load_dataset("parquet", data_files={"train": files}, cache_dir=str(tmp_path / "cache"))["train"]
    assert isinstance(loaded.features["image"], datasets.Image)
    assert isinstance(loaded.features["label"], datasets.Image)
    assert loaded.features["class_pixels"].feature == datasets.Value("int64")
    assert sorted(loaded["image_id"]) == sorted(kept)
    ignored_somewhere = False
    for row in loaded:
        image_id = row["image_id"]
        mask, conf = seg.masks[image_id], seg.confidence[image_id]
        expected = mask.copy()
        expected[conf / 255.0 < threshold] = 255
        assert row["label"].mode == "L"
        label = np.asarray(row["label"])
        assert np.array_equal(label, expected)
        ignored_somewhere |= bool((label == 255).any())
        assert row["image"].size == label.shape[::-1]
        assert row["ignored_pixels"] == int((conf / 255.0 < threshold).sum())
        assert row["confident_fraction"] == pytest.approx(fractions[image_id], abs=1e-6)
        assert row["class_pixels"] == np.bincount(expected[expected != 255], minlength=NUM_CLASSES).tolist()
        assert row["mean_entropy"] == pytest.approx(seg.rows[image_id]["mean_entropy"], rel=1e-6)
    assert ignored_somewhere
    for path in files:
        assert all(pq.ParquetFile(path).metadata.row_group(g).num_rows <= 100
                   for g in range(pq.ParquetFile(path).metadata.num_row_groups))


def test_classes_present_and_min_confident_fraction_from_the_command_line(seg, tmp_path):
    from jobs.cli import main

    present = {c: {i for i, m in seg.masks.items() if (m == c).any()} for c in range(NUM_CLASSES)}
    candidates = [c for c in range(1, NUM_CLASSES) if 3 <= len(present[c]) < len(seg.rows)]
    assert candidates, {c: len(v) for c, v in present.items()}
    chosen = candidates[0]
    # without --ignore-below, the rows' confident_fraction (at the segment run's threshold) decides
    fractions = sorted(seg.rows[i]["confident_fraction"] for i in present[chosen])
    minimum = (fractions[0] + fractions[1]) / 2
    expected = {i for i in present[chosen] if seg.rows[i]["confident_fraction"] >= minimum}
    assert 2 <= len(expected) < len(present[chosen])
    dest = tmp_path / "cls"
    assert main(["export", "--from", str(seg.out), "--to", str(dest), "--format", "webdataset", "--classes-present",
                 CLASS_NAMES[chosen], "--min-confident-fraction", str(minimum), "--no-progress"]) == 0
    keys = [s["__key__"] for s in _wds_samples(dest)]
    assert sorted(keys) == sorted(i.replace(".", "_") for i in expected)
    counts = json.loads((dest / "_export.json").read_text())["counts"]
    assert counts["dropped_classes"] == len(seg.rows) - len(present[chosen])
    assert counts["dropped_confident_fraction"] == len(present[chosen]) - len(expected)


@pytest.mark.s3
def test_limit_into_s3_and_a_rerun_there_removes_an_earlier_shard(seg, s3_server, s3_bucket):
    import s3fs

    from pipeline.io.uris import S3Settings

    # explicit settings: the Ray workers started before the S3 server's environment was set
    settings = S3Settings(endpoint_url=s3_server["endpoint_url"], region="us-east-1", access_key_id="testing",
                          secret_access_key="testing")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    options = _options(seg, f"s3://{s3_bucket}/limit", limit=4, s3=settings)
    assert _run(options) == 0

    def keys() -> list[str]:
        fs.invalidate_cache()
        out = []
        for path in fs.find(f"{s3_bucket}/limit"):
            name = path.rsplit("/", 1)[-1]
            assert not name.startswith(".")  # no temporary reached the bucket
            if name.endswith(".tar"):
                with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
                    out += [m.name.split(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".seg.png")]
        return out

    first = keys()
    assert len(first) == len(set(first)) == 4 and set(first) <= {i.replace(".", "_") for i in seg.rows}
    assert json.loads(fs.cat_file(f"{s3_bucket}/limit/_export.json"))["counts"]["exported"] == 4
    sampling = json.loads(fs.cat_file(f"{s3_bucket}/limit/sampling.json"))  # from fragments on S3, then removed
    assert {i.replace(".", "_") for v in sampling["samples_with_class"].values() for i, _ in v} <= set(first)
    assert any(sampling["samples_with_class"].values()) and not fs.exists(f"{s3_bucket}/limit/_sampling")
    (shard,) = [p for p in fs.find(f"{s3_bucket}/limit/train") if p.endswith(".tar")]
    fs.pipe_file(f"{s3_bucket}/limit/train/shard-train-0123456789abcdef-00000.tar", fs.cat_file(shard))
    assert len(keys()) == 8
    assert _run(options) == 0
    assert sorted(keys()) == sorted(first)  # the same 4 images (order preserved), the stale copy gone


def test_duplicate_rows_latest_wins_and_a_missing_manifest_is_an_unreadable_image(seg, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(seg.out, out)
    (name,) = [p.name for p in (out / "segments").glob("*.parquet")]
    table = pq.read_table(out / "segments" / name).cast(SEGMENT_SCHEMA)
    twice = sorted(seg.rows)[:2]
    again = table.filter(pa.array([i in twice for i in table.column("image_id").to_pylist()])).to_pylist()
    for row in again:
        row["written_at"] = row["written_at"].replace(year=row["written_at"].year + 1)
        row["mean_confidence"] = 0.125  # tells the later row apart
    manifest_row = dict(again[0], image_id="manifest-row-0123456789abcdef",
                        source_uri=str(tmp_path / "images.parquet") + "#k1")
    shutil.copy(out / "masks" / f"{again[0]['image_id']}.png", out / "masks" / "manifest-row-0123456789abcdef.png")
    extra = pa.Table.from_pylist([*again, manifest_row], schema=SEGMENT_SCHEMA)
    pq.write_table(extra, out / "segments" / "part-later-0000000000.parquet")

    from pipeline.training.export import ExportOptions

    dest = tmp_path / "dup"
    assert _run(ExportOptions(source=str(out), dest=str(dest), no_progress_timeout_s=120)) == 0
    samples = _wds_samples(dest)
    metas = {s["__key__"]: (s["json"] if isinstance(s["json"], dict) else json.loads(s["json"])) for s in samples}
    assert len(samples) == len(metas) == len(seg.rows)  # each image once, the row of the missing manifest left out
    for image_id in seg.rows:
        expected = 0.125 if image_id in twice else seg.rows[image_id]["mean_confidence"]
        assert metas[image_id.replace(".", "_")]["mean_confidence"] == pytest.approx(expected, rel=1e-6)
    summary = json.loads((dest / "_export.json").read_text())
    assert summary["duplicate_ids"] == 2 and summary["counts"]["duplicates"] == 2
    assert summary["skipped"] == {"unreadable": 1}
    (example,) = summary["examples"]
    assert example.startswith(f"{manifest_row['source_uri']}: cannot read the manifest (FileNotFoundError")


def test_ignore_below_without_confidence_maps_is_refused_before_any_work(seg, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(seg.out, out, ignore=shutil.ignore_patterns("confidence"))
    from pipeline.training.export import ExportOptions

    code = _run(ExportOptions(source=str(out), dest=str(tmp_path / "d"), ignore_below=0.9))
    assert code == 2
    err = capsys.readouterr().err
    assert "--ignore-below 0.9" in err and "--confidence" in err
    assert not (tmp_path / "d").exists()


def test_source_kinds_split_only_at_shards_and_manifests():
    from pipeline.training.samples import source_kind

    assert source_kind("/data/a#b/c.jpg") == ("file", "/data/a#b/c.jpg", "")
    assert source_kind("s3://b/x#1/s.tar#dir/m#2.jpg") == ("tar", "s3://b/x#1/s.tar", "dir/m#2.jpg")
    assert source_kind("/m/images.parquet#key") == ("manifest", "/m/images.parquet", "key")


@pytest.mark.s3
def test_a_shard_on_s3_appears_only_whole(s3_server, s3_bucket):
    import s3fs

    from pipeline.io.uris import S3Settings
    from pipeline.training.samples import Sample
    from pipeline.training.shards import TarShard

    settings = S3Settings(endpoint_url=s3_server["endpoint_url"], region="us-east-1")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    shard = TarShard(f"s3://{s3_bucket}/d/train/shard-train-ab-00000.tar", s3=settings)
    sample = Sample(image_id="a.b-0123", key="a_b-0123", image=b"\xff\xd8 not decoded", image_ext="jpg",
                    label=b"png", meta={"image_id": "a.b-0123"}, class_pixels=[1])
    shard.add(sample)
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/d/train/shard-train-ab-00000.tar")
    shard.commit()
    fs.invalidate_cache()
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{s3_bucket}/d/train/shard-train-ab-00000.tar"))) as tar:
        assert tar.getnames() == ["a_b-0123.jpg", "a_b-0123.seg.png", "a_b-0123.json"]
    assert fs.ls(f"{s3_bucket}/d/train") == [f"{s3_bucket}/d/train/shard-train-ab-00000.tar"]
