"""Corpus scale (issue #10): resume on thousands of prior rows, kill-safe compaction, the first release's layout,
ids of long-prefix URIs, inputs streamed without a driver list, statistics merged across runs.

Expected values are computed here from the rows themselves (pyarrow + numpy, the old
id scheme re-implemented), never with the pipeline functions under test.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.segment import EXIT_OK, segment
from pipeline.config import from_mapping
from pipeline.io.ids import image_id_for, is_safe_id
from pipeline.io.sources import plan_input
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout
from pipeline.outputs.index import load_state, merge_totals
from pipeline.segment import prepare_output
from tests.segment.corpus import good_images, manifest, tar_shard, write_files

REPO = Path(__file__).resolve().parents[2]
QUIET = {"echo": lambda *_: None}


# ----------------------------------------------------------------------------- helpers


def _model(tiny_checkpoint) -> tuple[int, str, list[str]]:
    """``(num_classes, model sha256 as the job records it, class names)`` of the tiny checkpoint."""
    from pipeline.weights import checkpoint_sha256, read_record

    record = read_record(tiny_checkpoint)
    return record.num_classes, record.sha256 or checkpoint_sha256(tiny_checkpoint), list(record.class_names)


def _config(tmp_path: Path, input_uri, tiny_checkpoint, **output) -> object:
    return from_mapping({
        "input": {"uri": str(input_uri)}, "output": {"uri": str(tmp_path / "out"), **output},
        "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    })


def _run_json(out: Path) -> dict:
    return json.loads((out / "_run.json").read_text())


def _segment_paths(out: Path) -> list[Path]:
    """Every visible segments file physically present (live or not)."""
    return sorted(p for p in (out / "segments").glob("*.parquet") if not p.name.startswith("."))


def _physical_rows(out: Path, columns=None) -> list[dict]:
    """Every row of every segments file present, read with pyarrow (no dedupe, no liveness)."""
    rows = []
    for path in _segment_paths(out):
        table = pq.read_table(path)
        rows += table.select([c for c in (columns or table.column_names) if c in table.column_names]).to_pylist()
    return rows


def fake_rows(uris, *, num_classes: int, model_sha256: str, run_id: str, seed: int = 0,
              ids=None) -> list[dict]:
    """``ok`` rows valid for SEGMENT_SCHEMA; class_pixels sum to width * height (crf None: CRF disabled)."""
    import datetime as dt

    rng = np.random.default_rng(seed)
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    rows = []
    for i, uri in enumerate(uris):
        width, height = int(rng.integers(16, 120)), int(rng.integers(16, 120))
        cuts = np.sort(rng.integers(0, width * height + 1, num_classes - 1))
        pixels = np.diff(np.concatenate([[0], cuts, [width * height]])).astype(int).tolist()
        image_id = ids[i] if ids is not None else image_id_for(uri)
        rows.append({
            "image_id": image_id, "source_uri": uri, "status": "ok", "width": width, "height": height,
            "mask_uri": f"/nowhere/masks/{image_id}.png", "class_pixels": pixels,
            "class_mean_confidence": [0.5] * num_classes, "model_sha256": model_sha256, "crf": None,
            "run_id": run_id, "written_at": when + dt.timedelta(seconds=i),
        })
    return rows


def write_in_files(layout: OutputLayout, rows: list[dict], per_file: int) -> int:
    for start in range(0, len(rows), per_file):
        layout.write_segments(rows[start:start + per_file])
    return -(-len(rows) // per_file)


def _assert_each_row_once(table_rows: list[dict], expected: dict[str, dict], what: str) -> None:
    ids = [r["image_id"] for r in table_rows]
    repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
    assert not repeated, f"{what}: ids seen more than once: {repeated[:5]}"
    assert set(ids) == set(expected), (f"{what}: {len(set(expected) - set(ids))} ids missing, "
                                       f"{len(set(ids) - set(expected))} unexpected")
    for row in table_rows:
        want = expected[row["image_id"]]
        assert (row["source_uri"], row["class_pixels"], row["run_id"]) == \
            (want["source_uri"], want["class_pixels"], want["run_id"]), f"{what}: row {row['image_id']} changed"


# ----------------------------------------------------------------------------- 4. ids of long-prefix URIs


def test_ids_of_200k_uris_sharing_a_300_char_prefix_are_distinct_safe_and_keep_the_tail():
    prefix = "s3://bucket/" + "/".join(f"level{i:02d}-" + "x" * 20 for i in range(11))[:300]
    assert len(prefix) - len("s3://bucket/") == 300
    hex16 = re.compile(r"^[0-9a-f]{16}$")
    ids = set()
    for i in range(200_000):
        uri = f"{prefix}/IMG_{i:07d}.jpg"
        image_id = image_id_for(uri)
        slug, _, digest = image_id.rpartition("-")
        assert hex16.match(digest), image_id
        assert digest == hashlib.sha256(uri.encode()).hexdigest()[:16], image_id
        assert f"IMG_{i:07d}" in slug, image_id
        assert is_safe_id(image_id), image_id
        ids.add(image_id)
    assert len(ids) == 200_000
    uri = f"{prefix}/IMG_0000042.jpg"
    assert image_id_for(uri) == image_id_for(uri) == f"{image_id_for(uri).rpartition('-')[0]}-" \
        f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}"
    # differing only in the prefix (same tail): still distinct, by the hash of the full URI
    other = "s3://bucket/" + "y" + prefix[len("s3://bucket/") + 1:] + "/IMG_0000042.jpg"
    assert image_id_for(other) != image_id_for(uri)


# ----------------------------------------------------------------------------- 2. compaction killed mid-way

SLOW_COMPACTION = """
import sys, time
from pipeline.outputs import OutputLayout
from pipeline.outputs import compaction
from pipeline.segment import prepare_output

