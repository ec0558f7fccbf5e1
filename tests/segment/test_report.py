"""The run report (issue #14): `<output>/report.html` after `segment`, `deeplab-batch report OUTPUT`.

Outputs are built here with the layout's writers from rows designed by the test; every
expected value (confidences, orderings, class shares, totals) is computed here from those
rows with numpy, never with the report's own functions. The browser checks follow the
evaluation report's convention (tests/evaluation/test_evaluate_job.py): headless Chromium
loads a *copy* of the page with a probe script added (the report itself has no script);
without a chromium binary they skip.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.constants import voc_palette
from pipeline.outputs import SEGMENT_SCHEMA, OutputLayout, metadata_for, write_run_json
from pipeline.outputs.index import (
    OutputState,
    summarize_table,
    write_class_stats,
    write_index,
)
from pipeline.outputs.report import write_report
from pipeline.segment import prepare_output

NAMES = ["background", "red", "green", "blue", "other"]
PALETTE = [list(c) for c in voc_palette(len(NAMES))]
MODEL = {"variant": "largefov", "num_classes": len(NAMES), "class_names": NAMES, "palette": PALETTE,
         "input_size": 65, "source": "tests/segment/test_report.py", "sha256": "c" * 64}
SHA = "c" * 64
WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
SECRET = "s3cr3t-VALUE-never-shown"
CRF = {"backend": "pydensecrf", "w1": 4.0, "sigma_alpha": 121.0, "sigma_beta": 5.0, "w2": 3.0, "sigma_gamma": 3.0,
       "iterations": 10, "normalization": "after", "resolution": "network"}


# ----------------------------------------------------------------------------- building outputs


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _picture(labels: np.ndarray) -> np.ndarray:
    """An RGB picture whose colours follow ``labels`` (plus noise)."""
    rng = np.random.default_rng(int(labels.sum()) % 1000)
    colours = np.array([[120, 120, 120], [220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]], np.int16)
    image = colours[labels] + rng.integers(-20, 20, (*labels.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _ok_row(layout, src: Path, name: str, labels: np.ndarray, conf: list[float], *, write_source=True,
            write_mask=True) -> dict:
    """An ok row whose class_pixels are counted from ``labels``; its source image and mask written unless told not."""
    height, width = labels.shape
    uri = str(src / f"{name}.jpg")
    if write_source:
        (src / f"{name}.jpg").write_bytes(_jpeg(_picture(labels)))
    image_id = f"{name}-{hashlib.sha1(name.encode()).hexdigest()[:16]}"
    mask_uri = layout.write_mask(image_id, labels.astype(np.uint8), palette=PALETTE) if write_mask \
        else layout.mask_uri(image_id)
    pixels = np.bincount(labels.ravel(), minlength=len(NAMES)).tolist()
    confidence = [c if p else float("nan") for c, p in zip(conf, pixels, strict=True)]
    return {"image_id": image_id, "source_uri": uri, "status": "ok", "width": width, "height": height,
            "mask_uri": mask_uri, "class_pixels": pixels, "class_mean_confidence": confidence,
            "model_sha256": SHA, "crf": CRF, "run_id": "run-1", "written_at": WHEN,
            "timings": {"read_s": 0.001, "decode_s": 0.01, "network_s": 0.2, "crf_s": 0.4, "write_s": 0.02}}


def _error_row(uri: str, reason: str, kind: str) -> dict:
    return {"image_id": f"err-{hashlib.sha1(uri.encode()).hexdigest()[:16]}", "source_uri": uri, "status": "error",
            "error": reason, "error_kind": kind, "model_sha256": SHA, "run_id": "run-1", "written_at": WHEN}


def _finish(layout: OutputLayout, rows: list[dict], *, per_file: int, run_counts: dict) -> None:
    metadata = metadata_for(config={"s3": {"secret_access_key": "***"}}, model=MODEL)
    for start in range(0, len(rows), per_file):
        layout.write_segments(rows[start:start + per_file], metadata=metadata)
    state = prepare_output(layout, target_rows=0)  # the index, as a run leaves it
    write_class_stats(layout, state.live_summaries(), class_names=NAMES, metadata=metadata)
    # A _run.json as an older/foreign writer might leave it, with an unredacted secret: never shown.
    write_run_json(layout, {
        "run_id": "run-1", "started_at": "2026-01-02T03:00:00+00:00", "finished_at": "2026-01-02T03:04:05+00:00",
        "duration_s": 245.0, "phases_s": {"prepare_s": 1.0, "pipeline_s": 240.0, "commit_s": 4.0},
        "input": "s3://bucket/images/", "output": layout.uri, "counts": run_counts,
        "throughput_images_per_s": 0.1,
        "model": {"sha256": SHA, "variant": "largefov", "num_classes": len(NAMES), "source": "tests"},
        "config": {"s3": {"region": "eu-west-3", "access_key_id": "AKIAEXAMPLE", "secret_access_key": SECRET},
                   "crf": {"enabled": True, "backend": "pydensecrf"}, "resolved": {"crf_params": CRF}}})


def _labels(fill: int, *, rect: tuple[int, int] | None = None, shape=(48, 64)) -> np.ndarray:
    labels = np.full(shape, fill, np.uint8)
    if rect:
        cls, size = rect
        labels[8:8 + size, 10:10 + size] = cls
    return labels


@pytest.fixture(scope="module")
def small_output(tmp_path_factory) -> dict:
    """Ok rows of designed confidence and classes, one without source or mask, and error rows."""
    root = tmp_path_factory.mktemp("report")
    src = root / "src"
    src.mkdir()
    layout = OutputLayout(uri=str(root / "out"))
    half = _labels(0)
    half[:, 48:] = 1  # 3/4 background
    rows = [_ok_row(layout, src, f"calm{i}", _labels(0, rect=(1 + i % 2, 20)), [0.95] * 5) for i in range(6)]
    doubt = _ok_row(layout, src, "doubt", _labels(0, rect=(4, 24)), [0.30] * 5)
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))  # a confidence map kept by the run
    doubt.update(confidence_uri=layout.write_confidence(doubt["image_id"], gradient), mean_entropy=1.25,
                 crf_agreement=0.75)
    rows += [
        doubt,
        # 3/4 background at 0.95, 1/4 red at 0.05: 0.725 weighted by pixels (an unweighted mean would say 0.5)
        _ok_row(layout, src, "mixed", half, [0.95, 0.05, 0.5, 0.5, 0.5]),
        _ok_row(layout, src, "allblue", _labels(3), [0.6] * 5),
        _ok_row(layout, src, "someblue", _labels(0, rect=(3, 16)), [0.85] * 5),
        _ok_row(layout, src, "ghost", _labels(0, rect=(2, 20)), [0.9] * 5, write_source=False, write_mask=False),
    ]
    errors = [
        _error_row("/data/in/a1.jpg", "cannot read /data/in/a1.jpg: [Errno 2] No such file or directory: "
                   "'/data/in/a1.jpg'", "storage"),
        _error_row("/data/in/sub/b22.png", "cannot read /data/in/sub/b22.png: [Errno 2] No such file or directory: "
                   "'/data/in/sub/b22.png'", "storage"),
        _error_row("/data/in/bomb.png", "image too large: 100000x100000 = 10000000000 pixels > decode.max_pixels "
                   "178956970", "data"),
        _error_row("/data/in/huge.tif", "image too large: 30000x20000 = 600000000 pixels > decode.max_pixels "
                   "178956970", "data"),
        _error_row("/data/in/zero.jpg", "empty file (0 bytes)", "data"),
    ]
    all_rows = rows + errors
    order = np.random.default_rng(3).permutation(len(all_rows))  # errors spread over the files
    _finish(layout, [all_rows[i] for i in order], per_file=4,
            run_counts={"inputs": 16, "new": 16, "ok": 11, "error": 5, "error_storage": 2, "retried": 0,
                        "skipped": 0, "duplicates": 0, "unread": 0})
    page = Path(write_report(layout))
    return {"root": root, "layout": layout, "rows": rows, "errors": errors, "page": page,
            "html": page.read_text(encoding="utf-8")}


def _sections(page: str) -> dict[str, list[str]]:
    """``{gallery section id: [image ids shown, in order]}`` read from the page's markup."""
    out = {}
    for chunk in page.split('<h3 id="g-')[1:]:
        key = chunk.split('"', 1)[0]
        body = chunk.split("</h3>", 1)[1].split("<h3", 1)[0].split("<h2", 1)[0]
        out[key] = re.findall(r'<div class="id" title="[^"]*">([^<]+)</div>', body)
    return out


