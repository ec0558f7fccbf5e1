"""End to end against a real S3 endpoint on loopback (moto server) and a real local Ray instance.

Images, tar shards and manifests are read from a bucket; masks, segments,
class_stats and _run.json are written back to the bucket.
"""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.segment import EXIT_OK, EXIT_USAGE, segment
from pipeline.config import from_mapping
from pipeline.outputs import CONFIG_METADATA_KEY, OutputLayout
from tests.segment.corpus import good_images, manifest, odd_corpus, tar_shard

pytestmark = [pytest.mark.s3]


def job_config(*, s3_server, input_uri, output_uri, weights, **sections):
    data = {
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "rows_per_file": 8},
        "model": {"weights": str(weights)},
        "s3": {"endpoint_url": s3_server["endpoint_url"], "region": s3_server["region"],
               "access_key_id": "testing", "secret_access_key": "testing"},
        "crf": {"batch_size": 4},
        "ray": {"no_progress_timeout_s": 120, "progress": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return from_mapping(data)


def s3fs_for(s3_server):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")


def rows_of(config):
    layout = OutputLayout(uri=config.output.uri, s3=config.s3)
    files = layout.segment_files()
    fs = s3fs_for({"endpoint_url": config.s3.endpoint_url})
    ids = []
    for path in files:
        with fs.open(path, "rb") as f:
            ids += pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
    return layout.read_segments().to_pylist(), ids, files


def test_folder_with_bad_files_from_s3_to_s3_then_resume(ray_local, s3_server, s3_bucket, tiny_checkpoint):
    fs = s3fs_for(s3_server)
    corpus = odd_corpus()
    for name, (data, _) in corpus.items():
        fs.pipe_file(f"{s3_bucket}/in/odd/{name}", data)
    for name, data in good_images(5).items():
        fs.pipe_file(f"{s3_bucket}/in/{name}", data)
    fs.pipe_file(f"{s3_bucket}/checkpoints/tiny.safetensors", tiny_checkpoint.read_bytes())
    config = job_config(s3_server=s3_server, input_uri=f"s3://{s3_bucket}/in/", output_uri=f"s3://{s3_bucket}/out",
                        weights=f"s3://{s3_bucket}/checkpoints/tiny.safetensors")
    assert segment(config, echo=lambda *_: None) == EXIT_OK

    rows, ids, files = rows_of(config)
    assert len(ids) == len(set(ids)) == len(corpus) + 5
    by_name = {r["source_uri"].rsplit("/", 1)[1]: r for r in rows}
    for name, (_, (status, error, size)) in corpus.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["error"])
        if status == "ok":
            assert (row["width"], row["height"]) == size
            mask = Image.open(io.BytesIO(fs.cat_file(row["mask_uri"].split("://", 1)[1])))
            assert mask.mode == "P" and mask.size == size
        else:
            assert error in row["error"] and row["mask_uri"] is None and row["class_pixels"] is None
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(len(r["class_pixels"]) == 5 and len(r["class_mean_confidence"]) == 5 for r in ok)
    assert all(r["crf"]["w1"] == 4.0 and r["model_sha256"] for r in ok)
    with fs.open(files[0], "rb") as f:
        metadata = json.loads(pq.read_schema(f).metadata[CONFIG_METADATA_KEY])
    assert metadata["s3"]["secret_access_key"] == "***" and metadata["resolved"]["plan"]["network_pool"] == 1
    stats = pq.read_table(fs.open(f"{s3_bucket}/out/class_stats.parquet", "rb")).to_pylist()
    assert sum(s["pixels"] for s in stats) == sum(r["width"] * r["height"] for r in ok)
    run = json.loads(fs.cat_file(f"{s3_bucket}/out/_run.json"))
    assert run["counts"]["ok"] == len(ok) and run["counts"]["error"] == len(rows) - len(ok)

    # Two more images arrive; the rerun processes only those, and never duplicates a row.
    for name, data in good_images(2, start=50).items():
        fs.pipe_file(f"{s3_bucket}/in/{name}", data)
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows2, ids2, _ = rows_of(config)
    assert len(ids2) == len(set(ids2)) == len(ids) + 2
    run = json.loads(fs.cat_file(f"{s3_bucket}/out/_run.json"))
    assert run["counts"]["new"] == 2 and run["counts"]["skipped"] == len(ids)
    stats2 = pq.read_table(fs.open(f"{s3_bucket}/out/class_stats.parquet", "rb")).to_pylist()
    assert sum(s["images_present"] > 0 for s in stats2) >= 1
    assert sum(s["pixels"] for s in stats2) == sum(r["width"] * r["height"] for r in rows2 if r["status"] == "ok")


