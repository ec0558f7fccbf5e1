"""Dense-CRF benchmark: pydensecrf vs the torch port, same inputs, one run.

500 x 375 images, 21 classes, DeepLab-like scores (smooth random 1/8-resolution maps
upsampled x8 with align_corners=True), LargeFOV parameters, 10 iterations; a photo
(from the pydensecrf examples) and uniform noise (the worst case: ~14x the lattice).

    python bench/crf.py                       # CPU rows (+ CUDA rows if a GPU is present)
    python bench/crf.py --repeat 5 --threads 1 --batch 8 --normalization symmetric
    python bench/crf.py --skip-cpu --batch 8  # CUDA rows only (no pydensecrf needed)

On CPU the two backends alternate call by call (load drift on a shared machine hits both);
a line per image gives the median of the paired torch/pydensecrf ratios.

Prints ms/image (best of --repeat), bilateral/Gaussian lattice vertices, peak memory
(CPU: peak RSS above the pre-call RSS of one call in a fresh subprocess, sampled every
2 ms, so freed heap from earlier calls cannot hide it; CUDA: torch.cuda.max_memory_allocated)
and the ratio to pydensecrf. Every timed call starts without cached lattices (CPU and CUDA
alike), so each row includes building the position-only Gaussian lattice once.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.crf import lattice_size, load_params, refine, refine_batch
from pipeline.crf.backend_torch import clear_cache
from pipeline.data.synthetic import deeplab_like_logits, noise_image

#: pydensecrf's example photos: in the repository (tests/data), else beside it (older checkouts).
EXAMPLES = next(
    (
        path
        for path in (
            REPO_ROOT / "tests" / "data" / "pydensecrf-examples",
            REPO_ROOT.parent / "shared" / "data" / "pydensecrf-examples",
        )
        if path.is_dir()
    ),
    REPO_ROOT / "tests" / "data" / "pydensecrf-examples",
)
WIDTH, HEIGHT, CLASSES = 500, 375, 21


def photo() -> np.ndarray:
    from PIL import Image

    path = EXAMPLES / "im1.png"
    if not path.is_file():
        # No example photo: a synthetic smooth image with edges stands in.
        ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
        image = np.stack(
            [xs * 255 // WIDTH, ys * 255 // HEIGHT, ((xs // 60 + ys // 60) % 2) * 200],
            axis=-1,
        )
        return image.astype(np.uint8)
    with Image.open(path) as image:
        return np.array(image.convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC))


def noise() -> np.ndarray:
    return noise_image(seed=0, height=HEIGHT, width=WIDTH)


def logits(seed: int) -> np.ndarray:
    return deeplab_like_logits(seed=seed, num_classes=CLASSES, height=HEIGHT, width=WIDTH)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the starting value, sampled by a thread."""

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def _cpu_peak_child(name: str, backend: str, params: dict, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    image, scores = (photo(), logits(0)) if name == "photo" else (noise(), logits(1))
    with PeakRSS() as rss:
        refine(image, scores, params, backend=backend)
    queue.put(rss.delta)


def cpu_peak_bytes(name: str, backend: str, params: dict, threads: int) -> int:
    """Peak RSS increase of one refine call in a fresh process (spawned: no inherited heap)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_cpu_peak_child, args=(name, backend, params, threads, queue)
    )
    process.start()
    delta = queue.get()
    process.join()
    return int(delta)


def measure(fn, *, repeat: int, device: str) -> tuple[float, int]:
    """(best seconds, peak bytes; CPU peak is filled in separately) over ``repeat`` calls."""
    best, peak = float("inf"), 0
    for _ in range(repeat):
        if device.startswith("cuda"):
            clear_cache()  # as on CPU: the Gaussian lattice is part of every row
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            peak = max(peak, torch.cuda.max_memory_allocated())
        else:
            clear_cache()  # count the Gaussian lattice too (first-image cost)
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return best, peak


def measure_cpu_pair(base_fn, other_fn, *, repeat: int) -> tuple[float, float, float]:
    """pydensecrf and torch on CPU, alternating call by call, so that load drifting on a shared
    machine falls on both: (best base seconds, best other seconds, median of the paired ratios)."""
    bases, others = [], []
    for _ in range(repeat):
        bases.append(measure(base_fn, repeat=1, device="cpu")[0])
        others.append(measure(other_fn, repeat=1, device="cpu")[0])
    ratios = sorted(o / b for b, o in zip(bases, others))
    return min(bases), min(others), ratios[len(ratios) // 2]


def cuda_rows(
    image: np.ndarray, scores: np.ndarray, params, *, batch: int, repeat: int, device: str = "cuda"
) -> list[dict]:
    """The torch backend on ``device``: one image per ``refine`` call, then ``batch`` copies per
    ``refine_batch`` call; each warmed up once (CUDA context, allocator), best of ``repeat``.
    Rows: backend, device, batch, seconds per image, peak bytes (torch.cuda.max_memory_allocated)."""
    single = partial(refine, image, scores, params, backend="torch", device=device)
    batched = partial(
        refine_batch, [image] * batch, [scores] * batch, params, backend="torch", device=device
    )
    rows = []
    for size, fn in ((1, single), (batch, batched)):
        fn()  # warm-up
        seconds, peak = measure(fn, repeat=repeat, device=device)
        rows.append(
            {"backend": "torch", "device": device, "batch": size, "seconds_per_image": seconds / size,
             "peak_bytes": peak}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed calls per row (best is reported)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (pydensecrf is single-threaded)",
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="images per refine_batch call on CUDA"
    )
    parser.add_argument(
        "--params", default="largefov", help="preset name or JSON/YAML file"
    )
    parser.add_argument(
        "--normalization", default=None, help="override the preset's normalisation"
    )
    parser.add_argument(
        "--skip-cpu-torch",
        action="store_true",
        help="only pydensecrf on CPU (and CUDA rows)",
    )
    parser.add_argument(
        "--skip-cpu",
        action="store_true",
        help="no CPU rows at all (CUDA rows only; pydensecrf not needed)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.normalization:
        params = load_params({**params.to_dict(), "normalization": args.normalization})
    cpu_name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as info:
            cpu_name = next(
                line.split(":", 1)[1].strip()
                for line in info
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    print(
        f"CPU: {cpu_name}, {os.cpu_count()} cores; torch {torch.__version__}, {args.threads} torch thread(s)"
    )
    print(
        f"params: {params.to_dict()}; {WIDTH}x{HEIGHT}, {CLASSES} classes; best of {args.repeat}"
    )
    inputs = {"photo": (photo(), logits(0)), "noise": (noise(), logits(1))}
    header = f"{'image':6} {'backend':12} {'device':7} {'batch':>5} {'ms/image':>9} {'vs pyd':>7} {'bilat. M':>9} {'gauss. M':>9} {'peak MB':>8}"
    print(header)
    print("-" * len(header))
    if args.skip_cpu and not torch.cuda.is_available():
        print("# --skip-cpu and no CUDA device here: nothing to measure")
        return 0
    for name, (image, scores) in inputs.items():
        sizes = lattice_size(image, params)
        base_fn = partial(refine, image, scores, params, backend="pydensecrf")
        rows = []
        base = None  # no pydensecrf row with --skip-cpu
        if args.skip_cpu_torch and not args.skip_cpu:
            base, _ = measure(base_fn, repeat=args.repeat, device="cpu")
        elif not args.skip_cpu:
            base, t, median_ratio = measure_cpu_pair(
                base_fn,
                partial(refine, image, scores, params, backend="torch"),
                repeat=args.repeat,
            )
        if not args.skip_cpu:
            base_peak = cpu_peak_bytes(name, "pydensecrf", params.to_dict(), args.threads)
            rows.append(("pydensecrf", "cpu", 1, base, base_peak))
        if not (args.skip_cpu or args.skip_cpu_torch):
            print(f"{name}: torch/pydensecrf on CPU, median of {args.repeat} paired calls: {median_ratio:.2f}")
            rows.append(
                (
                    "torch",
                    "cpu",
                    1,
                    t,
                    cpu_peak_bytes(name, "torch", params.to_dict(), args.threads),
                )
            )
        if torch.cuda.is_available():
            for row in cuda_rows(image, scores, params, batch=args.batch, repeat=args.repeat):
                rows.append(
                    (row["backend"], row["device"], row["batch"], row["seconds_per_image"], row["peak_bytes"])
                )
        for backend, device, batch, seconds, peak in rows:
            ratio = f"{seconds / base:7.2f}" if base else f"{'n/a':>7}"
            print(
                f"{name:6} {backend:12} {device:7} {batch:5d} {seconds * 1000:9.1f} {ratio} "
                f"{sizes['bilateral']:9d} {sizes['gaussian']:9d} {peak / 2**20:8.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