def _weighted_confidence(row: dict) -> float:
    pixels = np.asarray(row["class_pixels"], float)
    conf = np.nan_to_num(np.asarray(row["class_mean_confidence"], float))
    return float((pixels * conf).sum() / pixels.sum())


def _item_html(page: str, image_id: str) -> str:
    """The markup of the first gallery item showing ``image_id``."""
    start = page.index(f">{image_id}</div>")
    begin = page.rindex('<div class="item', 0, start)
    end = page.find('<div class="item', start)
    return page[begin:end if end >= 0 else len(page)]


# ----------------------------------------------------------------------------- content


def test_report_is_self_contained_and_has_no_secret(small_output):
    page = small_output["html"]
    assert small_output["page"] == small_output["root"] / "out" / "report.html"
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page) is None  # no external resource of any kind
    assert "@import" not in page and "url(" not in page
    assert SECRET not in page and "AKIAEXAMPLE" not in page
    assert "eu-west-3" in page  # the configuration is shown, its secrets as ***
    assert page.count("data:image/jpeg;base64,") >= 2 * 10  # image + overlay of the 10 readable ok rows, at least


def test_least_confident_is_ordered_by_the_pixel_weighted_confidence(small_output):
    rows = small_output["rows"]
    conf = {r["image_id"]: _weighted_confidence(r) for r in rows}
    expected = sorted(conf, key=conf.get)
    shown = _sections(small_output["html"])["least-confident"]
    assert len(shown) == 8  # of 11 ok rows
    assert [round(conf[i], 3) for i in expected[:5]] == [0.3, 0.6, 0.725, 0.85, 0.9]  # then ties at 0.95
    assert shown[:5] == expected[:5]
    assert "0.300" in _item_html(small_output["html"], expected[0])
    assert "0.725" in _item_html(small_output["html"], expected[2])