def test_shards_and_manifests_from_s3(ray_local, s3_server, s3_bucket, tiny_checkpoint):
    fs = s3fs_for(s3_server)
    images = good_images(6)
    names = sorted(images)
    fs.pipe_file(f"{s3_bucket}/shards/shard-000.tar", tar_shard({n: images[n] for n in names[:3]}))
    fs.pipe_file(f"{s3_bucket}/shards/shard-001.tar", tar_shard({n: images[n] for n in names[3:]}))
    for name in names:
        fs.pipe_file(f"{s3_bucket}/flat/{name}", images[name])
    uris = [f"s3://{s3_bucket}/flat/{n}" for n in names[:4]] + [f"s3://{s3_bucket}/flat/gone.jpg"]
    fs.pipe_file(f"{s3_bucket}/m/uris.parquet", manifest({"uri": uris}))
    fs.pipe_file(f"{s3_bucket}/m/bytes.parquet",  # the first key repeated: dropped as a duplicate
                 manifest({"key": [*names[:2], names[0]], "bytes": [images[n] for n in (*names[:2], names[0])]}))

    no_crf = {"enabled": False}
    shards = job_config(s3_server=s3_server, input_uri=f"s3://{s3_bucket}/shards/",
                        output_uri=f"s3://{s3_bucket}/out-shards", weights=tiny_checkpoint, crf=no_crf)
    assert segment(shards, echo=lambda *_: None) == EXIT_OK
    rows, ids, _ = rows_of(shards)
    assert len(ids) == len(set(ids)) == 6 and {r["status"] for r in rows} == {"ok"}
    assert all("#img" in r["source_uri"] and r["crf"] is None for r in rows)
    assert segment(shards, echo=lambda *_: None) == EXIT_OK  # resume: members already done are skipped
    run = json.loads(fs.cat_file(f"{s3_bucket}/out-shards/_run.json"))
    assert run["counts"]["new"] == 0 and run["counts"]["skipped"] == 6
    assert len(rows_of(shards)[1]) == 6

    by_uri = job_config(s3_server=s3_server, input_uri=f"s3://{s3_bucket}/m/uris.parquet",
                        output_uri=f"s3://{s3_bucket}/out-m1", weights=tiny_checkpoint, crf=no_crf)
    assert segment(by_uri, echo=lambda *_: None) == EXIT_OK
    rows, ids, _ = rows_of(by_uri)
    assert sorted(r["source_uri"] for r in rows) == sorted(uris)
    assert [r["status"] for r in rows if r["source_uri"].endswith("gone.jpg")] == ["error"]

    by_bytes = job_config(s3_server=s3_server, input_uri=f"s3://{s3_bucket}/m/bytes.parquet",
                          output_uri=f"s3://{s3_bucket}/out-m2", weights=tiny_checkpoint, crf=no_crf)
    assert segment(by_bytes, echo=lambda *_: None) == EXIT_OK
    rows, ids, _ = rows_of(by_bytes)
    assert len(ids) == 2 and {r["status"] for r in rows} == {"ok"}
    assert sorted(r["source_uri"] for r in rows) == [f"s3://{s3_bucket}/m/bytes.parquet#{n}" for n in names[:2]]
    assert json.loads(fs.cat_file(f"{s3_bucket}/out-m2/_run.json"))["counts"]["duplicates"] == 1


def test_unreadable_location_fails_before_any_work(s3_server, s3_bucket, tiny_checkpoint, capsys):
    config = job_config(s3_server=s3_server, input_uri="s3://no-such-bucket-here/images/",
                        output_uri=f"s3://{s3_bucket}/out", weights=tiny_checkpoint)
    assert segment(config, echo=lambda *_: None) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "input s3://no-such-bucket-here/images/" in err and err.count("\n") == 1
    assert not s3fs_for(s3_server).exists(f"{s3_bucket}/out/segments")


def test_a_replaced_checkpoint_is_downloaded_again(s3_server, s3_bucket):
    from pipeline.io.uris import S3Settings
    from pipeline.devices import local_weights

    fs = s3fs_for(s3_server)
    uri = f"s3://{s3_bucket}/weights/model.safetensors"
    s3 = S3Settings(endpoint_url=s3_server["endpoint_url"], region=s3_server["region"])
    fs.pipe_file(uri, b"first checkpoint")
    with open(local_weights(uri, s3=s3), "rb") as f:
        assert f.read() == b"first checkpoint"
    fs.pipe_file(uri, b"second checkpoint, replaced under the same key")
    with open(local_weights(uri, s3=s3), "rb") as f:
        assert f.read() == b"second checkpoint, replaced under the same key"