delay = float(sys.argv[3])
real_delete = compaction.delete_files

def slow_delete(layout, names):  # slow storage: a kill lands between 'compacted file written' and 'inputs deleted'
    for name in names:
        time.sleep(delay)
        real_delete(layout, [name])

compaction.delete_files = slow_delete

def one_by_one(fn, items):
    return [fn(item) for item in items]

prepare_output(OutputLayout(uri=sys.argv[1]), target_rows=int(sys.argv[2]), map_fn=one_by_one)
print("done", flush=True)
"""

FILES, ROWS_PER_FILE, TARGET_ROWS = 40, 5, 20  # 200 rows; groups of 4 files -> 10 compacted files


def _small_files_output(tmp_path: Path) -> tuple[OutputLayout, dict[str, dict]]:
    layout = OutputLayout(uri=str(tmp_path / "out"))
    uris = [f"s3://bucket/images/cam{i % 3}/img{i:04d}.jpg" for i in range(FILES * ROWS_PER_FILE)]
    rows = fake_rows(uris, num_classes=5, model_sha256="a" * 64, run_id="run-small", seed=1)
    for start in range(0, len(rows), ROWS_PER_FILE):  # one run id per file, as a run writes them
        layout.write_segments(rows[start:start + ROWS_PER_FILE])
    assert len(_segment_paths(tmp_path / "out")) == FILES
    return layout, {r["image_id"]: r for r in rows}


def _check_once(layout: OutputLayout, out: Path, expected: dict[str, dict], what: str) -> None:
    state = load_state(layout)
    live_rows = []
    for name in state.live:
        live_rows += pq.read_table(out / "segments" / name).to_pylist()
    _assert_each_row_once(live_rows, expected, f"{what}: live files")
    _assert_each_row_once(layout.read_segments(deduplicated=False).to_pylist(), expected,
                          f"{what}: read_segments(deduplicated=False)")


def _rerun_and_check(layout: OutputLayout, out: Path, expected: dict[str, dict], what: str) -> None:
    state = prepare_output(layout, target_rows=TARGET_ROWS)
    assert merge_totals(state.live_summaries()).rows == len(expected), what
    after = load_state(layout)
    assert after.replaced == set(), f"{what}: leftovers of the killed compaction remain: {sorted(after.replaced)}"
    assert set(after.files) == set(after.live)
    _assert_each_row_once(_physical_rows(out), expected, f"{what}: every file present after the rerun")
    # compacted files of a killed run are not in the index yet: their rows are estimated from
    # their size, so they may be packed once more; never more files than groups of TARGET_ROWS
    assert len(_segment_paths(out)) <= FILES * ROWS_PER_FILE // TARGET_ROWS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill_after", [1, 3])
def test_compaction_killed_between_write_and_delete_then_rerun(tmp_path, kill_after):
    layout, expected = _small_files_output(tmp_path)
    out = tmp_path / "out"
    prepare_output(layout, target_rows=0)  # the index covers the small files (as after a run's commit)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPACTION, str(out), str(TARGET_ROWS), "0.25"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while (len(list((out / "segments").glob("compact-*.parquet"))) < kill_after
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.01)
        still_running = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert still_running, f"compaction ended before the kill: {err.decode()[-2000:]}"
    compacted = sorted(p.name for p in (out / "segments").glob("compact-*.parquet"))
    assert len(compacted) == kill_after
    state = load_state(layout)
    assert state.replaced, "the kill did not land between writing a compacted file and deleting its inputs"
    assert merge_totals(state.live_summaries()).rows <= len(expected)  # summaries never count a row twice
    _check_once(layout, out, expected, f"killed after {kill_after} compacted file(s)")
    _rerun_and_check(layout, out, expected, f"rerun after a kill after {kill_after} compacted file(s)")


def _restore(out: Path, saved_index: Path, inputs) -> None:
    """The output as a kill leaves it between writing compacted files and deleting ``inputs``.

    A compaction writes its summaries to ``_index/`` only after deleting the inputs, so at
    such a kill the index is still the one from before the compaction.
    """
    for path in inputs:
        shutil.copy(path, out / "segments" / path.name)
    shutil.rmtree(out / "_index")
    shutil.copytree(saved_index, out / "_index")


@pytest.mark.timeout(60)
def test_compacted_file_written_inputs_not_deleted_then_rerun(tmp_path):
    layout, expected = _small_files_output(tmp_path)
    out = tmp_path / "out"
    prepare_output(layout, target_rows=0)  # summaries of the small files in _index/ (as after a run's commit)
    saved, saved_index = tmp_path / "saved", tmp_path / "saved-index"
    shutil.copytree(out / "segments", saved)
    shutil.copytree(out / "_index", saved_index)
    prepare_output(layout, target_rows=TARGET_ROWS)
    compacted = _segment_paths(out)
    assert len(compacted) == FILES // 4 and all(p.name.startswith("compact-") for p in compacted)

    # Every compacted file written, no input deleted yet (plus the temporary of a compacted
    # file killed mid-write).
    _restore(out, saved_index, sorted(saved.glob("*.parquet")))
    (out / "segments" / ".compact-0123456789abcdef0123.parquet.deadbeef.tmp").write_bytes(b"PAR1 half written")
    assert len(_segment_paths(out)) == FILES + FILES // 4
    state = load_state(layout)
    assert sorted(state.replaced) == sorted(p.name for p in saved.glob("*.parquet"))
    _check_once(layout, out, expected, "compacted, inputs not deleted")
    _rerun_and_check(layout, out, expected, "rerun after compacted-but-not-deleted")

    # Half the inputs of one group left (a kill in the middle of deleting them).
    group_of_first = json.loads(pq.read_schema(compacted[0]).metadata[b"deeplab_batch.replaces"])
    assert len(group_of_first) == 4
    _restore(out, saved_index, [saved / name for name in group_of_first[2:]])
    assert sorted(load_state(layout).replaced) == sorted(group_of_first[2:])
    _check_once(layout, out, expected, "half the inputs of one group left")
    _rerun_and_check(layout, out, expected, "rerun after half the inputs of one group were left")


# ----------------------------------------------------------------------------- 5. planning without a driver list


def test_plans_hold_top_level_units_only(tmp_path):
    shards = tmp_path / "in" / "shards"
    shards.mkdir(parents=True)
    (shards / "a.tar").write_bytes(tar_shard(good_images(3)))
    (shards / "b.tar").write_bytes(tar_shard(good_images(3, start=3)))
    plan = plan_input(str(tmp_path / "in"))
    assert (plan.kind, plan.files, plan.prefixes, plan.row_groups, plan.manifests) == \
        ("listing", [], [str(shards)], [], [])

    images = good_images(5)
    table = pa.table({"key": [f"k{i}" for i in range(5)], "bytes": [images[n] for n in sorted(images)]})
    path = tmp_path / "bytes.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    plan = plan_input(str(path))
    assert plan.kind == "byte_manifest"
    assert plan.row_groups == [(str(path), 0), (str(path), 1), (str(path), 2)]
    assert (plan.files, plan.prefixes, plan.manifests, plan.manifest_rows) == ([], [], [str(path)], 5)


# ----------------------------------------------------------------------------- Ray runs


@pytest.mark.timeout(240)
def test_resume_anti_joins_3000_prior_rows_and_processes_only_new_images(ray_local, tmp_path, tiny_checkpoint):
    num_classes, sha, _ = _model(tiny_checkpoint)
    out = tmp_path / "out"
    layout = OutputLayout(uri=str(out))
    ghosts = [str(tmp_path / "gone" / f"cam{i % 7}" / f"img{i:05d}.jpg") for i in range(3000)]  # never read
    prior = fake_rows(ghosts, num_classes=num_classes, model_sha256=sha, run_id="20240102T000000Z-prior", seed=2)
    assert write_in_files(layout, prior, 64) == 47
    files_before = len(_segment_paths(out))
    assert files_before == 47
    new_paths = [str(p) for p in write_files(tmp_path / "new", good_images(5))]
    rng = np.random.default_rng(0)
    uris = ghosts + new_paths
    rng.shuffle(uris)
    (tmp_path / "m.parquet").write_bytes(manifest({"uri": uris}))

    assert segment(_config(tmp_path, tmp_path / "m.parquet", tiny_checkpoint, compact_rows=4096), **QUIET) == EXIT_OK
    run = _run_json(out)
    counts = run["counts"]
    assert (counts["inputs"], counts["new"], counts["skipped"], counts["ok"], counts["error"]) == (3005, 5, 3000, 5, 0)
    assert run["output_rows"] == {"rows": 3005, "ok": 3005, "error": 0, "pending_retry": 0}

    rows = _physical_rows(out)
    by_uri = collections.Counter(r["source_uri"] for r in rows)
    assert len(rows) == 3005 and set(by_uri) == set(ghosts) | set(new_paths) and max(by_uri.values()) == 1
    originals = {r["source_uri"]: r for r in prior}
    for row in rows:
        if row["source_uri"] in originals:
            want = originals[row["source_uri"]]
            assert {k: row[k] for k in want} == want, f"prior row of {row['source_uri']} was rewritten"
        else:
            assert row["run_id"] == run["run_id"] and row["status"] == "ok"
    assert sorted(r["source_uri"] for r in rows if r["run_id"] == run["run_id"]) == sorted(new_paths)
    assert len(list((out / "masks").glob("*.png"))) == 5
    files_after = _segment_paths(out)
    assert len(files_after) <= 3 < files_before
    assert run["output_files"]["segments"] == len(files_after)

    # A rerun with nothing new (the anti-join leaves no row, the group-by sees none) does nothing, cleanly.
    assert segment(_config(tmp_path, tmp_path / "m.parquet", tiny_checkpoint, compact_rows=4096), **QUIET) == EXIT_OK
    again = json.loads((out / "_run.json").read_text())
    assert (again["counts"]["new"], again["counts"]["skipped"], again["counts"]["inputs"]) == (0, 3005, 3005)
    assert again["output_rows"] == run["output_rows"] and len(_physical_rows(out)) == 3005


def _legacy_id(source_uri: str, relative: str) -> str:
    """The first release's id: head of the slug (100 chars) + 10 hex digits of SHA-1 of the URI."""
    readable = relative.strip("/")
    head, sep, last = readable.rpartition("/")
    readable = f"{head}{sep}{last.rsplit('.', 1)[0]}".replace("/", "__").replace("#", "__")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-")[:100] or "image"
    return f"{slug}-{hashlib.sha1(source_uri.encode()).hexdigest()[:10]}"