def test_richest_per_class_and_random_sample(small_output):
    rows = small_output["rows"]
    sections = _sections(small_output["html"])
    by_name = {r["image_id"].split("-")[0]: r["image_id"] for r in rows}
    blue = [r["image_id"] for r in sorted(rows, key=lambda r: -r["class_pixels"][3] / (r["width"] * r["height"]))
            if r["class_pixels"][3]]
    assert sections["class-3"] == blue == [by_name["allblue"], by_name["someblue"]]
    other = [r["image_id"] for r in rows if r["class_pixels"][4]]
    assert sections["class-4"] == other == [by_name["doubt"]]
    assert "Richest in “blue”" in small_output["html"]
    ok_ids = {r["image_id"] for r in rows}
    assert len(sections["random"]) == 8 and set(sections["random"]) <= ok_ids
    assert not set(sections["random"]) & {e["image_id"] for e in small_output["errors"]}


def test_confidence_map_and_quality_scores_where_the_row_has_them(small_output):
    doubt = next(r for r in small_output["rows"] if r["image_id"].startswith("doubt"))
    item = _item_html(small_output["html"], doubt["image_id"])
    assert item.count("<img") == 3 and f'alt="{doubt["image_id"]} confidence map"' in item
    assert "entropy 1.25" in item and "CRF agreement 0.75" in item
    calm = next(r["image_id"] for r in small_output["rows"] if r["image_id"].startswith("calm"))
    assert _item_html(small_output["html"], calm).count("<img") == 2  # no map kept: no third panel


