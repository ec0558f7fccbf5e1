"""Corpus scale: an incremental run of a few new images over outputs of N prior rows, at several N in one run.

For each N it writes simulated prior outputs, a URI manifest naming the N prior
images plus ``--new`` real ones, and times ``deeplab-batch segment --no-crf`` on it
in a subprocess, sampling the peak RSS of the driver and of every Ray process the
run starts (found by the ``RAY_TMPDIR`` they inherit). Two runs per N:

* ``first``: the prior rows lie as a run commits them (``--rows-per-file`` rows per
  file, no index): the run summarises and compacts them once, then does its work;
* ``steady``: the next nightly run (``--new`` more images) over the compacted output.

With ``--layout compacted`` the prior rows are written already compacted (as the
job leaves them), and only the steady run is timed (use it for 10M rows). With
``--training FORMAT`` the output also holds the training data of its prior rows (merged
shards of :data:`SHARD_IMAGES` images each, written sparse: their size, not their bytes,
is what a run's listing and merge planning see) and the runs write shards too.
Prints one line per run and the growth ratios between the first two sizes.

    python bench/scale.py [--rows 100000 1000000] [--new 20] [--layout committed|compacted]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procmem import kind_of, marked_processes, rss_mb
from pipeline.outputs import SEGMENT_SCHEMA, SEGMENTS_DIR, utc_now
from pipeline.weights import DEMO_CHECKPOINT, read_record

PREFIX = "s3://corpus-bucket/photos/2026/camera-{cam:02d}/roll-{roll:04d}/IMG_{i:09d}.jpg"
#: Images per merged training shard of the simulated prior output (~256 MB of PASCAL-sized samples).
SHARD_IMAGES = 1500
SHARD_BYTES = 256 * 1024**2


def write_prior_training(out: Path, rows: int, *, fmt: str, record) -> int:
    """``training/`` as segment --training leaves it after ``rows`` images: settings, id2label, merged shards."""
    from pipeline.training.rules import SHARD_SUFFIX, id2label

    training = out / "training"
    training.mkdir(parents=True, exist_ok=True)
    (training / "_training.json").write_text(json.dumps({"format": fmt, "ignore_below": 0.0, "run_id": "prior"}))
    (training / "id2label.json").write_text(json.dumps(id2label(record.class_names)))
    shards = max(1, rows // SHARD_IMAGES)
    for i in range(shards):
        with open(training / f"compact-{i:020d}{SHARD_SUFFIX[fmt]}", "wb") as f:
            f.truncate(SHARD_BYTES)  # sparse
    return shards


def prior_table(start: int, stop: int, *, record, run_id: str) -> pa.Table:
    """Segments rows for images ``start..stop`` (all ``ok``), as the job writes them."""
    n = stop - start
    idx = np.arange(start, stop)
    uris = [PREFIX.format(cam=i % 37, roll=(i // 1000) % 10000, i=i) for i in idx]
    c = record.num_classes
    rng = np.random.default_rng(start)
    pixels = rng.integers(0, 5000, size=(n, c), dtype=np.int64)
    width = np.full(n, 500, dtype=np.int32)
    height = (pixels.sum(axis=1) // 500 + 1).astype(np.int32)
    pixels[:, 0] += height.astype(np.int64) * 500 - pixels.sum(axis=1)
    offsets = np.arange(0, (n + 1) * c, c, dtype=np.int32)
    columns = {
        "image_id": pa.array([f"IMG_{i:09d}-{hashlib.sha256(u.encode()).hexdigest()[:16]}" for i, u in zip(idx, uris)]),
        "source_uri": pa.array(uris),
        "status": pa.array(["ok"] * n),
        "width": pa.array(width),
        "height": pa.array(height),
        "class_pixels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(pixels.ravel())),
        "model_sha256": pa.array([record.sha256] * n),
        "run_id": pa.array([run_id] * n),
        "written_at": pa.array([utc_now()] * n, type=pa.timestamp("us", tz="UTC")),
    }
    for field in SEGMENT_SCHEMA:
        if field.name not in columns:
            columns[field.name] = pa.nulls(n, type=field.type)
    return pa.table(columns).select(SEGMENT_SCHEMA.names).cast(SEGMENT_SCHEMA)


def write_prior(out: Path, rows: int, *, per_file: int, record, layout: str) -> int:
    """Write ``rows`` prior rows under ``out/segments``; returns the number of files."""
    from pipeline.outputs.layout import REPLACES_METADATA_KEY, RETRIED_METADATA_KEY

    seg = out / SEGMENTS_DIR
    seg.mkdir(parents=True, exist_ok=True)
    files = 0
    chunk = 4096 if layout == "compacted" else per_file
    run_id = "20261101T000000Z-bench000"
    for start in range(0, rows, 65536):
        table = prior_table(start, min(rows, start + 65536), record=record, run_id=run_id)
        for offset in range(0, table.num_rows, chunk):
            part = table.slice(offset, chunk)
            digest = hashlib.sha1(f"{start + offset}".encode()).hexdigest()[:20]
            if layout == "compacted":
                name = f"compact-{digest}.parquet"
                meta = {RETRIED_METADATA_KEY: b"0", REPLACES_METADATA_KEY: b"[]"}
                pq.write_table(part.replace_schema_metadata(meta), seg / name, compression="zstd",
                               row_group_size=1024)
            else:
                name = f"part-{run_id}-{digest}.parquet"
                pq.write_table(part.replace_schema_metadata({RETRIED_METADATA_KEY: b"0"}), seg / name,
                               compression="zstd")
            files += 1
    return files


def write_new_images(folder: Path, count: int, *, start: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + count):
        path = folder / f"new_{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def write_manifest(folder: Path, rows: int, extra: list[str], *, per_file: int) -> None:
    """A manifest as a folder of Parquet files of ``per_file`` URIs (row groups of 65,536), new images last."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for part, start in enumerate(range(0, rows, per_file)):
        stop = min(rows, start + per_file)
        uris = [PREFIX.format(cam=i % 37, roll=(i // 1000) % 10000, i=i) for i in range(start, stop)]
        pq.write_table(pa.table({"uri": uris}), folder / f"part-{part:05d}.parquet", row_group_size=65536)
    pq.write_table(pa.table({"uri": extra}), folder / "part-new.parquet")


def timed_run(config: Path, *, env: dict, marker: bytes) -> dict:
    """Run the segment job; sample every process's RSS; returns wall time and peaks per process kind."""
    peaks: dict[int, tuple[str, float, str]] = {}
    private: dict[int, tuple[str, float, str]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.segment", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = marked_processes(marker)
            pids.setdefault(proc.pid, "driver")
            for pid, cmd in pids.items():
                kind = "driver" if pid == proc.pid else kind_of(cmd)
                rss, anon = rss_mb(pid)
                if rss > peaks.get(pid, ("", 0.0, ""))[1]:
                    peaks[pid] = (kind, rss, cmd.removeprefix("ray::")[:48])
                if anon > private.get(pid, ("", 0.0, ""))[1]:
                    private[pid] = (kind, anon, cmd.removeprefix("ray::")[:48])
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    for pid in marked_processes(marker):  # the job's local Ray, if it outlived the driver
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        raise SystemExit(f"segment failed ({proc.returncode}):\n{stderr[-3000:]}")
    by_kind: dict[str, float] = {}
    for kind, rss, _ in peaks.values():
        by_kind[kind] = max(by_kind.get(kind, 0.0), rss)
    top = sorted(peaks.values(), key=lambda item: -item[1])[:3]
    top_private = sorted(private.values(), key=lambda item: -item[1])[:3]
    return {"wall_s": wall, "peak_rss_mb": by_kind, "max_rss_mb": max(by_kind.values()),
            "max_private_mb": max(v[1] for v in private.values()),
            "top": [f"{name} {rss:.0f} MB" for _, rss, name in top],
            "top_private": [f"{name} {rss:.0f} MB" for _, rss, name in top_private]}


def files_under(out: Path) -> int:
    return sum(1 for p in (out / SEGMENTS_DIR).iterdir() if p.suffix == ".parquet")


def bench(rows: int, *, new: int, per_file: int, layout: str, root: Path, manifest_rows: int,
          training: str = "") -> list[dict]:
    record = read_record(DEMO_CHECKPOINT)
    work = root / f"n{rows}"
    shutil.rmtree(work, ignore_errors=True)
    out = work / "out"
    t0 = time.perf_counter()
    files = write_prior(out, rows, per_file=per_file, record=record, layout=layout)
    if training:
        files += write_prior_training(out, rows, fmt=training, record=record)
    images = write_new_images(work / "images", 2 * new, start=0)
    results = []
    runs = [("first", images[:new])] if layout == "committed" else []
    runs.append(("steady", images[: 2 * new] if layout == "committed" else images[:new]))
    print(f"# N={rows:,}: wrote {files:,} prior files ({layout}) in {time.perf_counter() - t0:.0f} s", flush=True)
    for label, extra in runs:
        manifest = work / "manifest"
        write_manifest(manifest, rows, extra, per_file=manifest_rows)
        config = work / "job.json"
        config.write_text(json.dumps({
            "input": {"uri": str(manifest), "format": "manifest"},
            "output": {"uri": str(out), **({"training": {"format": training}} if training else {})},
            "crf": {"enabled": False},
            "ray": {"address": "local", "progress": False, "no_progress_timeout_s": 600},
        }))
        ray_tmp = tempfile.mkdtemp(prefix="bs-", dir="/tmp")
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        before = files_under(out)
        result = timed_run(config, env=env, marker=f"RAY_TMPDIR={ray_tmp}".encode())
        summary = json.loads((out / "_run.json").read_text())
        if training and summary["training"]["format"] != training:
            raise SystemExit(f"unexpected training summary: {summary['training']}")
        result.update(rows=rows, run=label, files_before=before, files_after=files_under(out),
                      new=summary["counts"]["new"], skipped=summary["counts"]["skipped"],
                      output_rows=summary["output_rows"]["rows"])
        if result["new"] != new or result["output_rows"] != rows + len(extra):
            raise SystemExit(f"unexpected counts: {summary['counts']} {summary['output_rows']}")
        shutil.rmtree(ray_tmp, ignore_errors=True)
        results.append(result)
        kinds = "  ".join(f"{k} {v:,.0f}" for k, v in sorted(result["peak_rss_mb"].items()))
        print(f"N={rows:>11,} {label:<6} wall {result['wall_s']:6.1f} s  max RSS {result['max_rss_mb']:6.0f} MB  "
              f"files {before:,} -> {result['files_after']:,} ({result['output_rows'] / result['files_after']:,.0f} "
              f"rows/file)  new {result['new']} skipped {result['skipped']:,}  [{kinds}]", flush=True)
        print(f"    largest RSS: {'; '.join(result['top'])}", flush=True)
        print(f"    largest private (RssAnon): {'; '.join(result['top_private'])}; phases {summary.get('phases_s')}",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--new", type=int, default=20)
    parser.add_argument("--rows-per-file", type=int, default=64, help="rows per file of the committed layout")
    parser.add_argument("--layout", choices=("committed", "compacted"), default="committed")
    parser.add_argument("--manifest-rows", type=int, default=1_000_000, help="URIs per manifest file")
    parser.add_argument("--root", default=tempfile.gettempdir())
    parser.add_argument("--training", choices=("webdataset", "hf-parquet"), default="",
                        help="the output keeps training data, and the runs write shards (segment --training)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    results = []
    for rows in args.rows:
        results += bench(rows, new=args.new, per_file=args.rows_per_file, layout=args.layout,
                         root=Path(args.root) / "deeplab-bench-scale", manifest_rows=args.manifest_rows,
                         training=args.training)
    sizes = sorted({r["rows"] for r in results})
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[1]
        for label in ("first", "steady"):
            a = next((r for r in results if r["rows"] == small and r["run"] == label), None)
            b = next((r for r in results if r["rows"] == large and r["run"] == label), None)
            if a and b:
                print(f"growth {small:,} -> {large:,} ({label}): wall x{b['wall_s'] / a['wall_s']:.2f}, "
                      f"max RSS x{b['max_rss_mb'] / a['max_rss_mb']:.2f}, "
                      f"max private x{b['max_private_mb'] / a['max_private_mb']:.2f}, per kind "
                      + ", ".join(f"{k} x{b['peak_rss_mb'][k] / a['peak_rss_mb'][k]:.2f}"
                                  for k in sorted(a['peak_rss_mb']) if k in b['peak_rss_mb']))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
