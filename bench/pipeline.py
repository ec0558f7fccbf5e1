"""Per-stage cost of the segment pipeline per image, for several image sizes side by side in one run.

For each ``--size`` (W x H, e.g. a 12 MP photo 4032x3024 beside PASCAL's 500x375) and
each ``--crf-resolution``, on one local Ray instance and the job's own resource plan
and stage wiring (:mod:`pipeline.graph`):

* read+decode alone (tasks), network alone (its actor pool, on decoded rows
  materialised beforehand), CRF alone (its actor pool, on materialised network rows),
  then the whole pipeline (read -> ... -> write to a temporary folder);
* seconds per image of the network and the CRF stage (their own per-row timings);
* bytes per row moved between the network and the CRF stage;
* the largest RSS and private memory of each process kind (network actor, CRF actor,
  decode/read/write tasks, driver, Ray's own processes), sampled every 0.1 s
  (:mod:`bench.procmem`).

Images are synthetic JPEGs (flat rectangles + noise). The default model is a
random-weight LargeFOV at 1/8 width with 21 classes and the paper's input size 513:
the CRF's cost depends on the classes and the working resolution, not on the
network's width (pass ``--weights`` for a real checkpoint; the network's time then
is a real VGG-16's). Actor start-up (model load) is inside the stage timings.

    python bench/pipeline.py --size 4032x3024 --size 500x375 --images 6 --images 24
    python bench/pipeline.py --size 4032x3024 --crf-resolution network --crf-resolution full --images 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from bench.procmem import Sampler

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
            crf: bool, sampler: Sampler, network_mode: str = "resize") -> dict:
    """One (size, resolution) case: stages alone, then end to end."""
    import ray.data

    from pipeline import graph
    from pipeline.config import from_mapping
    from pipeline.crf import default_preset, load_params
    from pipeline.io.sources import plan_input
    from pipeline.outputs import OutputLayout
    from pipeline.resources import cluster_resources, plan_resources
    from pipeline.stages import RunTally
    from pipeline.weights import read_record

    width, height = size
    case = work / f"{width}x{height}"
    if not (case / "in").exists():
        make_corpus(case / "in", count=count, height=height, width=width)
    out = case / f"out-{resolution}"
    record = read_record(weights)
    config = from_mapping({
        "input": {"uri": str(case / "in")}, "output": {"uri": str(out)}, "model": {"weights": weights},
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
    del decoded, network_out, crf_out
    alone = sampler.peaks()

    sampler.reset()
    crf_record = {"backend": backend, **params.to_dict(), "resolution": resolution} if params else None
    ds = graph.work_dataset(pending(), config=config, plan=plan, weights=weights, crf_params=params,
                            layout=layout, run_id="bench", palette=record.palette, crf_record=crf_record,
                            metadata=None, input_size=record.input_size)
    _, t_e2e = timed(lambda: sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    e2e_peaks, top = sampler.peaks(), sampler.top(1)
    peaks = {k: (max(alone.get(k, (0, 0))[0], e2e_peaks.get(k, (0, 0))[0]),
                 max(alone.get(k, (0, 0))[1], e2e_peaks.get(k, (0, 0))[1])) for k in {*alone, *e2e_peaks}}
    rates = {"read+decode": n / t_decode, "network": n / t_network, "crf": n / t_crf}
    slowest = min(rates, key=rates.get)
    return {
        "size": f"{width}x{height}" + (f" ({network_mode})" if network_mode != "resize" else ""),
        "megapixels": width * height / 1e6, "images": n, "resolution": resolution,
        "plan": plan, "record": record, "rates": rates, "e2e": n / t_e2e, "efficiency": (n / t_e2e) / rates[slowest],
        "slowest": slowest, "network_s": float(sizes["t_network"].mean()), "crf_s": float(per_crf["t_crf"].mean()),
        "row_bytes": float(sizes["row"].mean()), "logits_bytes": float(sizes["logits"].mean()),
        "pixels_bytes": float(sizes["pixels"].mean()), "peaks": peaks, "top": top[0] if top else None,
    }


def report(results: list[dict], *, backend: str, crf: bool) -> None:
    first = results[0]
    plan, record = first["plan"], first["record"]
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs; model {record.variant} width {record.width} "
          f"({record.num_classes} classes, input_size {record.input_size}); CRF {backend if crf else 'off'}")
    print(f"plan: network {plan.network_pool} actor(s) x {plan.network_num_cpus:g} CPU/{plan.network_num_gpus:g} GPU "
          f"batch {plan.network_batch_size}; CRF {plan.crf_pool} actor(s) x {plan.crf_num_cpus:g} CPU "
          f"batch {plan.crf_batch_size}; decode tasks {plan.decode_num_cpus:g} CPU\n")
    header = ("size", "MP", "CRF at", "images", "network s/img", "CRF s/img", "net->CRF bytes/row",
              "decode img/s", "network img/s", "CRF img/s", "e2e img/s", "efficiency")
    print(" | ".join(header))
    for r in results:
        print(" | ".join([
            r["size"], f"{r['megapixels']:.2f}", r["resolution"], str(r["images"]), f"{r['network_s']:.3f}",
            f"{r['crf_s']:.3f}", f"{r['row_bytes']:,.0f} (pixels {r['pixels_bytes']:,.0f}, logits "
            f"{r['logits_bytes']:,.0f})", f"{r['rates']['read+decode']:.2f}", f"{r['rates']['network']:.2f}",
            f"{r['rates']['crf']:.2f}", f"{r['e2e']:.2f}", f"{r['efficiency']:.2f} (vs {r['slowest']})"]))
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
        by_res.setdefault(r["resolution"], {})[r["size"]] = r
    for resolution, cases in by_res.items():
        if len(cases) >= 2:
            (big_size, big), (small_size, small) = sorted(cases.items(), key=lambda kv: -kv[1]["megapixels"])[:2]
            print(f"CRF at {resolution}: {big_size} vs {small_size}: CRF s/img x{big['crf_s'] / small['crf_s']:.2f}, "
                  f"network s/img x{big['network_s'] / small['network_s']:.2f}, bytes/row "
                  f"x{big['row_bytes'] / small['row_bytes']:.2f}, pixels x{big['megapixels'] / small['megapixels']:.1f}")


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
                    results.append(measure(work=work, size=size, count=count, weights=weights, resolution=resolution,
                                           backend=args.crf_backend, crf=not args.no_crf, sampler=sampler,
                                           network_mode=args.network_mode))
        finally:
            ray.shutdown()
    report(results, backend=args.crf_backend, crf=not args.no_crf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