def test_missing_source_shows_a_placeholder(small_output):
    ghost = next(r["image_id"] for r in small_output["rows"] if r["image_id"].startswith("ghost"))
    item = _item_html(small_output["html"], ghost)
    assert "<img" not in item and item.count('class="ph"') == 2 and "FileNotFoundError" in item
    done = next(r["image_id"] for r in small_output["rows"] if r["image_id"].startswith("mixed"))
    assert _item_html(small_output["html"], done).count("<img") == 2


def test_class_charts_show_the_merged_class_statistics(small_output):
    rows = small_output["rows"]
    pixels = np.sum([r["class_pixels"] for r in rows], axis=0)
    images = np.sum([np.asarray(r["class_pixels"]) > 0 for r in rows], axis=0)
    page = small_output["html"]
    classes = page.split('<h2 id="classes">', 1)[1].split("<h2", 1)[0]
    for c, name in enumerate(NAMES):
        assert f">{100 * pixels[c] / pixels.sum():.2f} %</text>" in classes, name
        assert f">{images[c]:,} ({100 * images[c] / len(rows):.0f} %)</text>" in classes, name
        assert f">{name}</text>" in classes


def test_errors_grouped_by_normalised_reason_with_exact_totals(small_output):
    page = small_output["html"]
    errors = page.split('<h2 id="errors">', 1)[1].split("<h2", 1)[0]
    table_rows = errors.split("<tr>")[2:]  # after the header row

    def row_of(fragment: str) -> str:
        (row,) = [r for r in table_rows if fragment in r]
        return row

    missing = row_of("a1.jpg")
    assert "b22.png" in missing and ">2</td>" in missing and ">storage</td>" in missing
    large = row_of("bomb.png")
    assert "huge.tif" in large and ">2</td>" in large and ">data</td>" in large
    empty = row_of("zero.jpg")
    assert ">1</td>" in empty
    assert len(table_rows) == 3
    # exact totals: _run.json's counts and the summaries (3 data rows final, 2 storage rows waiting)
    assert "last run: 5 error rows (2 storage/transient" in errors
    assert "whole output: 3 data errors (final), 2 waiting for a retry" in errors


def test_model_record_and_crf_parameters(small_output):
    model = small_output["html"].split('<h2 id="model">', 1)[1]
    assert "tests/segment/test_report.py" in model and SHA in model  # the footer's record, the rows' digest
    assert ">121.0</td>" in model and ">pydensecrf</td>" in model and ">network</td>" in model
    assert ">11</td>" in model  # 11 ok rows carry these CRF parameters


