"""``pipeline.training.store`` without Ray: shards merged to a target size, and every state a kill can leave
recovered to each image exactly once (locally; the S3 path runs in test_training_output.py).

Shards are built from synthetic samples and read back with the real consumers' formats (``tarfile``
as ``webdataset`` reads it, ``pyarrow.parquet`` with the HF features metadata). A kill is the state
the protocol's steps leave when the process stops after one of them: the steps are the store's
own public methods, called up to that point.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.outputs import OutputLayout
from pipeline.training.samples import make_sample
from pipeline.training.store import PENDING_DIR, TRAINING_DIR, TrainingStore, recover
from tests.segment.corpus import encode, shapes_image

NUM_CLASSES = 3


def _samples(start: int, count: int):
    out = []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        image = shapes_image(40 + i % 7, 50, seed=i)
        mask = rng.integers(0, NUM_CLASSES, image.shape[:2], dtype=np.uint8)
        confidence = rng.integers(0, 256, image.shape[:2], dtype=np.uint8)
        out.append(make_sample(image_id=f"img{i:03d}-{i:016x}", source_uri=f"/in/img{i:03d}.png",
                               image=encode(image, "PNG"), image_ext="png", mask=mask, confidence=confidence,
                               ignore_below=0.5, num_classes=NUM_CLASSES, quality={}))
    return out


def _parts(store: TrainingStore, out: Path, batches: list[tuple[int, int]]) -> dict[str, bytes]:
    """Published part shards, one per ``(start, count)``, each with its committed segments file."""
    (out / "segments").mkdir(parents=True, exist_ok=True)
    expected = {}
    for n, (start, count) in enumerate(batches):
        segments = f"part-run-{n:04d}.parquet"
        samples = _samples(start, count)
        name = store.write_pending(segments, samples)
        (out / "segments" / segments).write_bytes(b"committed")  # only its existence matters to recovery
        store.publish(name)
        expected.update({s.key: s.label for s in samples})
    return expected


def _read(store: TrainingStore, out: Path) -> Counter:
    """``{key: times seen}`` over the published shards, checking each sample's label bytes on the way."""
    seen: Counter = Counter()
    for path in sorted((out / TRAINING_DIR).glob(f"*{store.suffix}")):
        if store.format == "webdataset":
            with tarfile.open(path) as tar:
                names = tar.getnames()
                for name in names:
                    key = name.split(".", 1)[0]
                    if name.endswith(".seg.png"):
                        seen[key] += 1
                        assert f"{key}.png" in names and f"{key}.json" in names
                        meta = json.loads(tar.extractfile(f"{key}.json").read())
                        assert meta["key"] == key
        else:
            parquet = pq.ParquetFile(path)
            assert b"huggingface" in parquet.schema_arrow.metadata
            assert all(parquet.metadata.row_group(g).num_rows <= 100 for g in range(parquet.num_row_groups))
            for row in parquet.read(columns=["image_id"]).to_pylist():
                seen[row["image_id"]] += 1
    return seen


def _labels(store: TrainingStore, out: Path) -> dict[str, bytes]:
    labels = {}
    for path in sorted((out / TRAINING_DIR).glob(f"*{store.suffix}")):
        if store.format == "webdataset":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".seg.png"):
                        labels[member.name.split(".", 1)[0]] = tar.extractfile(member).read()
        else:
            for row in pq.read_table(path, columns=["image_id", "label"]).to_pylist():
                labels[row["image_id"]] = row["label"]["bytes"]
    return labels


@pytest.fixture(params=["webdataset", "hf-parquet"])
def store(request, tmp_path) -> TrainingStore:
    return TrainingStore(layout=OutputLayout(uri=str(tmp_path / "out")), format=request.param, ignore_below=0.5)


def test_merge_packs_small_shards_to_the_target_keeping_every_sample_once(store, tmp_path):
    out = tmp_path / "out"
    expected = _parts(store, out, [(0, 150), (150, 3), (153, 3), (156, 3), (159, 3), (162, 3)])
    sizes = store.shards()
    big = max(sizes, key=sizes.get)
    small = sorted(n for n in sizes if n != big)
    target = sum(sizes[n] for n in small[:3])  # the first three small ones fill a group; the big one is over half
    merged = store.merge(target_bytes=target)
    after = store.shards()
    assert big in after  # at least half the target: left as it is
    assert len(merged) == 2 and set(merged) <= set(after)  # small[:3] and small[3:] (two names or more)
    assert not set(small) & set(after)
    assert _read(store, out) == Counter({key: 1 for key in expected})
    assert _labels(store, out) == expected
    assert not list((out / PENDING_DIR).iterdir())
    store.merge(target_bytes=target)  # merged shards under half the target (format overheads) merge again
    assert _read(store, out) == Counter({key: 1 for key in expected})
    assert _labels(store, out) == expected


