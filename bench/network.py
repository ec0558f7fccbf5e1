"""Network throughput: DeepLab-LargeFOV images/s at 321x321 and 513x513.

CPU (float32) always (unless --skip-cpu); CUDA with bf16 autocast and channels_last when a
GPU is present (as pipeline/inference.py runs it), with the achieved TFLOP/s next to the
device's dense bf16 peak. FLOPs are counted from the convolutions actually run (2 x MAC).

    python bench/network.py [--sizes 321 513] [--batch 1] [--gpu-batch 16] [--repeat 3] [--variant largefov]
    python bench/network.py --skip-cpu --gpu-batch 1 16 32 --cudnn-benchmark   # GPU rows only
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.inference import autocast_for  # noqa: E402
from pipeline.model import VARIANTS, deeplab_v1  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L4": 121.0, "A10": 125.0, "T4": 65.0}


def count_flops(model: torch.nn.Module, *, size: int) -> float:
    """FLOPs (2 x multiply-accumulates) of the convolutions for one size x size image.

    Counted by running one image on the device ``model`` is on (one call; cheap on a GPU).
    """
    device = next(model.parameters()).device
    macs = 0

    def hook(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return 2.0 * macs


def device_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def measure(model: torch.nn.Module, *, device: str, size: int, batch: int, repeat: int, warmup: int = 1) -> float:
    """Seconds per batch (median of ``repeat`` after ``warmup`` untimed calls).

    On CUDA the input is channels_last and the call runs under bf16 autocast, as
    ``pipeline.inference.coarse_logits`` does; the model must already be on ``device``
    (and channels_last there: see ``prepare_model``).
    """
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), autocast_for(device):
        for i in range(warmup + repeat):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def prepare_model(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` moved to ``device`` (in place), channels_last on CUDA, as the pipeline runs it."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def run(
    *,
    variant: str = "largefov",
    sizes: tuple[int, ...] | list[int] = (321, 513),
    cpu_batches: tuple[int, ...] | list[int] = (1,),
    gpu_batches: tuple[int, ...] | list[int] = (16,),
    repeat: int = 3,
    warmup: int = 1,
    skip_cpu: bool = False,
    cudnn_benchmark: bool | None = None,
    seed: int = 0,
) -> list[dict]:
    """One row per (device, size, batch): ms/batch, images/s, achieved TFLOP/s, peak, % of peak.

    CUDA rows only where ``torch.cuda.is_available()``. ``cudnn_benchmark`` sets
    ``torch.backends.cudnn.benchmark`` for the CUDA rows (None: leave it as it is; the
    pipeline does not set it).
    """
    torch.manual_seed(seed)
    model = deeplab_v1(variant).eval()
    flops: dict[int, float] = {}  # per image and size, counted once (on the first device)
    devices = [] if skip_cpu else [("cpu", b) for b in cpu_batches]
    if torch.cuda.is_available():
        devices += [("cuda", b) for b in gpu_batches]
    rows = []
    for device, batch in devices:
        dev_model = prepare_model(model, device)
        for size in sizes:
            if size not in flops:
                flops[size] = count_flops(dev_model, size=size)
        cuda = device == "cuda"
        gpu_name = torch.cuda.get_device_name() if cuda else ""
        name = f"{gpu_name} bf16" if cuda else "cpu fp32"
        peak = device_peak(gpu_name) if cuda else None
        previous = torch.backends.cudnn.benchmark
        if cuda and cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        try:
            for size in sizes:
                seconds = measure(dev_model, device=device, size=size, batch=batch, repeat=repeat, warmup=warmup)
                tflops = flops[size] * batch / seconds / 1e12
                rows.append({
                    "device": name, "size": size, "batch": batch, "ms_per_batch": seconds * 1e3,
                    "images_per_s": batch / seconds, "tflops": tflops, "peak_tflops": peak,
                    "fraction_of_peak": tflops / peak if peak else None,
                    "cudnn_benchmark": torch.backends.cudnn.benchmark if cuda else None,
                    "gflop_per_image": flops[size] / 1e9,
                })
        finally:
            torch.backends.cudnn.benchmark = previous
    return rows


def format_row(row: dict) -> str:
    peak, fraction = row["peak_tflops"], row["fraction_of_peak"]
    pct = f"{100 * fraction:6.1f}%" if fraction is not None else "    n/a"
    return (f"{row['device']:<28} {row['size']:>5} {row['batch']:>5} {row['ms_per_batch']:>10.1f} "
            f"{row['images_per_s']:>9.2f} {row['tflops']:>8.3f} {(f'{peak:.0f}' if peak else 'n/a'):>7} {pct:>7}")


HEADER = (f"{'device':<28} {'size':>5} {'batch':>5} {'ms/batch':>10} {'images/s':>9} {'TFLOP/s':>8} "
          f"{'peak':>7} {'% peak':>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="largefov", choices=VARIANTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    parser.add_argument("--batch", type=int, default=1, help="CPU batch size")
    parser.add_argument("--gpu-batch", type=int, nargs="+", default=[16], help="CUDA batch size(s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    parser.add_argument("--skip-cpu", action="store_true", help="CUDA rows only")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="set torch.backends.cudnn.benchmark for the CUDA rows (the pipeline does not)")
    args = parser.parse_args(argv)

    cpu_name = platform.processor() or platform.machine()
    print(f"# {args.variant}, torch {torch.__version__}, {os.cpu_count()} CPU threads ({cpu_name})")
    print(HEADER)
    for row in run(variant=args.variant, sizes=args.sizes, cpu_batches=[args.batch], gpu_batches=args.gpu_batch,
                   repeat=args.repeat, warmup=args.warmup, skip_cpu=args.skip_cpu,
                   cudnn_benchmark=True if args.cudnn_benchmark else None):
        print(format_row(row), flush=True)
    if not torch.cuda.is_available():
        print("# no CUDA device here: GPU rows not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