def test_cli_rebuilds_the_report_and_refuses_what_is_not_an_output(small_output, tmp_path, capsys):
    from jobs.cli import main

    target = tmp_path / "copy.html"
    assert main(["report", str(small_output["root"] / "out"), "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {target}"
    # same seed, same sample: the same gallery
    assert _sections(target.read_text(encoding="utf-8")) == _sections(small_output["html"])
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not a segment output" in capsys.readouterr().err


def test_damaged_files_do_not_stop_the_report(small_output, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(small_output["root"] / "out", out)
    victim = min((out / "segments").glob("*.parquet"))
    victim.write_bytes(b"PAR1 this is not parquet")
    (out / "class_stats.parquet").write_bytes(b"garbage")
    (out / "_run.json").write_text("{ not json")
    page = Path(write_report(OutputLayout(uri=str(out)))).read_text(encoding="utf-8")
    assert victim.name in page and "Not readable now" in page  # the sample says which file it could not read
    assert "No <code>_run.json</code>" in page and "<img" in page
    assert 'id="g-least-confident"' in page


@pytest.mark.s3
def test_report_of_an_s3_output(small_output, s3_bucket, s3_server):
    import s3fs

    from pipeline.io.uris import S3Settings

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    out = small_output["root"] / "out"
    for path in out.rglob("*"):
        if path.is_file() and path.name != "report.html":
            fs.pipe_file(f"{s3_bucket}/run/{path.relative_to(out)}", path.read_bytes())
    layout = OutputLayout(uri=f"s3://{s3_bucket}/run", s3=S3Settings(endpoint_url=s3_server["endpoint_url"]))
    uri = write_report(layout)
    assert uri == f"s3://{s3_bucket}/run/report.html"
    page = fs.cat_file(f"{s3_bucket}/run/report.html").decode("utf-8")
    # masks are found where the output is now (s3), sources where the rows say: the same page
    assert _sections(page) == _sections(small_output["html"])
    assert page.count("<img") == small_output["html"].count("<img")


# ----------------------------------------------------------------------------- bounded reads on a 1M-row output

BIG_FILES, BIG_ROWS_PER_FILE, BIG_ROW_GROUP = 250, 4096, 1024  # 1,024,000 rows: a compacted 1M-row output
BIG_SOURCES = 32


def _big_output(root: Path) -> tuple[OutputLayout, int, int]:
    """``(layout, rows, error rows)``: 250 compacted-size segments files with their index and class_stats."""
    layout = OutputLayout(uri=str(root / "out"))
    src, masks = root / "src", root / "masks"
    src.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(BIG_SOURCES):  # photos of 1200 x 900: thumbnailed before they are embedded
        labels = np.zeros((900, 1200), np.uint8)
        labels[100 + i * 10:600, 200:900 - i * 5] = 1 + i % 4
        (src / f"p{i}.jpg").write_bytes(_jpeg(_picture(labels)))
        image = Image.fromarray(labels, mode="L")
        image.putpalette([v for c in voc_palette(256) for v in c])
        image.save(masks / f"p{i}.png")
    n = BIG_ROWS_PER_FILE
    status = np.where(np.arange(n) % 100 == 7, "error", "ok")
    is_ok = status == "ok"
    pixels = rng.integers(0, 200_000, (n, len(NAMES)))
    pixels[:, 0] += 100_000
    conf = rng.uniform(0.3, 1.0, (n, len(NAMES))).astype(np.float32)
    offsets = pa.array(np.arange(n + 1) * len(NAMES), pa.int32())
    mask = pa.array(~is_ok)
    pixel_lists = pa.ListArray.from_arrays(offsets, pa.array(pixels.ravel(), pa.int64()), mask=mask)
    conf_lists = pa.ListArray.from_arrays(offsets, pa.array(conf.ravel(), pa.float32()), mask=mask)
    which = np.arange(n) % BIG_SOURCES
    base = {
        "status": pa.array(status), "error": pa.array([None if o else f"cannot decode: broken at byte {i}"
                                                        for i, o in enumerate(is_ok)], pa.string()),
        "error_kind": pa.array([None if o else "data" for o in is_ok], pa.string()),
        "width": pa.array(np.full(n, 1200), pa.int32(), mask=~is_ok),
        "height": pa.array(np.full(n, 900), pa.int32(), mask=~is_ok),
        "mask_uri": pa.array([str(masks / f"p{w}.png") if o else None for w, o in zip(which, is_ok)], pa.string()),
        "class_pixels": pixel_lists, "class_mean_confidence": conf_lists,
        "model_sha256": pa.array([SHA] * n), "crf": pa.array([CRF] * n, SEGMENT_SCHEMA.field("crf").type),
        "timings": pa.array([{"read_s": 0.01, "decode_s": 0.02, "network_s": 0.3, "crf_s": 0.5, "write_s": 0.03}] * n,
                            SEGMENT_SCHEMA.field("timings").type),
        "nodes": pa.nulls(n, SEGMENT_SCHEMA.field("nodes").type), "run_id": pa.array(["run-big"] * n),
        "written_at": pa.array([WHEN] * n, pa.timestamp("us", tz="UTC")),
    }
    sources = [str(src / f"p{w}.jpg") for w in which]
    metadata = metadata_for(config={}, model=MODEL)
    summary = None
    summaries = []
    for f in range(BIG_FILES):
        ids = [f"f{f:03d}r{r:04d}-{f:08x}{r:08x}" for r in range(n)]
        columns = {"image_id": pa.array(ids), "source_uri": pa.array(sources), **base}
        table = pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in SEGMENT_SCHEMA], schema=SEGMENT_SCHEMA)
        table = table.replace_schema_metadata(metadata)
        name = f"compact-{f:020x}.parquet"
        path = root / "out" / "segments" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=BIG_ROW_GROUP, compression="zstd")
        if summary is None:
            summary = summarize_table(table, file=name, size=0)
        summaries.append({**summary, "file": name, "bytes": path.stat().st_size})
    write_index(layout, OutputState(), summaries)
    write_class_stats(layout, summaries, class_names=NAMES, metadata=metadata)
    errors = int((~is_ok).sum()) * BIG_FILES
    write_run_json(layout, {"run_id": "run-big", "counts": {"new": 0, "ok": 0, "error": 0, "skipped": BIG_FILES * n},
                            "model": {"sha256": SHA}, "config": {}})
    return layout, BIG_FILES * n, errors


