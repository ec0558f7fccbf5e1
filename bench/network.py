"""Network throughput: DeepLab-LargeFOV images/s at 321x321 and 513x513.

CPU (float32) always; CUDA with bf16 autocast and channels_last when a GPU is
present, with the achieved TFLOP/s next to the device's dense bf16 peak.
FLOPs are counted from the convolutions actually run (2 x MAC).

    python bench/network.py [--sizes 321 513] [--batch 1] [--repeat 3] [--variant largefov]
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
    """FLOPs (2 x multiply-accumulates) of the convolutions for one size x size image."""
    macs = 0

    def hook(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = module.kernel_size
        macs += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return 2.0 * macs


def device_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def measure(model: torch.nn.Module, *, device: str, size: int, batch: int, repeat: int) -> float:
    """Seconds per batch (median of ``repeat`` after one warm-up)."""
    x = torch.randn(batch, 3, size, size, device=device)
    if device == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), autocast_for(device):
        for i in range(repeat + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="largefov", choices=VARIANTS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[321, 513])
    parser.add_argument("--batch", type=int, default=1, help="CPU batch size")
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    model = deeplab_v1(args.variant).eval()
    cpu_name = platform.processor() or platform.machine()
    print(f"# {args.variant}, torch {torch.__version__}, {os.cpu_count()} CPU threads ({cpu_name})")
    print(f"{'device':<28} {'size':>5} {'batch':>5} {'ms/batch':>10} {'images/s':>9} {'TFLOP/s':>8} {'peak':>7} {'% peak':>7}")
    devices = [("cpu", args.batch)] + ([("cuda", args.gpu_batch)] if torch.cuda.is_available() else [])
    for device, batch in devices:
        dev_model = model.to(device)
        if device == "cuda":
            dev_model = dev_model.to(memory_format=torch.channels_last)
        name = torch.cuda.get_device_name() + " bf16" if device == "cuda" else "cpu fp32"
        peak = device_peak(torch.cuda.get_device_name()) if device == "cuda" else None
        for size in args.sizes:
            flops = count_flops(model.to("cpu"), size=size) * batch
            dev_model = model.to(device)
            seconds = measure(dev_model, device=device, size=size, batch=batch, repeat=args.repeat)
            tflops = flops / seconds / 1e12
            pct = f"{100 * tflops / peak:6.1f}%" if peak else "    n/a"
            print(f"{name:<28} {size:>5} {batch:>5} {seconds * 1e3:>10.1f} {batch / seconds:>9.2f} {tflops:>8.3f} "
                  f"{(f'{peak:.0f}' if peak else 'n/a'):>7} {pct:>7}")
    if not torch.cuda.is_available():
        print("# no CUDA device here: GPU rows not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