@pytest.mark.timeout(240)
def test_output_of_the_first_release_resumes_without_reprocessing(ray_local, tmp_path, tiny_checkpoint):
    num_classes, sha, _ = _model(tiny_checkpoint)
    images = good_images(5)
    names = sorted(images)
    write_files(tmp_path / "in" / "sub", {n: images[n] for n in names[:4]})
    old_uris = [str(tmp_path / "in" / "sub" / n) for n in names[:4]]
    old_ids = [_legacy_id(u, f"sub/{n}") for u, n in zip(old_uris, names[:4], strict=True)]
    assert all(re.fullmatch(r"sub__img\d{3}-[0-9a-f]{10}", i) for i in old_ids)
    old_rows = fake_rows(old_uris, num_classes=num_classes, model_sha256=sha, run_id="20230101T000000Z-old",
                         seed=3, ids=old_ids)
    segments = tmp_path / "out" / "segments"
    segments.mkdir(parents=True)
    for chunk in (old_rows[:2], old_rows[2:]):  # as the first release wrote them: part-<sha1 of ids>.parquet
        table = pa.Table.from_pylist(chunk, schema=SEGMENT_SCHEMA).drop_columns(["written_at"])
        digest = hashlib.sha1("\n".join(sorted(r["image_id"] for r in chunk)).encode()).hexdigest()[:20]
        pq.write_table(table, segments / f"part-{digest}.parquet", compression="zstd")
    assert not any(b"deeplab_batch.retried" in (pq.read_schema(p).metadata or {}) for p in segments.iterdir())

    (tmp_path / "in" / "sub" / names[4]).write_bytes(images[names[4]])  # one new image
    new_uri = str(tmp_path / "in" / "sub" / names[4])
    assert segment(_config(tmp_path, tmp_path / "in", tiny_checkpoint), **QUIET) == EXIT_OK
    run = _run_json(tmp_path / "out")
    assert (run["counts"]["new"], run["counts"]["skipped"], run["counts"]["inputs"]) == (1, 4, 5)
    assert run["output_rows"] == {"rows": 5, "ok": 5, "error": 0, "pending_retry": 0}
    rows = {r["source_uri"]: r for r in _physical_rows(tmp_path / "out")}
    assert len(_physical_rows(tmp_path / "out")) == 5 and set(rows) == set(old_uris) | {new_uri}
    for want in old_rows:
        got = rows[want["source_uri"]]
        assert (got["image_id"], got["run_id"], got["class_pixels"]) == \
            (want["image_id"], want["run_id"], want["class_pixels"])
    assert rows[new_uri]["run_id"] == run["run_id"]
    new_id = rows[new_uri]["image_id"]
    assert new_id.rpartition("-")[2] == hashlib.sha256(new_uri.encode()).hexdigest()[:16]
    assert sorted(p.name for p in (tmp_path / "out" / "masks").glob("*.png")) == [f"{new_id}.png"]