def test_report_of_a_1m_row_output_reads_a_bounded_sample(tmp_path, monkeypatch):
    from fsspec.implementations import local

    layout, rows, errors = _big_output(tmp_path)
    segments = tmp_path / "out" / "segments"
    sizes = {str(p): p.stat().st_size for p in segments.glob("*.parquet")}
    assert len(sizes) == BIG_FILES

    opened: list[str] = []
    read_bytes: dict[str, int] = {}
    real_open, real_read = local.LocalFileSystem._open, local.LocalFileOpener.read

    def counting_open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode:
            opened.append(str(self._strip_protocol(path)))
        return real_open(self, path, mode, *args, **kwargs)

    def counting_read(self, *args, **kwargs):
        data = real_read(self, *args, **kwargs)
        read_bytes[self.path] = read_bytes.get(self.path, 0) + len(data)
        return data

    def counting_readinto(self, buffer):
        got = self.f.readinto(buffer)
        read_bytes[self.path] = read_bytes.get(self.path, 0) + (got or 0)
        return got

    monkeypatch.setattr(local.LocalFileSystem, "_open", counting_open)
    monkeypatch.setattr(local.LocalFileOpener, "read", counting_read)
    monkeypatch.setattr(local.LocalFileOpener, "readinto", counting_readinto, raising=False)
    started = time.perf_counter()
    page_path = Path(write_report(layout))
    elapsed = time.perf_counter() - started
    monkeypatch.undo()

    seg_opened = {p for p in opened if p in sizes}
    assert 1 <= len(seg_opened) <= 16, len(seg_opened)  # a bounded number of the 250 files
    seg_read = sum(read_bytes.get(p, 0) for p in sizes)
    assert seg_read > 0
    assert seg_read <= 0.05 * sum(sizes.values()), (seg_read, sum(sizes.values()))
    for path in seg_opened:  # at most one 1,024-row group of each of its 4 (plus the footer)
        assert read_bytes.get(path, 0) <= 0.5 * sizes[path], (path, read_bytes.get(path), sizes[path])
    sources = [p for p in opened if p.startswith(str(tmp_path / "src"))]
    masks = [p for p in opened if p.startswith(str(tmp_path / "masks"))]
    assert 1 <= len(sources) <= 64 and 1 <= len(masks) <= 64, (len(sources), len(masks))

    page = page_path.read_text(encoding="utf-8")
    assert page_path.stat().st_size < 3 * 1024**2, page_path.stat().st_size
    assert elapsed < 60, elapsed
    assert f"{rows:,} rows, one per image ({rows - errors:,} ok, {errors:,} data errors (final)" in page
    shown = [i for ids in _sections(page).values() for i in ids]
    assert 8 <= len(shown) <= 64
    assert "<img" in page and "cannot decode: broken at byte #" in page  # grouped: one pattern for 40,960 rows


# ----------------------------------------------------------------------------- in a real browser

PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "report-probe";
  out.textContent = JSON.stringify({
    images: Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]),
    headings: Array.from(document.querySelectorAll("h2")).map(h => [h.textContent, h.getBoundingClientRect().height]),
    charts: Array.from(document.querySelectorAll("svg")).map(s => s.getBoundingClientRect().width),
    text: document.body.innerText.length,
  });
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def probe(page: Path, browser: str, tmp_path: Path, *, name: str = "probe.html") -> dict:
    """Load a copy of ``page`` with the probe script added, in headless Chromium; the probe's findings."""
    copy = tmp_path / name
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom",
         copy.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="report-probe">(.*?)</pre>', dom, re.DOTALL)
    assert found, "the probe script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                      .replace("&gt;", ">"))


