"""``segment --training``: training shards written as the run goes, each ok image exactly once, read back
with the real consumers (``webdataset`` into a torch ``DataLoader``, ``datasets.load_dataset``).

Real runs on a local Ray instance, locally and on a loopback S3 (moto). Kills are made where
they matter with ``DEEPLAB_BATCH_FAULTS`` (pipeline/faults.py): a ``bug`` in the writer once the
batch's shard is written but before its rows commit (``shard``), and once the rows committed
but before the shard is published (``publish``); the run stops there, as a kill would stop it.
Expected values come from the inputs and the output's own files (masks, confidence maps,
segments rows), with the rules of docs/training-data.md re-implemented here.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.segment import EXIT_FAILED, EXIT_OK, EXIT_USAGE, segment
from pipeline import faults
from pipeline.config import from_mapping
from pipeline.outputs import OutputLayout
from tests.segment.corpus import EXIF_ORIENTATION, encode, tar_shard

SAMPLES = Path(__file__).resolve().parents[2] / "pipeline" / "assets" / "samples"
NUM_CLASSES = 5  # the demo model's
CLASS_NAMES = ("background", "disc", "square", "triangle", "star")
THRESHOLD = 0.9
FAULTS = "publish:bug:pubonce:1;shard:bug:shardonce:1"


@pytest.fixture(scope="module")
def ray_faults(tmp_path_factory):
    """Local Ray whose workers see the faults of :data:`FAULTS` (they fire only for inputs named after them)."""
    from tests.conftest import local_ray

    with local_ray({faults.ENV: FAULTS, faults.STATE_ENV: str(tmp_path_factory.mktemp("fault-state"))}) as ray:
        yield ray


def _scenes(count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("sample_*.jpg"))[:count]]


def _corpus(prefix: str = "") -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """``{relative path: bytes}`` of the inputs (PNG, JPEG, an EXIF-rotated JPEG, a tar shard, a broken file),
    and ``{name: the upright pixels}`` of the rotated one."""
    scenes = _scenes(9)
    files: dict[str, bytes] = {}
    for i, scene in enumerate(scenes[:6]):
        fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
        files[f"{prefix}plain{i}.{ext}"] = encode(scene, fmt)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored W x H, shown H x W: rotated 90 degrees clockwise
    files[f"{prefix}rotated.jpg"] = encode(np.rot90(scenes[6], k=1), "JPEG", exif=exif, quality=95)
    files[f"{prefix}shard.tar"] = tar_shard({"m0.png": encode(scenes[7], "PNG"), "m1.jpg": encode(scenes[8], "JPEG")})
    files[f"{prefix}broken.jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
    return files, {f"{prefix}rotated.jpg": scenes[6]}


def _config(input_uri: str, output_uri: str, *, fmt: str, crf: bool = False, s3=None, **output):
    from pipeline.weights import DEMO_CHECKPOINT

    data = {
        "input": {"uri": input_uri},
        "output": {"uri": output_uri, "rows_per_file": 3,
                   "training": {"format": fmt, "ignore_below": THRESHOLD}, **output},
        "model": {"weights": str(DEMO_CHECKPOINT)}, "crf": {"enabled": crf},
        "ray": {"no_progress_timeout_s": 180, "progress": False},
    }
    if s3:
        data["s3"] = {"endpoint_url": s3["endpoint_url"], "region": s3["region"], "access_key_id": "testing",
                      "secret_access_key": "testing"}
    return from_mapping(data)


def _run(config, limit: int = 0) -> int:
    from pipeline.config import override

    if limit:
        config = override(config, **{"input.limit": limit})
    return segment(config, echo=lambda *_: None)


def _label(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:  # no .convert(): the label PNG is "L" (class ids)
        assert image.mode == "L"
        return np.array(image)


def _wds_samples(training: Path) -> list[dict]:
    """Every sample of every shard under ``training/``, through webdataset into a torch DataLoader."""
    import webdataset as wds
    from torch.utils.data import DataLoader

    shards = sorted(str(p) for p in training.glob("*.tar"))
    assert shards, f"no shards under {training}"
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode(
        wds.handle_extension("seg.png", _label))
    return list(DataLoader(dataset, batch_size=None, num_workers=0))


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image)


def _check_sample(image_bytes: bytes, label: np.ndarray, meta: dict, *, row: dict, mask: np.ndarray,
                  confidence: np.ndarray, source: bytes | None, upright: np.ndarray | None) -> None:
    """One sample against its row, mask, stored confidence map and input (the documented rules)."""
    with Image.open(io.BytesIO(image_bytes)) as image:  # a plain open, as a training loader does
        assert image.size == (row["width"], row["height"]) == (label.shape[1], label.shape[0])
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    if upright is not None:  # re-encoded upright: the pixels line up with the scene as shown
        assert np.abs(pixels - upright).mean() < 4
    else:  # no EXIF rotation: the original bytes
        assert image_bytes == source
    assert set(np.unique(label)) <= set(range(NUM_CLASSES)) | {255}
    ignored = confidence / 255.0 < THRESHOLD  # the 8-bit rule: c / 255 < T
    assert np.array_equal(label == 255, ignored)
    assert np.array_equal(label[~ignored], mask[~ignored])
    assert meta["ignored_pixels"] == row["ignored_pixels"] == int(ignored.sum())
    assert meta["image_id"] == row["image_id"] and meta["source_uri"] == row["source_uri"]
    assert meta["class_pixels"] == [int((label == k).sum()) for k in range(NUM_CLASSES)]
    for name in ("mean_confidence", "mean_entropy", "crf_agreement"):
        assert meta[name] == pytest.approx(row[name], rel=1e-6)
    assert meta["confident_fraction"] == pytest.approx(1 - ignored.mean(), abs=1e-6)


def _sources(folder_files: dict[str, bytes], base: str) -> dict[str, bytes]:
    """``{source_uri: bytes}`` of the plain files and tar members of :func:`_corpus`."""
    import tarfile

    out = {}
    for name, data in folder_files.items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    out[f"{base}/{name}#{member.name}"] = tar.extractfile(member).read()
        else:
            out[f"{base}/{name}"] = data
    return out


def test_webdataset_during_the_run_exactly_once_across_a_resume(ray_faults, tmp_path):
    files, upright = _corpus()
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    config = _config(str(folder), str(out), fmt="webdataset", crf=True)

    assert _run(config, limit=4) == EXIT_OK  # the first four images, then the rest
    training = out / "training"
    layout = OutputLayout(uri=str(out))
    first_ok = {r["image_id"] for r in layout.read_segments().to_pylist() if r["status"] == "ok"}
    assert 3 <= len(first_ok) <= 4  # broken.jpg may be among the first four
    assert Counter(s["json"]["image_id"] for s in _wds_samples(training)) == Counter(first_ok)
    assert len(list(training.glob("*.tar"))) == 1  # the run's batch shards, merged after it
    assert _run(config) == EXIT_OK

    rows = {r["image_id"]: r for r in layout.read_segments().to_pylist()}
    ok = {i: r for i, r in rows.items() if r["status"] == "ok"}
    assert len(rows) == 10 and len(ok) == 9  # broken.jpg is an error row, and no sample
    samples = _wds_samples(training)
    keys = Counter(s["__key__"] for s in samples)
    assert sorted(keys) == sorted(i.replace(".", "_") for i in ok) and set(keys.values()) == {1}
    assert len(list(training.glob("*.tar"))) == 1
    assert not [p for p in (training / "_pending").iterdir()]
    sources = _sources(files, str(folder))
    by_key = {i.replace(".", "_"): i for i in ok}
    for sample in samples:
        image_id = by_key[sample["__key__"]]
        row = ok[image_id]
        (ext,) = [k for k in sample if k in ("jpg", "png")]
        meta = sample["json"]
        source_name = row["source_uri"][len(str(folder)) + 1:]
        _check_sample(sample[ext], sample["seg.png"], meta, row=row,
                      mask=_png((out / "masks" / f"{image_id}.png").read_bytes()),
                      confidence=_png((out / "confidence" / f"{image_id}.png").read_bytes()),
                      source=sources[row["source_uri"]], upright=upright.get(source_name))
    assert json.loads((training / "id2label.json").read_text()) == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    run = json.loads((out / "_run.json").read_text())
    assert run["training"]["format"] == "webdataset" and run["training"]["shards"] == 1
    assert "<b>Training data</b>: <code>training/</code>, webdataset" in (out / "report.html").read_text()


def _hf_items(local: Path) -> list[tuple[bytes, np.ndarray, dict]]:
    """``(image bytes, label, record)`` of every row of the HF Parquet files under ``local``, via ``datasets``."""
    import datasets

    for path in local.glob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        assert all(meta.row_group(g).num_rows <= 100 for g in range(meta.num_row_groups))
    dataset = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in local.glob("*.parquet")),
                                    split="train")
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["label"], datasets.Image)
    decoded = dataset[0]
    assert decoded["label"].mode == "L" and decoded["image"].size == decoded["label"].size
    plain = dataset.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    return [(item["image"]["bytes"], _label(item["label"]["bytes"]),
             {k: item[k] for k in item if k not in ("image", "label")}) for item in plain]


def _wds_items(local: Path) -> list[tuple[bytes, np.ndarray, dict]]:
    out = []
    for sample in _wds_samples(local):
        (ext,) = [k for k in sample if k in ("jpg", "png")]
        assert sample["json"]["key"] == sample["__key__"]
        out.append((sample[ext], sample["seg.png"], sample["json"]))
    return out


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["hf-parquet", "webdataset"])
def test_both_formats_on_s3_read_back_with_their_consumers(ray_faults, s3_server, s3_bucket, tmp_path, fmt):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    files, upright = _corpus()
    for name, data in files.items():
        fs.pipe_file(f"{s3_bucket}/in/{name}", data)
    config = _config(f"s3://{s3_bucket}/in/", f"s3://{s3_bucket}/out", fmt=fmt, s3=s3_server)
    assert _run(config) == EXIT_OK

    rows = {r["image_id"]: r for r in OutputLayout(uri=f"s3://{s3_bucket}/out", s3=config.s3).read_segments()
            .to_pylist() if r["status"] == "ok"}
    assert len(rows) == 9
    local = tmp_path / "training"
    local.mkdir()
    suffix = {"hf-parquet": ".parquet", "webdataset": ".tar"}[fmt]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/out/training") if p.endswith(suffix))
    assert names and all(n.startswith(("part-", "compact-")) for n in names)
    for name in names:
        fs.get_file(f"{s3_bucket}/out/training/{name}", str(local / name))
    fs.invalidate_cache()
    assert not fs.find(f"{s3_bucket}/out/training/_pending")  # nothing left pending
    items = _hf_items(local) if fmt == "hf-parquet" else _wds_items(local)
    assert Counter(meta["image_id"] for *_, meta in items) == Counter(rows.keys())
    sources = _sources(files, f"s3://{s3_bucket}/in")
    for image, label, meta in items:
        row = rows[meta["image_id"]]
        _check_sample(image, label, meta, row=row,
                      mask=_png(fs.cat_file(f"{s3_bucket}/out/masks/{row['image_id']}.png")),
                      confidence=_png(fs.cat_file(f"{s3_bucket}/out/confidence/{row['image_id']}.png")),
                      source=sources[row["source_uri"]], upright=upright.get(row["source_uri"].split("/in/", 1)[1]))
    id2label = json.loads(fs.cat_file(f"{s3_bucket}/out/training/id2label.json"))
    assert id2label == {str(i): n for i, n in enumerate(CLASS_NAMES)}


def _shard_ids(training: Path) -> Counter:
    return Counter(s["json"]["image_id"] for s in _wds_samples(training)) if list(training.glob("*.tar")) \
        else Counter()


@pytest.mark.parametrize("stage", ["publish", "shard"])
def test_a_run_stopped_between_shard_and_commit_loses_and_doubles_nothing(ray_faults, tmp_path, stage):
    """``publish``: the rows committed, their shard still pending: it stays invisible, and the next run
    publishes it. ``shard``: the shard written, its rows not committed: the next run drops it and
    segments those images again. Either way every ok image ends in exactly one shard."""
    marker = {"publish": "pubonce", "shard": "shardonce"}[stage]
    files, _ = _corpus()
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / f"{marker}.png").write_bytes(encode(_scenes(10)[9], "PNG"))
    out = tmp_path / "out"
    config = _config(str(folder), str(out), fmt="webdataset")
    layout = OutputLayout(uri=str(out))

    assert _run(config) == EXIT_FAILED
    training = out / "training"
    pending = [p.name for p in (training / "_pending").iterdir() if not p.name.startswith(".")]
    assert pending, "the stopped batch's shard is pending"
    committed = {r["image_id"] for r in layout.read_segments().to_pylist()} if (out / "segments").exists() else set()
    marked_committed = any(marker in i for i in committed)
    assert marked_committed == (stage == "publish")
    visible = _shard_ids(training)
    assert set(visible.values()) <= {1}  # nothing visible twice
    assert not any(marker in i for i in visible)  # the stopped batch's shard is not visible
    assert set(visible) <= committed  # no visible image without a committed row

    assert _run(config) == EXIT_OK
    run = json.loads((out / "_run.json").read_text())
    recovered = run["training"]["recovered_at_start"]
    assert recovered["published" if stage == "publish" else "dropped"] == len(pending)
    ok = {r["image_id"] for r in layout.read_segments().to_pylist() if r["status"] == "ok"}
    assert len(ok) == 10
    final = _shard_ids(training)
    assert set(final) == ok and set(final.values()) == {1}
    assert not [p for p in (training / "_pending").iterdir()]


def test_training_settings_cannot_change_between_runs(ray_faults, tmp_path, capsys):
    from pipeline.config import override

    folder = tmp_path / "in"
    folder.mkdir()
    for i, scene in enumerate(_scenes(3)):
        (folder / f"a{i}.png").write_bytes(encode(scene, "PNG"))
    out = tmp_path / "out"
    config = _config(str(folder), str(out), fmt="webdataset")
    assert _run(config, limit=1) == EXIT_OK
    for changes, expected in (
        ({"output.training.format": "hf-parquet"}, "--training webdataset --ignore-below 0.9"),
        ({"output.training.ignore_below": 0.5}, "--training webdataset --ignore-below 0.9"),
        ({"output.training.format": ""}, "keeps training data"),
    ):
        capsys.readouterr()
        assert _run(override(config, **changes)) == EXIT_USAGE
        assert expected in capsys.readouterr().err
    # an output segmented without --training cannot start training data that would miss its images
    plain = tmp_path / "plain"
    assert _run(override(config, **{"output.uri": str(plain), "output.training.format": ""}), limit=1) == EXIT_OK
    capsys.readouterr()
    assert _run(override(config, **{"output.uri": str(plain)})) == EXIT_USAGE
    assert "deeplab-batch export" in capsys.readouterr().err
    assert not (plain / "training").exists()


def test_training_options_are_checked():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="output.training.format"):
        from_mapping({"output": {"training": {"format": "coco"}}})
    with pytest.raises(ConfigError, match="output.training.shard_mb: expected >= 1, got 0"):
        from_mapping({"output": {"training": {"format": "webdataset", "shard_mb": 0}}})
    with pytest.raises(ConfigError, match="output.lease_ttl_s: 0 .* exactly once"):
        from_mapping({"output": {"lease_ttl_s": 0, "training": {"format": "hf-parquet"}}})