@pytest.mark.timeout(300)
def test_shard_folder_and_byte_manifest_are_each_processed_once(ray_local, tmp_path, tiny_checkpoint):
    shards = tmp_path / "in" / "shards"
    shards.mkdir(parents=True)
    members = {"a.tar": good_images(2), "b.tar": good_images(2, start=2)}
    for shard, files in members.items():
        (shards / shard).write_bytes(tar_shard(files))
    expected = {f"{shards / shard}#{name}" for shard, files in members.items() for name in files}
    config = _config(tmp_path, tmp_path / "in", tiny_checkpoint)
    assert segment(config, **QUIET) == EXIT_OK
    run = _run_json(tmp_path / "out")
    assert (run["counts"]["new"], run["counts"]["ok"], run["counts"]["duplicates"]) == (4, 4, 0)
    uris = [r["source_uri"] for r in _physical_rows(tmp_path / "out")]
    assert len(uris) == 4 and set(uris) == expected

    images = good_images(5, start=10)
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(5)], "bytes": [images[n] for n in sorted(images)]}),
                   path, row_group_size=2)
    (tmp_path / "out").rename(tmp_path / "out-shards")
    assert segment(_config(tmp_path, path, tiny_checkpoint), **QUIET) == EXIT_OK
    run = _run_json(tmp_path / "out")
    assert (run["counts"]["new"], run["counts"]["ok"], run["counts"]["inputs"]) == (5, 5, 5)
    uris = [r["source_uri"] for r in _physical_rows(tmp_path / "out")]
    assert sorted(uris) == sorted(f"{path}#k{i}" for i in range(5))