def test_report_images_load_in_headless_chromium(small_output, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary (install it: apt-get install -y chromium)")
    found = probe(small_output["page"], browser, tmp_path)
    assert len(found["images"]) >= 2 * 10, found["images"]
    assert all(complete and width > 0 for _, complete, width in found["images"]), found["images"]
    assert [h for h, _ in found["headings"]] == ["Counts and time", "Classes found", "Gallery", "Errors",
                                                 "Model and CRF"]
    assert len(found["charts"]) == 4 and all(w > 100 for w in found["charts"])  # phases, stages, 2 class charts

    # The check can fail: a corrupted inline image reads as naturalWidth 0.
    page = small_output["html"]
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page).group(1)
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace(first, base64.b64encode(b"not a jpeg").decode(), 1), encoding="utf-8")
    widths = [w for _, _, w in probe(broken, browser, tmp_path, name="probe-broken.html")["images"]]
    assert widths.count(0) >= 1


def test_report_of_an_output_with_only_error_rows_renders(tmp_path):
    layout = OutputLayout(uri=str(tmp_path / "out"))
    errors = [_error_row(f"/in/img{i}.jpg", f"cannot decode /in/img{i}.jpg: truncated at byte {100 + i}", "data")
              for i in range(6)]
    _finish(layout, errors, per_file=4, run_counts={"inputs": 6, "new": 6, "ok": 0, "error": 6, "error_storage": 0,
                                                    "skipped": 0})
    page_path = Path(write_report(layout))
    page = page_path.read_text(encoding="utf-8")
    assert "No ok row in the sample" in page and "<img" not in page
    assert "whole output: 6 data errors (final), 0 waiting for a retry" in page
    (row,) = page.split('<h2 id="errors">', 1)[1].split("<h2", 1)[0].split("<tr>")[2:]
    assert ">6</td>" in row and "img0.jpg" in row  # one group: file names and numbers normalised away
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary (install it: apt-get install -y chromium)")
    found = probe(page_path, browser, tmp_path)
    assert found["images"] == []
    assert [h for h, _ in found["headings"]] == ["Counts and time", "Classes found", "Gallery", "Errors",
                                                 "Model and CRF"]
    assert all(height > 0 for _, height in found["headings"]) and found["text"] > 500


# ----------------------------------------------------------------------------- written by `segment`


@pytest.mark.timeout(400)
def test_segment_writes_the_report_and_a_failing_report_does_not_fail_the_run(ray_local, tmp_path,
                                                                              tiny_checkpoint, monkeypatch):
    from jobs.segment import EXIT_OK, segment
    from pipeline.config import from_mapping
    from pipeline.outputs import report as report_module
    from tests.segment.corpus import good_images, write_files

    images = tmp_path / "images"
    write_files(images, good_images(4))
    (images / "broken.jpg").write_bytes(b"not an image")
    config = from_mapping({
        "input": {"uri": str(images)}, "output": {"uri": str(tmp_path / "out")},
        "model": {"weights": str(tiny_checkpoint)}, "crf": {"enabled": False},
        "ray": {"no_progress_timeout_s": 120, "progress": False}})
    lines: list[str] = []
    assert segment(config, echo=lines.append) == EXIT_OK
    report = tmp_path / "out" / "report.html"
    assert lines[-1] == f"report: {report}"
    page = report.read_text(encoding="utf-8")
    assert page.count("<img") >= 2 * 4 and "broken.jpg" in page
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["run_id"] in page

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module, "write_report", fail)
    report.unlink()
    lines.clear()
    with pytest.warns(RuntimeWarning, match="run report was not written.*disk full"):
        assert segment(config, echo=lines.append) == EXIT_OK
    assert lines[-1] == "report: not written (see the warning above)"
    assert not report.exists() and (tmp_path / "out" / "_run.json").exists()
