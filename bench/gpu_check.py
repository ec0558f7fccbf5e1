#!/usr/bin/env python3
"""GPU readiness in one command (issue #14): ``make gpu-check``.

Runs every CUDA path of the project once and writes what it saw to ``--out``
(``gpu_check.json`` and a short ``gpu_check.txt``; default ``./gpu-check/``):

* ``environment``    python, torch, CUDA/cuDNN, the device and its dense bf16 peak, CUDA init time;
* ``network_cpu``    (CPU) the demo model in fp32 through ``pipeline.inference.record_logits``;
* ``crf_cpu``        (CPU) the torch CRF on a tiny case, single and batched (+ pydensecrf parity
                     where pydensecrf is installed);
* ``network_bf16``   (CUDA) ``coarse_logits`` on CUDA (bf16 autocast + channels_last, as every job
                     runs it) against the same call on CPU in fp32, on a 513x513 and a 500x375
                     image, for the demo model and a full-width random-init LargeFOV (seed 0):
                     argmax label agreement and max |logit difference| (plus strict-fp32 CUDA,
                     TF32 off, to separate the bf16 error from the CUDA-vs-CPU one);
* ``crf_cuda``       (CUDA) the torch CRF on CUDA against the torch CRF on CPU (and pydensecrf where
                     installed), single images for every normalisation and one mixed-size batch
                     incl. uniform noise, held to the bars of tests/crf/test_parity.py;
* ``bench_network``  (CUDA) bench/network.py's GPU rows (321/513, batches 1/16/32, cudnn.benchmark
                     off as the pipeline runs and on), TFLOP/s and the fraction of the bf16 peak;
* ``bench_crf``      (CUDA) bench/crf.py's CUDA rows (photo and noise, single and batched).

Each part runs in its own try/except under its own time budget (SIGALRM), the results are
rewritten after every part, and a watchdog writes them and exits at ``--time-limit`` (420 s by
default) whatever is running, so the whole stays under 8 minutes. Without CUDA (or with
CUDA_VISIBLE_DEVICES="") the CUDA parts report ``skipped: no CUDA device`` and the CPU parts
run in well under a minute. Exit status: 0 when no part failed, errored or timed out, else 1.

Needs only torch plus numpy, pillow, safetensors and fsspec (pydensecrf optional), no Ray:
``make gpu-wheels`` downloads those wheels into ``.whl/``; ``make gpu-check`` installs them into
/tmp/gpu-site and passes ``--site /tmp/gpu-site``, which is *appended* to sys.path (packages the
machine already has, e.g. the numpy its torch was built with, take precedence).

    python bench/gpu_check.py --out "$OUT"
    python bench/gpu_check.py --parts network_bf16,crf_cuda --out gpu-check
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEMO_CHECKPOINT = REPO_ROOT / "pipeline" / "assets" / "demo" / "model.safetensors"
SAMPLES_DIR = REPO_ROOT / "pipeline" / "assets" / "samples"
EXAMPLE_DIRS = (
    REPO_ROOT / "tests" / "data" / "pydensecrf-examples",
    REPO_ROOT.parent / "shared" / "data" / "pydensecrf-examples",
)
#: The checkpoint header key of pipeline.weights (read directly: pipeline.weights needs fsspec and pipeline.io).
RECORD_KEY = "deeplab_v1.record"

#: The parity bars of tests/crf/test_parity.py (tests/core/test_gpu_check.py keeps them equal).
LABEL_AGREEMENT = 0.9999
MARGINAL_TOLERANCE = 1e-3
MARGINAL_TOLERANCE_NONE = 5e-3
#: bf16 network: an expectation, not a bar (reported as a warning when missed). A trained model's
#: labels should survive bf16 almost everywhere; random-init logits are near ties, so lower there.
BF16_EXPECTED_AGREEMENT = {"demo": 0.999, "largefov-random": 0.99}
#: docs/benchmarks.md's CUDA target for the CRF: <= 20 ms/image batched (500x375 photo).
CRF_CUDA_TARGET_MS = 20.0

DEFAULT_TIME_LIMIT_S = 420.0
SKIP_NO_CUDA = "skipped: no CUDA device"


class PartTimeout(BaseException):
    """Raised by SIGALRM when a part exceeds its budget (BaseException: library code won't swallow it)."""


class CheckFailed(Exception):
    """A part ran but a bar was missed."""


# --------------------------------------------------------------------------------------------
# helpers


def _load_bench(name: str):
    """bench/<name>.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def load_demo_model():
    """The bundled demo checkpoint: (model.eval() on CPU, record namespace with input_size/mean_bgr/channel_order)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.model import deeplab_v1

    with safe_open(str(DEMO_CHECKPOINT), "pt") as f:
        record = json.loads(f.metadata()[RECORD_KEY])
    model = deeplab_v1(record["variant"], num_classes=record["num_classes"], width=record["width"])
    model.load_state_dict(load_file(str(DEMO_CHECKPOINT)), strict=True)
    return model.eval(), SimpleNamespace(
        variant=record["variant"], num_classes=record["num_classes"], width=record["width"],
        input_size=int(record["input_size"]), mean_bgr=tuple(record["mean_bgr"]),
        channel_order=record["channel_order"],
    )


def mosaic(height: int, width: int, *, rows: int, cols: int, start: int = 0):
    """A real-sized RGB image tiled from the bundled sample JPEGs (the demo model's kind of content)."""
    import numpy as np
    from PIL import Image

    samples = sorted(SAMPLES_DIR.glob("*.jpg"))
    if not samples:
        raise FileNotFoundError(f"no sample images in {SAMPLES_DIR}")
    canvas = Image.new("RGB", (width, height))
    for r in range(rows):
        for c in range(cols):
            x0, x1 = c * width // cols, (c + 1) * width // cols
            y0, y1 = r * height // rows, (r + 1) * height // rows
            with Image.open(samples[(start + r * cols + c) % len(samples)]) as tile:
                canvas.paste(tile.convert("RGB").resize((x1 - x0, y1 - y0), Image.BICUBIC), (x0, y0))
    return np.ascontiguousarray(np.asarray(canvas))


def crf_photos() -> dict[str, Any]:
    """Photos for the CRF parity: pydensecrf's examples where present (tests/data), else mosaics.

    Landscape 500x375 and one portrait 375x500, so that a batch mixes sizes.
    """
    import numpy as np
    from PIL import Image

    folder = next((d for d in EXAMPLE_DIRS if (d / "im1.png").is_file()), None)
    photos = {}
    if folder is not None:
        for name, file, size in (("im1", "im1.png", (500, 375)), ("im2", "im2.png", (500, 375)),
                                 ("im3-portrait", "im3.png", (375, 500))):
            with Image.open(folder / file) as image:
                photos[name] = np.asarray(image.convert("RGB").resize(size, Image.BICUBIC)).copy()
    else:
        photos = {"mosaic-a": mosaic(375, 500, rows=2, cols=3, start=0),
                  "mosaic-b": mosaic(375, 500, rows=2, cols=2, start=6),
                  "mosaic-portrait": mosaic(500, 375, rows=3, cols=2, start=10)}
    return photos


def _shrink(image, factor: int):
    """``image`` resized to 1/``factor`` of each side (bicubic)."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)), Image.BICUBIC)).copy()


def _marginal_tolerance(normalization: str) -> float:
    return MARGINAL_TOLERANCE_NONE if normalization == "none" else MARGINAL_TOLERANCE


def compare_marginals(actual, expected) -> dict[str, float]:
    import numpy as np

    return {
        "max_abs_marginal_diff": float(np.abs(actual - expected).max()),
        "label_agreement": float(np.mean(actual.argmax(axis=0) == expected.argmax(axis=0))),
    }


def _pydensecrf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# parts: each takes (ctx, result) and fills ``result`` as it goes (so a timeout keeps what ran);
# ``result["headline"]`` is the summary line. A missed bar raises CheckFailed.


def part_environment(ctx, result: dict) -> None:
    import torch

    result.update(
        python=sys.version.split()[0], platform=platform.platform(), cpu_count=os.cpu_count(),
        torch=torch.__version__, torch_cuda=torch.version.cuda, torch_threads=torch.get_num_threads(),
        cuda_available=torch.cuda.is_available(), site_dirs=ctx.site_dirs,
    )
    from importlib import metadata

    versions = {}
    for dist in ("numpy", "pillow", "safetensors", "fsspec", "pydensecrf2"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    result["versions"] = versions
    result["dry_run"] = ctx.dry_run
    if not torch.cuda.is_available():
        result["headline"] = f"torch {torch.__version__}, python {result['python']}, no CUDA device"
        return
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    result["cuda_init_s"] = time.perf_counter() - start
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    peak = _load_bench("network").device_peak(name)
    result.update(
        device=name, device_count=torch.cuda.device_count(), capability=f"sm_{props.major}{props.minor}",
        total_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
        cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
        bf16_peak_tflops=peak, driver_cuda=getattr(torch._C, "_cuda_getDriverVersion", lambda: None)(),
    )
    result["headline"] = (f"{name} ({result['capability']}, {result['total_memory_gib']:.0f} GiB), torch "
                          f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN {result['cudnn']}, "
                          f"bf16 peak {peak or 'unknown'} TFLOP/s, CUDA init {result['cuda_init_s']:.1f} s")


def part_network_cpu(ctx, result: dict) -> None:
    """The demo model in fp32 on CPU through record_logits (every job's network entry point)."""
    import numpy as np
    from PIL import Image

    from pipeline.inference import labels_from_logits, record_logits
    from pipeline.preprocess import coarse_size

    model, record = load_demo_model()
    with Image.open(min(SAMPLES_DIR.glob("*.jpg"))) as image:
        sample = np.asarray(image.convert("RGB")).copy()
    images = [sample, mosaic(97, 130, rows=1, cols=1, start=1)]
    start = time.perf_counter()
    logits = record_logits(model, record, images, device="cpu")
    result["seconds"] = time.perf_counter() - start
    result["model"] = f"demo ({record.variant}, width {record.width}, {record.num_classes} classes)"
    result["input_size"] = record.input_size
    result["images"] = []
    for image, scores in zip(images, logits):
        h, w = image.shape[:2]
        labels = labels_from_logits(scores, height=h, width=w)
        expected = [record.num_classes, coarse_size(h), coarse_size(w)]
        result["images"].append({
            "image_shape": [h, w], "logits_shape": list(scores.shape), "expected_logits_shape": expected,
            "logits_dtype": str(scores.dtype), "labels_shape": list(labels.shape),
            "finite": bool(scores.isfinite().all()),
            "label_counts": np.bincount(labels.ravel(), minlength=record.num_classes).tolist(),
        })
        if list(scores.shape) != expected or list(labels.shape) != [h, w] or not result["images"][-1]["finite"]:
            raise CheckFailed(f"unexpected logits/labels for a {h}x{w} image: {result['images'][-1]}")
    shapes = ", ".join("x".join(map(str, im["logits_shape"])) for im in result["images"])
    result["headline"] = f"demo model fp32 on CPU: logits {shapes} in {result['seconds']:.2f} s"


def part_crf_cpu(ctx, result: dict) -> None:
    """The torch CRF on CPU on a tiny case (single, batched with two sizes); pydensecrf parity if installed."""
    import numpy as np

    from pipeline.crf import refine, refine_batch
    from pipeline.data.synthetic import deeplab_like_logits

    classes = 5
    images = [mosaic(48, 64, rows=1, cols=1, start=2), mosaic(40, 56, rows=1, cols=1, start=3)]
    logits = [deeplab_like_logits(seed=i, num_classes=classes, height=im.shape[0], width=im.shape[1])
              for i, im in enumerate(images)]
    start = time.perf_counter()
    single = refine(images[0], logits[0], "largefov", backend="torch", device="cpu")
    batched = refine_batch(images, logits, "largefov", backend="torch", device="cpu")
    result["seconds"] = time.perf_counter() - start
    labels = single.argmax(axis=0)
    result.update(
        marginals_shape=list(single.shape), labels_shape=list(labels.shape),
        batched_shapes=[list(q.shape) for q in batched],
        marginals_sum_to_one=bool(np.allclose(single.sum(axis=0), 1.0, atol=1e-4)),
        batched_vs_single=compare_marginals(batched[0], single),
        changed_by_crf=float(np.mean(labels != logits[0].argmax(axis=0))),
    )
    if result["marginals_shape"] != [classes, 48, 64] or not result["marginals_sum_to_one"]:
        raise CheckFailed(f"unexpected marginals: shape {result['marginals_shape']}")
    if result["batched_vs_single"]["max_abs_marginal_diff"] > MARGINAL_TOLERANCE:
        raise CheckFailed(f"batched differs from single: {result['batched_vs_single']}")
    headline = f"torch CRF on CPU: labels {labels.shape[0]}x{labels.shape[1]}, batch of 2 ok"
    if _pydensecrf_available():
        reference = refine(images[0], logits[0], "largefov", backend="pydensecrf")
        result["vs_pydensecrf"] = compare_marginals(single, reference)
        headline += (f"; vs pydensecrf max |dQ| {result['vs_pydensecrf']['max_abs_marginal_diff']:.2g}, "
                     f"labels {result['vs_pydensecrf']['label_agreement']:.4%}")
        if (result["vs_pydensecrf"]["max_abs_marginal_diff"] > MARGINAL_TOLERANCE
                or result["vs_pydensecrf"]["label_agreement"] < LABEL_AGREEMENT):
            raise CheckFailed(f"torch CPU vs pydensecrf: {result['vs_pydensecrf']}")
    else:
        result["vs_pydensecrf"] = "pydensecrf not installed"
    result["headline"] = headline


def _network_compare(reference, candidate, images) -> dict[str, Any]:
    """Coarse logits of two runs of the same images: logit differences and full-resolution label agreement."""
    from pipeline.inference import labels_from_logits
    from pipeline.preprocess import upsample_logits

    rows = []
    for image, ref, cand in zip(images, reference, candidate):
        h, w = image.shape[:2]
        ref, cand = ref.float(), cand.float()
        labels_ref = labels_from_logits(ref, height=h, width=w)
        labels_cand = labels_from_logits(cand, height=h, width=w)
        disagree = labels_ref != labels_cand
        row = {
            "image_shape": [h, w],
            "max_abs_logit_diff": float((ref - cand).abs().max()),
            "max_abs_logit": float(ref.abs().max()),
            "label_agreement": float(1.0 - disagree.mean()),
            "coarse_label_agreement": float((ref.argmax(0) == cand.argmax(0)).float().mean()),
        }
        if disagree.any():  # how close to a tie the fp32 scores were where the labels differ
            top2 = upsample_logits(ref, height=h, width=w).topk(2, dim=0).values
            margin = (top2[0] - top2[1]).numpy()
            row["max_fp32_margin_where_labels_differ"] = float(margin[disagree].max())
        rows.append(row)
    return {"images": rows,
            "label_agreement": min(r["label_agreement"] for r in rows),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows)}


def part_network_bf16(ctx, result: dict) -> None:
    """coarse_logits on CUDA (bf16 autocast + channels_last) vs on CPU (fp32), real-sized images."""
    import copy

    import torch

    from pipeline.inference import coarse_logits, fit_for_network
    from pipeline.model import deeplab_v1
    from pipeline.preprocess import prepare_batch

    device = ctx.device
    demo, record = load_demo_model()
    torch.manual_seed(0)
    # --dry-run (CPU, tests the script): a quarter-width random model and small images.
    random_width = 0.25 if ctx.dry_run else 1.0
    models = {"demo": (demo, record.mean_bgr, record.channel_order),
              "largefov-random": (deeplab_v1("largefov", width=random_width).eval(), record.mean_bgr, "BGR")}
    if ctx.dry_run:
        raw, input_size = [mosaic(129, 129, rows=1, cols=1), mosaic(97, 129, rows=1, cols=2, start=4)], 129
    else:
        raw, input_size = [mosaic(513, 513, rows=2, cols=2), mosaic(375, 500, rows=2, cols=3, start=4)], 513
    result["inputs"] = [list(im.shape[:2]) for im in raw] + [f"padded to {input_size}x{input_size}, one batch"]
    result["models"] = {}
    warnings = result.setdefault("warnings", [])
    for name, (model, mean_bgr, channel_order) in models.items():
        images = [fit_for_network(im, input_size=input_size, channel_order=channel_order) for im in raw]
        entry = result["models"][name] = {}
        start = time.perf_counter()
        reference = coarse_logits(model, images, input_size=input_size, mean_bgr=mean_bgr, device="cpu")
        entry["cpu_fp32_s"] = time.perf_counter() - start

        cuda_model = copy.deepcopy(model).to(device)
        # Strict fp32 on CUDA (no autocast, TF32 off): the CUDA-vs-CPU error alone.
        tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode():
                batch = prepare_batch(images, input_size=input_size, mean_bgr=mean_bgr).to(device)
                scores = cuda_model(batch).float().cpu()
            strict = [scores[i, :, : r.shape[1], : r.shape[2]] for i, r in enumerate(reference)]
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        entry["cuda_fp32_vs_cpu_fp32"] = _network_compare(reference, strict, images)

        # The pipeline's CUDA path: bf16 autocast + channels_last (model and batch).
        coarse_logits(cuda_model, images, input_size=input_size, mean_bgr=mean_bgr, device=device)  # warm-up
        _cuda_sync()
        start = time.perf_counter()
        bf16 = coarse_logits(cuda_model, images, input_size=input_size, mean_bgr=mean_bgr, device=device)
        entry["cuda_bf16_s"] = time.perf_counter() - start
        entry["weights_channels_last"] = bool(
            cuda_model.conv1_1.weight.is_contiguous(memory_format=torch.channels_last))
        entry["logits_dtype"] = str(bf16[0].dtype)
        entry["cuda_bf16_vs_cpu_fp32"] = _network_compare(reference, bf16, images)
        expected = BF16_EXPECTED_AGREEMENT[name]
        if entry["cuda_bf16_vs_cpu_fp32"]["label_agreement"] < expected:
            warnings.append(f"{name}: bf16 label agreement {entry['cuda_bf16_vs_cpu_fp32']['label_agreement']:.4%} "
                            f"< expected {expected:.2%}")
        del cuda_model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    parts = [f"{name} labels {m['cuda_bf16_vs_cpu_fp32']['label_agreement']:.4%}, "
             f"max |dlogit| {m['cuda_bf16_vs_cpu_fp32']['max_abs_logit_diff']:.3g} "
             f"(of {max(r['max_abs_logit'] for r in m['cuda_bf16_vs_cpu_fp32']['images']):.3g}; "
             f"strict fp32 {m['cuda_fp32_vs_cpu_fp32']['max_abs_logit_diff']:.2g})"
             for name, m in result["models"].items()]
    result["headline"] = f"{'bf16+channels_last' if device == 'cuda' else device} vs CPU fp32: " + "; ".join(parts)


def part_crf_cuda(ctx, result: dict) -> None:
    """The torch CRF on CUDA vs on CPU (and pydensecrf if installed): every normalisation single, one batch."""
    import numpy as np

    from pipeline.crf import refine, refine_batch
    from pipeline.crf.params import NORMALIZATIONS
    from pipeline.data.synthetic import deeplab_like_logits, noise_image

    device = ctx.device
    photos = crf_photos()
    if ctx.dry_run:  # small copies: the same code paths in seconds on CPU
        photos = {name: _shrink(im, 4) for name, im in photos.items()}
    result["photos"] = {name: list(im.shape[:2]) for name, im in photos.items()}
    logits = {name: deeplab_like_logits(seed=i, height=im.shape[0], width=im.shape[1])
              for i, (name, im) in enumerate(photos.items())}
    with_pydensecrf = _pydensecrf_available()
    result["pydensecrf"] = with_pydensecrf
    first = next(iter(photos))
    refine(photos[first], logits[first], backend="torch", device=device)  # warm-up (CUDA context, kernels)
    failures = []
    cpu_results: dict[tuple[str, str], Any] = {}
    single = result["single"] = []
    for normalization in NORMALIZATIONS:
        params = {"preset": "largefov", "normalization": normalization}
        tolerance = _marginal_tolerance(normalization)
        for name, image in photos.items():
            q_cuda = refine(image, logits[name], params, backend="torch", device=device)
            q_cpu = cpu_results[name, normalization] = refine(image, logits[name], params, backend="torch")
            row = {"image": name, "normalization": normalization, "tolerance": tolerance,
                   "vs_torch_cpu": compare_marginals(q_cuda, q_cpu),
                   "changed_by_crf": float(np.mean(q_cpu.argmax(0) != logits[name].argmax(0)))}
            if with_pydensecrf:
                row["vs_pydensecrf"] = compare_marginals(
                    q_cuda, refine(image, logits[name], params, backend="pydensecrf"))
            single.append(row)
            for key in ("vs_torch_cpu", "vs_pydensecrf"):
                if key in row and (row[key]["max_abs_marginal_diff"] > tolerance
                                   or row[key]["label_agreement"] < LABEL_AGREEMENT):
                    failures.append(f"single {name}/{normalization} {key}: {row[key]}")
    # One mixed batch (landscape, portrait, uniform noise) per normalisation, as test_cuda_batch_matches_pydensecrf.
    batch_images = dict(photos)
    noise_size = (94, 125) if ctx.dry_run else (375, 500)
    batch_images["noise"] = noise_image(seed=1, height=noise_size[0], width=noise_size[1])
    noise_logits = deeplab_like_logits(seed=20, height=noise_size[0], width=noise_size[1])
    batch_logits = {**logits, "noise": noise_logits}
    batched = result["batched"] = []
    for normalization in ("after", "symmetric"):
        params = {"preset": "largefov", "normalization": normalization}
        names = list(batch_images)
        start = time.perf_counter()
        qs = refine_batch([batch_images[n] for n in names], [batch_logits[n] for n in names], params,
                          backend="torch", device=device)
        seconds = time.perf_counter() - start
        # Forced into one group per image (max_bytes=1): the grouping path on CUDA.
        qs_split = refine_batch([batch_images[n] for n in names], [batch_logits[n] for n in names], params,
                                backend="torch", device=device, max_bytes=1)
        for name, q, q_split in zip(names, qs, qs_split):
            if (name, normalization) not in cpu_results:
                cpu_results[name, normalization] = refine(batch_images[name], batch_logits[name], params,
                                                          backend="torch")
            row = {"image": name, "normalization": normalization, "batch": len(names),
                   "vs_torch_cpu": compare_marginals(q, cpu_results[name, normalization]),
                   "one_group_vs_per_image_groups": compare_marginals(q, q_split)}
            if with_pydensecrf:
                row["vs_pydensecrf"] = compare_marginals(
                    q, refine(batch_images[name], batch_logits[name], params, backend="pydensecrf"))
            batched.append(row)
            for key in ("vs_torch_cpu", "vs_pydensecrf", "one_group_vs_per_image_groups"):
                if key in row and (row[key]["max_abs_marginal_diff"] > MARGINAL_TOLERANCE
                                   or row[key]["label_agreement"] < LABEL_AGREEMENT):
                    failures.append(f"batched {name}/{normalization} {key}: {row[key]}")
        result.setdefault("batch_seconds", {})[normalization] = seconds
    rows = single + batched
    result["worst"] = {
        "max_abs_marginal_diff_vs_torch_cpu": max(r["vs_torch_cpu"]["max_abs_marginal_diff"] for r in rows),
        "min_label_agreement_vs_torch_cpu": min(r["vs_torch_cpu"]["label_agreement"] for r in rows),
    }
    if with_pydensecrf:
        result["worst"]["max_abs_marginal_diff_vs_pydensecrf"] = max(
            r["vs_pydensecrf"]["max_abs_marginal_diff"] for r in rows)
        result["worst"]["min_label_agreement_vs_pydensecrf"] = min(
            r["vs_pydensecrf"]["label_agreement"] for r in rows)
    result["failures"] = failures
    worst = result["worst"]
    result["headline"] = (f"{len(single)} single + {len(batched)} batched vs torch CPU: max |dQ| "
                          f"{worst['max_abs_marginal_diff_vs_torch_cpu']:.2g}, labels >= "
                          f"{worst['min_label_agreement_vs_torch_cpu']:.4%}"
                          + (f"; vs pydensecrf max |dQ| {worst['max_abs_marginal_diff_vs_pydensecrf']:.2g}"
                             if with_pydensecrf else "; pydensecrf not installed"))
    if failures:
        raise CheckFailed(f"{len(failures)} comparison(s) past the bars: {failures[:3]}")


def part_bench_network(ctx, result: dict) -> None:
    """bench/network.py's CUDA rows and the fraction of the bf16 peak."""
    bench = _load_bench("network")
    rows = result["rows"] = []
    if ctx.dry_run:  # the CPU row of a tiny input: exercises the calls, measures nothing useful
        rows += bench.run(sizes=(65,), cpu_batches=(1,), gpu_batches=(), repeat=1, warmup=0)
    else:
        # As the pipeline runs (cudnn.benchmark untouched), then with cudnn autotuning; one call per
        # configuration, so that rows measured before a timeout are kept.
        configs = [(16, None), (1, None), (32, None), (16, True), (32, True)]
        for batch, cudnn_benchmark in configs:
            rows += bench.run(sizes=(321, 513), gpu_batches=(batch,), skip_cpu=True, repeat=5, warmup=2,
                              cudnn_benchmark=cudnn_benchmark)
    result["table"] = [bench.HEADER] + [bench.format_row(r) for r in rows]
    with_peak = [r for r in rows if r["fraction_of_peak"] is not None]
    best = max(rows, key=lambda r: r["tflops"])
    result["best"] = best
    result["best_fraction_of_peak"] = best["fraction_of_peak"]
    peak = (f"{100 * best['fraction_of_peak']:.1f}% of {best['peak_tflops']:.0f}"
            if best["fraction_of_peak"] is not None else "peak unknown")
    result["rows_with_known_peak"] = len(with_peak)
    result["headline"] = (f"best {best['tflops']:.1f} TFLOP/s ({peak}) at {best['size']}^2 batch {best['batch']}"
                          f" (cudnn.benchmark={best['cudnn_benchmark']}), {best['images_per_s']:.0f} images/s")


def part_bench_crf(ctx, result: dict) -> None:
    """bench/crf.py's CUDA rows: photo and uniform noise, single and batched (+ pydensecrf once, if installed)."""
    from functools import partial

    from pipeline.crf import lattice_size, load_params, refine

    bench = _load_bench("crf")
    params = load_params("largefov")
    inputs = {"photo": (bench.photo(), bench.logits(0)), "noise": (bench.noise(), bench.logits(1))}
    batch, repeat = (2, 1) if ctx.dry_run else (8, 3)
    if ctx.dry_run:  # a corner of each: the same calls in seconds on CPU
        inputs = {name: (image[:64, :80], scores[:, :64, :80].copy()) for name, (image, scores) in inputs.items()}
    rows = result["rows"] = []
    for name, (image, scores) in inputs.items():
        sizes = lattice_size(image, params)
        for row in bench.cuda_rows(image, scores, params, batch=batch, repeat=repeat, device=ctx.device):
            rows.append({"image": name, **row, "ms_per_image": row["seconds_per_image"] * 1e3,
                         "peak_mb": row["peak_bytes"] / 2**20, "bilateral_vertices": sizes["bilateral"],
                         "gaussian_vertices": sizes["gaussian"]})
    if _pydensecrf_available():  # one pydensecrf core, for the speed-up
        for name, (image, scores) in inputs.items():
            seconds, _ = bench.measure(partial(refine, image, scores, params, backend="pydensecrf"),
                                       repeat=2, device="cpu")
            rows.append({"image": name, "backend": "pydensecrf", "device": "cpu", "batch": 1,
                         "ms_per_image": seconds * 1e3})
    base = {r["image"]: r["ms_per_image"] for r in rows if r["backend"] == "pydensecrf"}
    for r in rows:
        r["speedup_vs_pydensecrf"] = base[r["image"]] / r["ms_per_image"] if r["image"] in base else None
    result["table"] = [f"{'image':6} {'backend':10} {'device':6} {'batch':>5} {'ms/image':>9} {'x pyd':>6} {'peak MB':>8}"]
    for r in rows:
        speedup = f"{r['speedup_vs_pydensecrf']:6.1f}" if r["speedup_vs_pydensecrf"] else f"{'n/a':>6}"
        peak = f"{r['peak_mb']:8.0f}" if r["device"].startswith("cuda") else f"{'n/a':>8}"
        result["table"].append(f"{r['image']:6} {r['backend']:10} {r['device']:6} {r['batch']:5d} "
                               f"{r['ms_per_image']:9.1f} {speedup} {peak}")
    photo_batched = next(r for r in rows if r["image"] == "photo" and r["backend"] == "torch" and r["batch"] > 1)
    result["photo_batched_ms_per_image"] = photo_batched["ms_per_image"]
    result["target_ms_per_image"] = CRF_CUDA_TARGET_MS
    result["target_met"] = None if ctx.dry_run else photo_batched["ms_per_image"] <= CRF_CUDA_TARGET_MS
    target = "n/a" if ctx.dry_run else "met" if result["target_met"] else "missed"
    noise_batched = next(r for r in rows if r["image"] == "noise" and r["backend"] == "torch" and r["batch"] > 1)
    result["headline"] = (f"{ctx.device} batched x{batch}: photo {photo_batched['ms_per_image']:.1f} ms/image "
                          f"(target <= {CRF_CUDA_TARGET_MS:.0f}: {target}), "
                          f"noise {noise_batched['ms_per_image']:.1f} ms/image")


#: name -> (function, needs CUDA, time budget in seconds on an H200). The budgets add up to 405 s,
#: under the 420 s watchdog, so that with start-up and unpacking the wheels all stays under 8 minutes.
PARTS: dict[str, tuple[Callable, bool, float]] = {
    "environment": (part_environment, False, 45),
    "network_cpu": (part_network_cpu, False, 25),
    "crf_cpu": (part_crf_cpu, False, 25),
    "network_bf16": (part_network_bf16, True, 90),
    "crf_cuda": (part_crf_cuda, True, 100),
    "bench_network": (part_bench_network, True, 60),
    "bench_crf": (part_bench_crf, True, 60),
}


# --------------------------------------------------------------------------------------------
# running and reporting


def third_party_modules(baseline: set[str]) -> list[str]:
    """Top-level non-stdlib modules imported since ``baseline`` (the modules after ``import torch``)."""
    names = {name.split(".")[0] for name in sys.modules}
    stdlib = set(sys.stdlib_module_names)
    ours = {"pipeline", "bench_network", "bench_crf", "__main__", "cython_runtime"}
    return sorted(n for n in names - baseline if n not in stdlib and not n.startswith("_") and n not in ours)


def summary_text(report: dict) -> str:
    env = report["parts"].get("environment", {}).get("result", {})
    first = f"gpu-check {report['started']} ({report.get('wall_s', 0):.0f} s): "
    lines = [first + env.get("headline", "environment not recorded")]
    if report.get("mode") == "dry-run on CPU":
        lines.append("DRY RUN: the CUDA parts ran on the CPU with small inputs; their numbers mean nothing")
    for name, part in report["parts"].items():
        if name == "environment":
            continue
        status = part["status"]
        text = part.get("result", {}).get("headline") or part.get("error") or ""
        lines.append(f"  {name:<14} {status:<24} {text}")
        for warning in part.get("result", {}).get("warnings", []):
            lines.append(f"  {'':<14} {'warning':<24} {warning}")
    for name in ("bench_network", "bench_crf"):
        table = report["parts"].get(name, {}).get("result", {}).get("table")
        if table:
            lines += ["", f"{name}:"] + [f"  {line}" for line in table]
    lines.append(f"result: {report['verdict']}")
    return "\n".join(lines) + "\n"


class Runner:
    def __init__(self, out: Path, time_limit: float, site_dirs: list[str], *, dry_run: bool = False):
        self.out = out
        self.time_limit = time_limit
        self.site_dirs = site_dirs
        self.dry_run = dry_run
        #: where the CUDA parts run: "cuda", or "cpu" with --dry-run
        self.device = "cpu" if dry_run else "cuda"
        self.started = time.perf_counter()
        self.lock = threading.Lock()
        self.current: str | None = None
        self.report: dict[str, Any] = {
            "schema": 1,
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "time_limit_s": time_limit,
            "parts": {},
            "verdict": "running",
        }

    def write(self) -> None:
        with self.lock:
            self.report["wall_s"] = time.perf_counter() - self.started
            self.out.mkdir(parents=True, exist_ok=True)
            for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str) + "\n"),
                               ("gpu_check.txt", summary_text(self.report))):
                tmp = self.out / f".{name}.tmp"
                tmp.write_text(text)
                tmp.replace(self.out / name)

    def watchdog(self) -> None:
        """At the global limit: record the running part as timed out, write everything, exit now."""
        with self.lock:
            if self.current is not None:
                part = self.report["parts"][self.current]
                part["status"] = "timeout"
                part["error"] = f"killed at the global --time-limit of {self.time_limit:.0f} s"
            self.report["verdict"] = f"incomplete: global time limit {self.time_limit:.0f} s reached"
        self.write()
        sys.stdout.write(summary_text(self.report))
        sys.stdout.flush()
        os._exit(3)

    def run_part(self, name: str, fn: Callable, needs_cuda: bool, budget: float, cuda: bool) -> None:
        part: dict[str, Any] = {"needs_cuda": needs_cuda, "budget_s": budget, "result": {}}
        self.report["parts"][name] = part
        if needs_cuda and not cuda and not self.dry_run:
            part["status"] = SKIP_NO_CUDA
            self.write()
            return
        left = self.time_limit - (time.perf_counter() - self.started) - 5
        budget = min(budget, left)
        if left <= 1:
            part["status"] = "skipped: no time left"
            self.write()
            return
        part["status"] = "running"
        self.current = name
        self.write()

        def on_alarm(signum, frame):
            raise PartTimeout(f"{name}: past its budget of {budget:.0f} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget)
        start = time.perf_counter()
        try:
            fn(self, part["result"])
            _cuda_sync()
            part["status"] = "ok"
        except PartTimeout as exc:
            part["status"] = "timeout"
            part["error"] = str(exc)
            part["traceback"] = traceback.format_exc()
        except CheckFailed as exc:
            part["status"] = "fail"
            part["error"] = str(exc)
            part["traceback"] = traceback.format_exc()
        except Exception as exc:  # noqa: BLE001 - each part reports its own failure, the others still run
            part["status"] = "error"
            part["error"] = f"{type(exc).__name__}: {exc}"
            part["traceback"] = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            part["seconds"] = time.perf_counter() - start
            self.current = None
        if part["status"] != "ok":
            try:  # leave the device usable for the next part
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001, S110 - best effort; the part's own error is already recorded
                pass
        print(f"[gpu-check] {name}: {part['status']} ({part['seconds']:.1f} s) "
              f"{part['result'].get('headline') or part.get('error', '')}", flush=True)
        self.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.txt")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                        help=f"seconds after which everything is written and the script exits (default {DEFAULT_TIME_LIMIT_S:.0f})")
    parser.add_argument("--site", action="append", default=[],
                        help="folder of extra packages (pip --target) appended to sys.path; repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the CUDA parts on the CPU with small inputs: tests this script, measures nothing")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    # Appended, not prepended: what the machine has (its torch's numpy) wins; ours fill the gaps.
    site_dirs = [str(Path(s).resolve()) for s in args.site]
    for site in site_dirs:
        if site not in sys.path:
            sys.path.append(site)
    # The script's own folder (sys.path[0]) holds bench/pipeline.py, which would shadow the
    # pipeline package wherever it is not installed (the GPU machine): the repository goes first.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (BENCH_DIR, REPO_ROOT)]
    sys.path.insert(0, str(REPO_ROOT))

    runner = Runner(Path(args.out), args.time_limit, site_dirs, dry_run=args.dry_run)
    timer = threading.Timer(args.time_limit, runner.watchdog)
    timer.daemon = True
    timer.start()
    try:
        import torch
    except ImportError as exc:
        runner.report["verdict"] = f"error: torch is not importable ({exc})"
        runner.write()
        print(runner.report["verdict"], file=sys.stderr)
        return 1
    baseline = {name.split(".")[0] for name in sys.modules}
    cuda = torch.cuda.is_available()
    runner.report["cuda"] = cuda
    runner.report["mode"] = "dry-run on CPU" if args.dry_run else "cuda" if cuda else "cpu-only"
    for name in names:
        fn, needs_cuda, budget = PARTS[name]
        runner.run_part(name, fn, needs_cuda, budget, cuda)
    timer.cancel()
    runner.report["imported_beyond_torch"] = third_party_modules(baseline)
    runner.report["imported_with_torch"] = sorted(
        n for n in baseline if n not in sys.stdlib_module_names and not n.startswith("_"))
    bad = {n: p["status"] for n, p in runner.report["parts"].items()
           if p["status"] in ("fail", "error", "timeout")}
    runner.report["verdict"] = "ok" if not bad else f"problems: {bad}"
    runner.report["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    runner.write()
    sys.stdout.write(summary_text(runner.report))
    print(f"[gpu-check] wrote {Path(args.out) / 'gpu_check.json'} and gpu_check.txt")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
