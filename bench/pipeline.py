"""Per-stage cost of the segment pipeline per image, for several image sizes side by side in one run.

For each ``--size`` (W x H, e.g. a 12 MP photo 4032x3024 beside PASCAL's 500x375) and
each ``--crf-resolution``, on one local Ray instance and the job's own resource plan
and stage wiring (:mod:`pipeline.graph`):

* read+decode alone (tasks), network alone (its actor pool, on decoded rows
  materialised beforehand), CRF alone (its actor pool, on materialised network rows),
  then the whole pipeline (read -> ... -> write to a temporary folder);
* seconds per image of the network and the CRF stage (their own per-row timings);
* bytes per row moved between the network and the CRF stage;
* write alone (its tasks, on materialised CRF rows: masks, segments files, and with
  ``--training`` the training shards), its seconds per image;
* the largest RSS and private memory of each process kind (network actor, CRF actor,
  decode/read/write tasks, driver, Ray's own processes), sampled every 0.1 s
  (:mod:`bench.procmem`).

Images are synthetic JPEGs (flat rectangles + noise). The default model is a
random-weight LargeFOV at 1/8 width with 21 classes and the paper's input size 513:
the CRF's cost depends on the classes and the working resolution, not on the
network's width (pass ``--weights`` for a real checkpoint; the network's time then
is a real VGG-16's). Actor start-up (model load) is inside the stage timings.

``--training FORMAT`` (``webdataset`` or ``hf-parquet``, repeatable) runs every case again with
``output.training.format`` (and ``output.training.ignore_below``: ``--ignore-below``), next to the
run without it, and reports what training output costs: the bytes per row carried from decode
to the writer (the ``image`` column: the stored image bytes; the CRF's ``confidence`` map, which
training turns on), the write stage's time, the shard bytes per image and the largest process
memory. The write stage takes ``output.rows_per_file`` (64) rows per batch: the table also
gives that many rows' bytes, what one write task holds at a time (the runs here have fewer
images, so their write tasks hold less).

    python bench/pipeline.py --size 4032x3024 --size 500x375 --images 6 --images 24
    python bench/pipeline.py --size 4032x3024 --crf-resolution network --crf-resolution full --images 2
    python bench/pipeline.py --size 4000x3000 --images 4 --training webdataset --training hf-parquet
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from bench.procmem import Sampler
from bench.storage import machine

TARGET_EFFICIENCY = 0.85


def make_corpus(folder: Path, *, count: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
            image[y : y + height // 2, x : x + width // 2] = rng.integers(0, 255, 3)
        noise = rng.integers(-12, 12, image.shape, dtype=np.int16)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:05d}.jpg", quality=90)


def tiny_weights(folder: Path, *, input_size: int, width: float = 0.125) -> str:
    """A random-weight LargeFOV (21 classes) at ``input_size``."""
    import torch

    from pipeline.constants import VOC_CLASSES, voc_palette
    from pipeline.model import deeplab_v1
    from pipeline.weights import ModelRecord, save_checkpoint

    torch.manual_seed(0)
    model = deeplab_v1("largefov", num_classes=21, width=width)
    record = ModelRecord(variant="largefov", num_classes=21, width=width, class_names=VOC_CLASSES,
                         palette=tuple(voc_palette(21)), input_size=input_size,
                         source="bench (random weights)")
    path = folder / f"bench-{width}-{input_size}.safetensors"
    save_checkpoint(path, model=model, record=record)
    return str(path)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(*, work: Path, size: tuple[int, int], count: int, weights: str, resolution: str, backend: str,
            crf: bool, sampler: Sampler, network_mode: str = "resize", training: str = "",
            ignore_below: float = 0.0) -> dict:
    """One (size, resolution, training format) case: stages alone, then end to end."""
    from pipeline import graph
    from pipeline.config import from_mapping
    from pipeline.crf import default_preset, load_params
    from pipeline.io.sources import plan_input
    from pipeline.outputs import OutputLayout
    from pipeline.resources import cluster_resources, plan_resources
    from pipeline.stages import RunTally, WriteStage
    from pipeline.training.store import TrainingStore
    from pipeline.weights import read_record

    width, height = size
    case = work / f"{width}x{height}"
    if not (case / "in").exists():
        make_corpus(case / "in", count=count, height=height, width=width)
    out = case / f"out-{resolution}-{training or 'none'}"
    record = read_record(weights)
    output = {"uri": str(out)}
    if training:
        output["training"] = {"format": training, "ignore_below": ignore_below}
    config = from_mapping({
        "input": {"uri": str(case / "in")}, "output": output, "model": {"weights": weights},
        "crf": {"enabled": crf, "backend": backend, "resolution": int(resolution) if resolution.isdigit() else
                resolution},
        "network": {"mode": network_mode},
        "ray": {"no_progress_timeout_s": 900, "progress": False},
    })
    cpus, gpus, custom = cluster_resources()
    plan = plan_resources(config, cpus=cpus, gpus=gpus, custom=custom)
    params = load_params(config.crf.params or default_preset(record.variant)) if crf else None
    source = plan_input(config.input.uri)
    layout = OutputLayout(uri=config.output.uri)

    def pending():  # the job's own index + resume steps (nothing under the output yet)
        index = graph.input_dataset(source, config=config, tally=RunTally())
        return graph.pending_dataset(index, layout=layout, done_files=[], storage_files=[], prior_rows=0,
                                     may_repeat=False, limit=0, read_batch_size=plan.read_batch_size,
                                     tally=RunTally())

    items = pending().materialize()
    n = items.count()
    sampler.reset()
    decoded, t_decode = timed(graph.read_and_decode(items, config=config, plan=plan,
                                                    input_size=record.input_size).materialize)
    decode_sizes = column_bytes(decoded, ("pixels", "image"))
    network_out, t_network = timed(graph.network_dataset(decoded, config=config, plan=plan, weights=weights,
                                                         input_size=record.input_size).materialize)
    sizes = network_out.map_batches(
        lambda t: {"row": np.asarray([t.slice(i, 1).nbytes for i in range(t.num_rows)]),
                   "logits": np.asarray([len(b or b"") for b in t.column("logits").to_pylist()]),
                   "pixels": np.asarray([len(b or b"") for b in t.column("pixels").to_pylist()]),
                   "t_network": t.column("t_network").to_numpy()},
        batch_format="pyarrow").to_pandas()
    crf_out, t_crf = timed(graph.crf_dataset(network_out, config=config, plan=plan, crf_params=params).materialize)
    per_crf = crf_out.select_columns(["t_crf", "status", "error"]).to_pandas()
    bad = per_crf[per_crf["status"] != "ok"]
    if len(bad):
        raise SystemExit(f"{len(bad)} error rows, e.g. {bad['error'].iloc[0]}")
    crf_sizes = column_bytes(crf_out, ("mask", "confidence", "image"))
    del decoded, network_out
    crf_record = {"backend": backend, **params.to_dict(), "resolution": resolution} if params else None
    # write alone, into a folder of its own: the job's WriteStage (and TrainingStore) over the materialised CRF rows
    alone_layout = OutputLayout(uri=str(case / f"write-alone-{resolution}-{training or 'none'}"))
    store = TrainingStore(layout=alone_layout, format=training, ignore_below=ignore_below) if training else None
    writer = WriteStage(layout=alone_layout, run_id="bench", palette=record.palette, crf=crf_record, metadata=None,
                        training=store)
    written, t_write = timed(crf_out.map_batches(writer, batch_format="pyarrow", batch_size=plan.write_batch_size,
                                                 num_cpus=plan.write_num_cpus).materialize)
    per_write = written.select_columns(["t_write", "status", "error"]).to_pandas()
    bad = per_write[per_write["status"] != "ok"]
    if len(bad):
        raise SystemExit(f"{len(bad)} write error rows, e.g. {bad['error'].iloc[0]}")
    del crf_out, written
    alone = sampler.peaks()

    sampler.reset()
    ds = graph.work_dataset(pending(), config=config, plan=plan, weights=weights, crf_params=params,
                            layout=layout, run_id="bench", palette=record.palette, crf_record=crf_record,
                            metadata=None, input_size=record.input_size)
    _, t_e2e = timed(lambda: sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    e2e_peaks, top = sampler.peaks(), sampler.top(1)
    peaks = {k: (max(alone.get(k, (0, 0))[0], e2e_peaks.get(k, (0, 0))[0]),
                 max(alone.get(k, (0, 0))[1], e2e_peaks.get(k, (0, 0))[1])) for k in {*alone, *e2e_peaks}}
    rates = {"read+decode": n / t_decode, "network": n / t_network, "crf": n / t_crf, "write": n / t_write}
    slowest = min(rates, key=rates.get)
    return {
        "size": f"{width}x{height}" + (f" ({network_mode})" if network_mode != "resize" else "")
        + (f" +{training}" if training else ""),
        "megapixels": width * height / 1e6, "images": n, "resolution": resolution,
        "plan": plan, "record": record, "rates": rates, "e2e": n / t_e2e, "efficiency": (n / t_e2e) / rates[slowest],
        "slowest": slowest, "network_s": float(sizes["t_network"].mean()), "crf_s": float(per_crf["t_crf"].mean()),
        "row_bytes": float(sizes["row"].mean()), "logits_bytes": float(sizes["logits"].mean()),
        "pixels_bytes": float(sizes["pixels"].mean()), "peaks": peaks, "top": top[0] if top else None,
        "training": training, "ignore_below": ignore_below if training else None,
        "decode_bytes": decode_sizes, "crf_bytes": crf_sizes, "write_s": float(per_write["t_write"].mean()),
        "write_batch": plan.write_batch_size, "shard_bytes": shard_bytes(out, training) / n if training else 0.0,
        "mask_bytes": folder_bytes(out / "masks") / n, "confidence_bytes": folder_bytes(out / "confidence") / n,
    }


def column_bytes(ds, columns: tuple[str, ...]) -> dict[str, float]:
    """Mean bytes per row of a materialised dataset: the whole row (``row``) and each of ``columns`` (0 when null)."""
    def sizes(t):
        out = {"row": np.asarray([t.slice(i, 1).nbytes for i in range(t.num_rows)])}
        for name in columns:
            out[name] = np.asarray([len(b or b"") for b in t.column(name).to_pylist()])
        return out

    frame = ds.map_batches(sizes, batch_format="pyarrow").to_pandas()
    return {name: float(frame[name].mean()) for name in ("row", *columns)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def shard_bytes(out: Path, training: str) -> int:
    """Bytes of the published training shards of an output (``training/*.tar|*.parquet``)."""
    from pipeline.training.rules import SHARD_SUFFIX

    folder = out / "training"
    return sum(p.stat().st_size for p in folder.glob(f"*{SHARD_SUFFIX[training]}")) if folder.exists() else 0


def report(results: list[dict], *, backend: str, crf: bool) -> None:
    first = results[0]
    plan, record = first["plan"], first["record"]
    m = machine()
    ram = f", {m['ram_gib']:.1f} GiB RAM" if m["ram_gib"] else ""
    print(f"machine: {platform.node()}: {m['cpu']}, {os.cpu_count()} CPUs{ram}; "
          f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}")
    print(f"model {record.variant} width {record.width} ({record.num_classes} classes, input_size "
          f"{record.input_size}); CRF {backend if crf else 'off'}")
    print(f"plan: network {plan.network_pool} actor(s) x {plan.network_num_cpus:g} CPU/{plan.network_num_gpus:g} GPU "
          f"batch {plan.network_batch_size}; CRF {plan.crf_pool} actor(s) x {plan.crf_num_cpus:g} CPU "
          f"batch {plan.crf_batch_size}; decode tasks {plan.decode_num_cpus:g} CPU\n")
    header = ("size", "MP", "CRF at", "images", "network s/img", "CRF s/img", "net->CRF bytes/row",
              "decode img/s", "network img/s", "CRF img/s", "write img/s", "e2e img/s", "efficiency")
    print(" | ".join(header))
    for r in results:
        print(" | ".join([
            r["size"], f"{r['megapixels']:.2f}", r["resolution"], str(r["images"]), f"{r['network_s']:.3f}",
            f"{r['crf_s']:.3f}",
            f"{r['row_bytes']:,.0f} (pixels {r['pixels_bytes']:,.0f}, logits {r['logits_bytes']:,.0f})",
            f"{r['rates']['read+decode']:.2f}", f"{r['rates']['network']:.2f}",
            f"{r['rates']['crf']:.2f}", f"{r['rates']['write']:.2f}", f"{r['e2e']:.2f}",
            f"{r['efficiency']:.2f} (vs {r['slowest']})"]))
    print("\npeak memory per process kind, MB (RSS / private), stages alone and end to end:")
    kinds = sorted({k for r in results for k in r["peaks"]})
    print(" | ".join(["size", "CRF at", *kinds]))
    for r in results:
        cells = [f"{r['peaks'][k][0]:,.0f} / {r['peaks'][k][1]:,.0f}" if k in r["peaks"] else "-" for k in kinds]
        print(" | ".join([r["size"], r["resolution"], *cells]))
    for r in results:
        if r["top"]:
            rss, private, kind = r["top"]
            print(f"largest process at {r['size']} (CRF at {r['resolution']}): {kind} {rss:,.0f} MB RSS, "
                  f"{private:,.0f} MB private")
    by_res: dict[str, dict[str, dict]] = {}
    for r in results:
        if not r["training"]:
            by_res.setdefault(r["resolution"], {})[r["size"]] = r
    for resolution, cases in by_res.items():
        if len(cases) >= 2:
            (big_size, big), (small_size, small) = sorted(cases.items(), key=lambda kv: -kv[1]["megapixels"])[:2]
            print(f"CRF at {resolution}: {big_size} vs {small_size}: CRF s/img x{big['crf_s'] / small['crf_s']:.2f}, "
                  f"network s/img x{big['network_s'] / small['network_s']:.2f}, bytes/row "
                  f"x{big['row_bytes'] / small['row_bytes']:.2f}, pixels x{big['megapixels'] / small['megapixels']:.1f}")
    if any(r["training"] for r in results):
        report_training(results)


def report_training(results: list[dict]) -> None:
    """What training output adds, each case next to the same size and resolution without it."""
    print("\ntraining output (output.training.format) next to the run without it; bytes are per row (image):")
    header = ("size", "CRF at", "training", "decode->network bytes/row (image)",
              "CRF->write bytes/row (mask, confidence, image)", "write batch bytes (rows)", "write s/img (stage)",
              "write s/img (masks)", "shard bytes/img", "masks+confidence bytes/img", "e2e img/s",
              "write task MB (RSS / private)", "largest process MB (RSS / private)")
    print(" | ".join(header))
    base = {(r["size"], r["resolution"]): r for r in results if not r["training"]}
    compared = {(r["size"].split(" +")[0], r["resolution"]) for r in results if r["training"]}
    for r in results:
        size = r["size"].split(" +")[0]
        if (size, r["resolution"]) not in compared:
            continue
        ref = base.get((size, r["resolution"]))
        d, c = r["decode_bytes"], r["crf_bytes"]
        d_extra = f" ({d['row'] - ref['decode_bytes']['row']:+,.0f})" if ref and r is not ref else ""
        c_extra = f" ({c['row'] - ref['crf_bytes']['row']:+,.0f})" if ref and r is not ref else ""
        peaks = r["peaks"].get("write task")
        rss, private, kind = r["top"] or (0.0, 0.0, "-")
        print(" | ".join([
            size, r["resolution"], r["training"] or "none",
            f"{d['row']:,.0f}{d_extra} ({d['image']:,.0f})",
            f"{c['row']:,.0f}{c_extra} ({c['mask']:,.0f}, {c['confidence']:,.0f}, {c['image']:,.0f})",
            f"{c['row'] * r['write_batch']:,.0f} ({r['write_batch']})",
            f"{1 / r['rates']['write']:.3f}", f"{r['write_s']:.3f}", f"{r['shard_bytes']:,.0f}",
            f"{r['mask_bytes'] + r['confidence_bytes']:,.0f}", f"{r['e2e']:.2f}",
            f"{peaks[0]:,.0f} / {peaks[1]:,.0f}" if peaks else "-",
            f"{rss:,.0f} / {private:,.0f} ({kind})"]))
    print("(write s/img (stage): the write stage alone, wall time / images, shards included; (masks): each row's "
          "own mask and confidence PNG writes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", action="append", help="WxH of the synthetic images (repeat; default 200x160)")
    parser.add_argument("--images", type=int, action="append",
                        help="images per size (repeat, one per --size; default 24)")
    parser.add_argument("--crf-resolution", action="append", help="crf.resolution (repeat; default network)")
    parser.add_argument("--weights", help="checkpoint; default a random LargeFOV at --input-size")
    parser.add_argument("--input-size", type=int, default=513, help="input size of the default model (513)")
    parser.add_argument("--crf-backend", default="pydensecrf", choices=("pydensecrf", "torch"))
    parser.add_argument("--no-crf", action="store_true")
    parser.add_argument("--network-mode", choices=("resize", "slide"), default="resize",
                        help="network.mode (slide: native-resolution tiles of the model's input size)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--training", action="append", choices=("webdataset", "hf-parquet"),
                        help="also run every case with output.training.format FORMAT (repeat), next to the run "
                             "without it")
    parser.add_argument("--ignore-below", type=float, default=0.9,
                        help="output.training.ignore_below of the --training runs (default 0.9)")
    args = parser.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.size or ["200x160"])]
    counts = args.images or [24]
    if len(counts) == 1:
        counts = counts * len(sizes)
    if len(counts) != len(sizes):
        parser.error("give one --images per --size (or one for all)")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH")]))
    import logging

    import ray

    from pipeline.execution import configure_context

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    weights = args.weights or tiny_weights(work, input_size=args.input_size)
    results = []
    with Sampler() as sampler:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        configure_context(no_progress_timeout_s=900)
        try:
            for resolution in args.crf_resolution or ["network"]:
                for size, count in zip(sizes, counts, strict=True):
                    for training in ["", *(args.training or [])]:
                        results.append(measure(work=work, size=size, count=count, weights=weights,
                                               resolution=resolution, backend=args.crf_backend, crf=not args.no_crf,
                                               sampler=sampler, network_mode=args.network_mode, training=training,
                                               ignore_below=args.ignore_below))
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    report(results, backend=args.crf_backend, crf=not args.no_crf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