@pytest.mark.parametrize("stop_after", ["write_merged", "commit_merge", "delete_inputs", "publish"])
def test_a_merge_stopped_after_any_step_is_finished_or_undone_by_recover(store, tmp_path, stop_after):
    out = tmp_path / "out"
    expected = _parts(store, out, [(0, 4), (4, 4), (8, 4)])
    names = sorted(store.shards())
    layout = store.layout
    name = store.write_merged(names)
    if stop_after != "write_merged":
        store.commit_merge(name, names)
    if stop_after in ("delete_inputs", "publish"):
        for part in names[:2]:  # a kill part-way through step 3
            (out / TRAINING_DIR / part).unlink()
    if stop_after == "publish":
        (out / TRAINING_DIR / names[2]).unlink()
        (out / PENDING_DIR / name).rename(out / TRAINING_DIR / name)
    visible = _read(store, out)
    assert set(visible.values()) <= {1}  # never an image twice, whatever the step

    counts = recover(layout)
    assert counts["merges_finished" if stop_after != "write_merged" else "merges_dropped"] == 1
    assert _read(store, out) == Counter({key: 1 for key in expected})
    assert _labels(store, out) == expected
    assert sorted(store.shards()) == ([name] if stop_after != "write_merged" else names)
    assert not list((out / PENDING_DIR).iterdir())


def test_recover_publishes_committed_batches_and_drops_the_others(store, tmp_path):
    out = tmp_path / "out"
    (out / "segments").mkdir(parents=True)
    committed = store.write_pending("part-run-a.parquet", _samples(0, 3))
    (out / "segments" / "part-run-a.parquet").write_bytes(b"committed")  # the kill came after the rows committed
    dropped = store.write_pending("part-run-b.parquet", _samples(3, 3))  # ... or before
    (out / PENDING_DIR / ".part-run-c.tar.0123.tmp").write_bytes(b"half a shard")  # a writer killed mid-write
    assert store.shards() == {}  # nothing pending is visible

    counts = recover(store.layout)
    assert (counts["published"], counts["dropped"]) == (1, 1)
    assert set(store.shards()) == {committed}
    assert dropped not in store.shards()
    assert _read(store, out) == Counter({s.key: 1 for s in _samples(0, 3)})
    assert not list((out / PENDING_DIR).iterdir())
    assert recover(store.layout) == {"published": 0, "dropped": 0, "merges_finished": 0, "merges_dropped": 0}


def test_a_publish_repeated_after_a_kill_is_harmless(store):
    name = store.write_pending("part-run-a.parquet", _samples(0, 2))
    store.publish(name)
    store.publish(name)  # a retried task publishes again: the shard is already there
    assert set(store.shards()) == {name}
    with pytest.raises(FileNotFoundError):
        store.publish("part-never-written" + store.suffix)


def test_merged_parquet_shards_are_repacked_in_row_groups_of_100(tmp_path):
    store = TrainingStore(layout=OutputLayout(uri=str(tmp_path / "out")), format="hf-parquet")
    _parts(store, tmp_path / "out", [(0, 64), (64, 64), (128, 64)])
    (merged,) = store.merge(target_bytes=10 * sum(store.shards().values()))
    parquet = pq.ParquetFile(tmp_path / "out" / TRAINING_DIR / merged)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [100, 92]
    assert parquet.schema_arrow.metadata[b"huggingface"] == pq.ParquetFile(
        next((tmp_path / "out" / TRAINING_DIR).glob("*.parquet"))).schema_arrow.metadata[b"huggingface"]


def test_a_retried_merge_task_finishes_the_committed_merge(store, tmp_path):
    """Ray re-runs a merge task whose worker died after the commit: the retry finishes, never re-reads."""
    out = tmp_path / "out"
    expected = _parts(store, out, [(0, 3), (3, 3)])
    names = sorted(store.shards())
    name = store.write_merged(names)
    store.commit_merge(name, names)
    (out / TRAINING_DIR / names[0]).unlink()  # the first attempt died half-way through deleting the inputs
    assert store.merge_group(names) == name
    assert sorted(store.shards()) == [name]
    assert _read(store, out) == Counter({key: 1 for key in expected})


def test_discard_removes_a_shard_pending_or_published(store, tmp_path):
    published = store.write_pending("part-run-a.parquet", _samples(0, 2))
    store.publish(published)
    pending = store.write_pending("part-run-b.parquet", _samples(2, 2))
    store.discard("part-run-a.parquet")
    store.discard("part-run-b.parquet")
    store.discard("part-run-c.parquet")  # nothing there: fine
    assert store.shards() == {}
    assert not (tmp_path / "out" / PENDING_DIR / pending).exists()


