"""Per-stage and end-to-end throughput of the segment pipeline, side by side in one run.

Measures, on the same local Ray instance and the same resource plan the job uses:

* read+decode alone (CPU tasks), network alone (its actor pool, on decoded rows
  materialised beforehand), CRF alone (its actor pool, on materialised network
  outputs) and the whole pipeline (read -> ... -> write to a temporary folder);
* efficiency = end-to-end images/s / images/s of the slowest stage alone (target >= 0.85);
* bytes per image between the network and the CRF stage (coarse fp16 logits + RGB
  pixels + small columns) and peak RSS of a CRF worker.

Images are synthetic (flat rectangles + noise) JPEGs of ``--size`` pixels. Actor
start-up (model load) is inside every timing, as it is in a real run.

    python bench/pipeline.py --images 200 --size 96x128
    python bench/pipeline.py --weights s3://bucket/largefov.safetensors --size 375x500 --crf-backend torch
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

TARGET_EFFICIENCY = 0.85


def make_corpus(folder: Path, *, count: int, height: int, width: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
            image[y : y + height // 2, x : x + width // 2] = rng.integers(0, 255, 3)
        noise = rng.integers(-12, 12, image.shape)
        image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:05d}.jpg", quality=90)


def tiny_weights(folder: Path, *, input_size: int) -> str:
    """A random-weight LargeFOV (width 0.125, 21 classes) when no checkpoint is given or bundled."""
    import torch

    from pipeline.constants import VOC_CLASSES, voc_palette
    from pipeline.model import deeplab_v1
    from pipeline.weights import ModelRecord, save_checkpoint

    torch.manual_seed(0)
    model = deeplab_v1("largefov", num_classes=21, width=0.125)
    record = ModelRecord(variant="largefov", num_classes=21, width=0.125, class_names=VOC_CLASSES,
                         palette=tuple(voc_palette(21)), input_size=input_size,
                         source="bench (random weights)")
    path = folder / "bench-tiny.safetensors"
    save_checkpoint(path, model=model, record=record)
    return str(path)


def timed(label: str, fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="96x128", help="HxW of the synthetic images")
    parser.add_argument("--weights", help="checkpoint; default: the demo model, else a random tiny one")
    parser.add_argument("--crf-backend", default="pydensecrf", choices=("pydensecrf", "torch"))
    parser.add_argument("--no-crf", action="store_true")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                            os.environ.get("PYTHONPATH")]))
    import logging

    import ray
    import ray.data

    from pipeline.config import from_mapping
    from pipeline.crf import default_preset, load_params
    from pipeline import graph
    from pipeline.execution import configure_context
    from pipeline.io.sources import plan_input
    from pipeline.outputs import OutputLayout
    from pipeline.resources import cluster_resources, plan_resources
    from pipeline.stages import RunTally
    from pipeline.preprocess import aligned_size
    from pipeline.stages import CRFStage, DecodeStage, NetworkStage, ReadBytes
    from pipeline.weights import DEMO_CHECKPOINT, read_record

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    make_corpus(work / "in", count=args.images, height=height, width=width)
    weights = args.weights or (str(DEMO_CHECKPOINT) if Path(DEMO_CHECKPOINT).exists() else tiny_weights(work, input_size=aligned_size(max(height, width))))
    record = read_record(weights)
    config = from_mapping({
        "input": {"uri": str(work / "in")}, "output": {"uri": str(work / "out")},
        "model": {"weights": weights}, "crf": {"enabled": not args.no_crf, "backend": args.crf_backend},
        "ray": {"no_progress_timeout_s": 300, "progress": False},
    })
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    configure_context(no_progress_timeout_s=config.ray.no_progress_timeout_s)
    cpus, gpus, custom = cluster_resources()
    plan = plan_resources(config, cpus=cpus, gpus=gpus, custom=custom)
    params = load_params(config.crf.params or default_preset(record.variant)) if config.crf.enabled else None
    source = plan_input(config.input.uri)
    layout = OutputLayout(uri=config.output.uri)

    def pending():  # the job's own index + resume steps (nothing under the output yet)
        index = graph.input_dataset(source, config=config, tally=RunTally())
        return graph.pending_dataset(index, layout=layout, done_files=[], storage_files=[], prior_rows=0,
                                     may_repeat=False, limit=0, read_batch_size=plan.read_batch_size,
                                     tally=RunTally())

    items = pending().materialize()
    n = items.count()

    # 1. read + decode alone
    decoded_ds = items.map_batches(ReadBytes(), batch_format="pyarrow", num_cpus=plan.read_num_cpus).map_batches(
        DecodeStage(max_pixels=config.decode.max_pixels), batch_format="pyarrow", batch_size=plan.decode_batch_size,
        num_cpus=plan.decode_num_cpus, memory=plan.decode_memory_bytes)
    decoded, t_decode = timed("decode", decoded_ds.materialize)

    # 2. network alone, on materialised decoded rows
    net_ds = decoded.map_batches(
        NetworkStage, batch_format="pyarrow", batch_size=plan.network_batch_size,
        fn_constructor_kwargs={"weights": weights, "device": plan.network_device, "threads": plan.network_threads},
        compute=ray.data.ActorPoolStrategy(size=plan.network_pool, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.network_num_cpus, num_gpus=plan.network_num_gpus)
    network_out, t_network = timed("network", net_ds.materialize)
    sizes = network_out.map_batches(
        lambda t: {"bytes": np.asarray([t.slice(i, 1).nbytes for i in range(t.num_rows)]),
                   "logits": np.asarray([len(b or b"") for b in t.column("logits").to_pylist()])},
        batch_format="pyarrow").to_pandas()

    # 3. CRF alone, on materialised network outputs
    crf_ds = network_out.map_batches(
        CRFStage, batch_format="pyarrow", batch_size=plan.crf_batch_size,
        fn_constructor_kwargs={"params": params, "backend": config.crf.backend, "device": plan.crf_device,
                               "threads": max(1, int(plan.crf_num_cpus)), "max_pixels": config.crf.max_pixels},
        compute=ray.data.ActorPoolStrategy(size=plan.crf_pool, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.crf_num_cpus, num_gpus=plan.crf_num_gpus, resources=plan.crf_resources or None)
    crf_out, t_crf = timed("crf", crf_ds.materialize)
    crf_rss = float(max(crf_out.select_columns(["crf_rss_mb"]).to_pandas()["crf_rss_mb"]))
    del decoded, network_out, crf_out

    # 4. the whole pipeline, read to write
    ds = graph.work_dataset(pending(), config=config, plan=plan, weights=weights, crf_params=params,
                            layout=layout, run_id="bench", palette=record.palette,
                            crf_record={"backend": config.crf.backend, **params.to_dict()} if params else None,
                            metadata=None)
    _, t_e2e = timed("e2e", lambda: sum(b.num_rows for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    ray.shutdown()

    rates = {"read+decode": n / t_decode, "network": n / t_network, "crf": n / t_crf}
    slowest = min(rates, key=rates.get)
    e2e = n / t_e2e
    efficiency = e2e / rates[slowest]
    print(f"images: {n} synthetic JPEG {height}x{width}; model {record.variant} width {record.width} "
          f"({record.num_classes} classes, input_size {record.input_size}); CRF "
          f"{config.crf.backend if params else 'off'}; Ray: {cpus:g} CPUs, {gpus:g} GPUs")
    print(f"plan: network {plan.network_pool} actor(s) x {plan.network_num_cpus:g} CPU/{plan.network_num_gpus:g} GPU "
          f"batch {plan.network_batch_size}; CRF {plan.crf_pool} actor(s) x {plan.crf_num_cpus:g} CPU "
          f"batch {plan.crf_batch_size}; decode tasks {plan.decode_num_cpus:g} CPU")
    for name, rate in rates.items():
        print(f"  {name:<12} alone : {rate:8.2f} images/s")
    print(f"  {'pipeline':<12} e2e   : {e2e:8.2f} images/s")
    print(f"efficiency (e2e / slowest stage alone = {slowest}): {efficiency:.2f} (target >= {TARGET_EFFICIENCY})")
    print(f"bytes per image network -> CRF: {sizes['bytes'].mean():,.0f} per row "
          f"(coarse fp16 logits {sizes['logits'].mean():,.0f}; the rest is the RGB image and small columns)")
    print(f"peak RSS per CRF worker: {crf_rss:,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