@pytest.mark.timeout(300)
def test_statistics_merged_across_runs_equal_a_recomputation_from_the_rows(ray_local, tmp_path, tiny_checkpoint):
    num_classes, _, class_names = _model(tiny_checkpoint)
    images = good_images(7)
    names = sorted(images)
    inp = tmp_path / "in"
    out = tmp_path / "out"
    batches = [names[:3], names[3:5] + ["broken.jpg"], names[5:]]
    for i, batch in enumerate(batches):
        write_files(inp, {n: images.get(n, b"") for n in batch})
        assert segment(_config(tmp_path, inp, tiny_checkpoint, rows_per_file=1), **QUIET) == EXIT_OK
        assert _run_json(out)["counts"]["new"] == len(batch), f"run {i + 1}"

    table = pa.concat_tables([pq.read_table(p, columns=["image_id", "source_uri", "status", "width", "height",
                                                           "class_pixels"]) for p in _segment_paths(out)])
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 8
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    assert ok.num_rows == 7
    pixels = np.array(ok.column("class_pixels").to_pylist(), dtype=np.int64)
    assert pixels.shape == (7, num_classes)
    area = np.array(ok.column("width").to_pylist(), dtype=np.float64) * np.array(ok.column("height").to_pylist())
    np.testing.assert_array_equal(pixels.sum(axis=1), area)  # every pixel has one class
    stats = pq.read_table(out / "class_stats.parquet").to_pydict()
    assert stats["class_name"] == class_names
    np.testing.assert_array_equal(stats["pixels"], pixels.sum(axis=0))
    np.testing.assert_array_equal(stats["images_present"], (pixels > 0).sum(axis=0))
    np.testing.assert_allclose(stats["mean_fraction"], (pixels / area[:, None]).mean(axis=0), rtol=1e-12)
    assert _run_json(out)["output_rows"] == {"rows": 8, "ok": 7, "error": 1, "pending_retry": 0}