def test_settings_are_recorded_checked_and_dropped_when_nothing_used_them(tmp_path):
    from pipeline.training.store import TrainingSettingsError, check_settings, read_settings, write_settings

    layout = OutputLayout(uri=str(tmp_path / "out"))
    settings = check_settings(layout, fmt="webdataset", ignore_below=0.9, ok_rows=0)
    assert settings == {"format": "webdataset", "ignore_below": 0.9}
    write_settings(layout, settings)
    assert check_settings(layout, fmt="webdataset", ignore_below=0.9, ok_rows=5) is None
    with pytest.raises(TrainingSettingsError, match="--training webdataset --ignore-below 0.9"):
        check_settings(layout, fmt="hf-parquet", ignore_below=0.9, ok_rows=5)
    with pytest.raises(TrainingSettingsError, match="keeps training data"):
        check_settings(layout, fmt="", ignore_below=0.0, ok_rows=5)
    # a run with --training killed before it committed an ok row, then a run without: the record goes
    assert check_settings(layout, fmt="", ignore_below=0.0, ok_rows=0) == {}
    write_settings(layout, {})
    assert read_settings(layout) is None
    with pytest.raises(TrainingSettingsError, match="without --training"):
        check_settings(layout, fmt="webdataset", ignore_below=0.9, ok_rows=5)


def test_phone_jpegs_stored_as_mpo_keep_a_jpg_member(tmp_path):
    """Pillow reads many phone JPEGs as "MPO" (extra frames after the first): still a .jpg sample."""
    import io

    from PIL import Image

    from pipeline.training.samples import upright_image

    first, second = Image.fromarray(shapes_image(40, 60, seed=1)), Image.fromarray(shapes_image(40, 60, seed=2))
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second])
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO"
    assert upright_image(data)[:2] == (data, "jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[second], exif=exif)
    upright, ext, size = upright_image(buffer.getvalue())
    assert ext == "jpg" and size == (40, 60) and upright[:2] == b"\xff\xd8"


def _crf_rows(tiny_checkpoint, count: int):
    """Rows as the CRF stage hands them to the writer with --training (decode keeps the upright image)."""
    from pipeline.stages import CRFStage, DecodeStage, NetworkStage

    ids = [f"w{i}" for i in range(count)]
    decoded = DecodeStage(max_side=65, training_image=True)({
        "image_id": ids, "source_uri": [f"/in/{i}.png" for i in ids], "status": ["ok"] * count,
        "error": [None] * count, "error_kind": [None] * count, "t_read": [0.0] * count,
        "node_read": ["local"] * count,
        "data": [encode(shapes_image(50 + 3 * i, 70, seed=i), "PNG") for i in range(count)]})
    network = NetworkStage(weights=str(tiny_checkpoint), device="cpu", max_side=65)(decoded)
    return CRFStage(params=None, ignore_below=0.5, confidence=True)(network)


def test_a_writer_whose_run_lost_the_lease_commits_nothing(tiny_checkpoint, tmp_path):
    from pipeline.outputs.lease import LeaseGuard, LeaseLost, OutputLease
    from pipeline.stages import WriteStage

    out = tmp_path / "out"
    layout = OutputLayout(uri=str(out))
    store = TrainingStore(layout=layout, format="webdataset", ignore_below=0.5)
    rows = _crf_rows(tiny_checkpoint, 3)
    with OutputLease(str(out), ttl_s=30, owner_id="run-b").acquire():  # another run took the output over
        LeaseGuard(str(out), owner_id="run-b", ttl_s=30)()  # ... and holds it with time to spare
        lost = WriteStage(layout=layout, run_id="run-a", training=store,
                          lease_guard=LeaseGuard(str(out), owner_id="run-a", ttl_s=30))
        with pytest.raises(LeaseLost, match="run-b"):
            lost(rows)
    assert not list(out.glob("segments/*.parquet"))  # no row committed
    assert store.shards() == {}  # its shard stayed pending: invisible, and dropped by the next run
    assert recover(layout)["dropped"] == 1
    with pytest.raises(LeaseLost, match="it is gone"):
        LeaseGuard(str(out), owner_id="run-b", ttl_s=30)()  # released: nobody holds it


def test_a_writer_commits_rows_and_shard_together(tiny_checkpoint, tmp_path):
    from pipeline.outputs.lease import LeaseGuard, OutputLease
    from pipeline.stages import WriteStage

    out = tmp_path / "out"
    layout = OutputLayout(uri=str(out))
    store = TrainingStore(layout=layout, format="hf-parquet", ignore_below=0.5)
    with OutputLease(str(out), ttl_s=30, owner_id="run-a").acquire():
        WriteStage(layout=layout, run_id="run-a", training=store,
                   lease_guard=LeaseGuard(str(out), owner_id="run-a", ttl_s=30))(_crf_rows(tiny_checkpoint, 3))
    rows = layout.read_segments().to_pylist()
    (shard,) = store.shards()
    assert shard == next((out / "segments").glob("part-*.parquet")).name  # the segments file's name (same suffix)
    table = pq.read_table(out / TRAINING_DIR / shard)
    assert sorted(table.column("image_id").to_pylist()) == sorted(r["image_id"] for r in rows)
    assert table.column("ignored_pixels").to_pylist() == [
        next(r for r in rows if r["image_id"] == i)["ignored_pixels"] for i in table.column("image_id").to_pylist()]
