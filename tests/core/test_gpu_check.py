"""bench/gpu_check.py (`make gpu-check`) where there is no CUDA device: it must run, skip every
CUDA part with a reason, produce real CPU results, and need nothing beyond torch and the wheels
that `make gpu-wheels` downloads (no Ray), so that it works the first time a GPU is lent."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.preprocess import coarse_size

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
CPU_PARTS = ("environment", "network_cpu", "crf_cpu")
CUDA_PARTS = ("network_bf16", "crf_cuda", "bench_network", "bench_crf")
#: torch's own dependencies (pip installs them with torch); torch imports some of them lazily.
TORCH_DEPS = {"sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "typing_extensions",
              "torchgen"}
#: distribution (as pinned in the Makefile's GPU_WHEELS) -> the module it provides
WHEEL_MODULES = {"numpy": "numpy", "pillow": "PIL", "safetensors": "safetensors", "fsspec": "fsspec"}
#: used when installed, never required (no cp312 wheel exists: the CUDA CRF is compared with torch on CPU)
OPTIONAL = {"pydensecrf"}


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    # CPU mode even on a machine with a GPU; one torch thread (a busy 2-core machine makes a second
    # OpenMP thread many times slower, see tests/crf/conftest.py).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
    return proc, report


def gpu_wheels() -> list[str]:
    """Distribution names of the Makefile's GPU_WHEELS pins."""
    line = re.search(r"^GPU_WHEELS \?=(.*)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE).group(1)
    return [pin.split("==")[0].lower() for pin in line.split()]


def test_cpu_mode_skips_cuda_parts_and_runs_the_cpu_ones(tmp_path):
    out = tmp_path / "gpu-check"
    proc, report = run_check(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["cuda"] is False and report["verdict"] == "ok"
    parts = report["parts"]
    assert set(parts) == set(CPU_PARTS + CUDA_PARTS)
    for name in CUDA_PARTS:
        assert parts[name]["status"] == "skipped: no CUDA device", (name, parts[name])
        assert parts[name]["needs_cuda"] is True
    for name in CPU_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name].get("traceback"))

    network = parts["network_cpu"]["result"]
    assert len(network["images"]) == 2
    for image in network["images"]:
        h, w = image["image_shape"]
        assert image["logits_shape"] == [5, coarse_size(h), coarse_size(w)]  # the demo model has 5 classes
        assert image["labels_shape"] == [h, w] and image["finite"] and sum(image["label_counts"]) == h * w

    crf = parts["crf_cpu"]["result"]
    assert crf["marginals_shape"] == [5, 48, 64] and crf["labels_shape"] == [48, 64]
    assert crf["batched_shapes"] == [[5, 48, 64], [5, 40, 56]] and crf["marginals_sum_to_one"]
    assert 0 < crf["changed_by_crf"] < 1  # the CRF did something, not everything

    summary = (out / "gpu_check.txt").read_text()
    assert all(name in summary for name in CPU_PARTS[1:] + CUDA_PARTS) and "result: ok" in summary

    # Nothing but torch, its own dependencies and the wheels of `make gpu-wheels`; never Ray.
    imported = set(report["imported_beyond_torch"]) | set(report["imported_with_torch"])
    assert not {m for m in imported if m.split(".")[0] == "ray"}
    wheels = {WHEEL_MODULES[name] for name in gpu_wheels()}
    extra = set(report["imported_beyond_torch"]) - TORCH_DEPS - OPTIONAL - wheels
    assert not extra, f"bench/gpu_check.py imports {extra}: add their wheels to GPU_WHEELS in the Makefile"


def test_dry_run_exercises_the_cuda_parts_on_cpu(tmp_path):
    """--dry-run runs the CUDA parts' code on the CPU with small inputs: a typo there shows up here,
    not in the first (scarce) GPU window."""
    out = tmp_path / "dry"
    proc, report = run_check(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = report["parts"]
    for name in CPU_PARTS + CUDA_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name].get("traceback"))
    models = parts["network_bf16"]["result"]["models"]
    assert set(models) == {"demo", "largefov-random"}
    for model in models.values():
        assert model["cuda_bf16_vs_cpu_fp32"]["label_agreement"] == 1.0  # fp32 both sides on CPU
    crf = parts["crf_cuda"]["result"]
    assert len(crf["single"]) == 12 and len(crf["batched"]) == 8 and crf["failures"] == []
    assert parts["bench_network"]["result"]["rows"] and parts["bench_crf"]["result"]["rows"]
    assert "DRY RUN" in (out / "gpu_check.txt").read_text()


def test_a_failing_or_slow_part_is_reported_and_the_others_still_run(tmp_path):
    out = tmp_path / "broken"
    driver = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
def broken(ctx, result):
    result["partial"] = 1
    raise RuntimeError("boom")
def slow(ctx, result):
    time.sleep(30)
gc.PARTS = {{"broken": (broken, False, 5), "slow": (slow, False, 1), "crf_cpu": gc.PARTS["crf_cpu"]}}
sys.exit(gc.main(["--out", {str(out)!r}]))
"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["broken"]["status"] == "error" and "RuntimeError: boom" in parts["broken"]["traceback"]
    assert parts["broken"]["result"]["partial"] == 1  # what ran before the error is kept
    assert parts["slow"]["status"] == "timeout" and parts["slow"]["seconds"] < 10
    assert parts["crf_cpu"]["status"] == "ok"


def test_constants_are_those_of_the_library_and_the_parity_tests():
    from pipeline.weights import METADATA_KEY
    from tests.crf import test_parity

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.LABEL_AGREEMENT == test_parity.LABEL_AGREEMENT
    assert gpu_check.MARGINAL_TOLERANCE == test_parity.MARGINAL_TOLERANCE
    assert gpu_check.MARGINAL_TOLERANCE_NONE == test_parity.MARGINAL_TOLERANCE_NONE
    assert gpu_check.RECORD_KEY == METADATA_KEY  # the demo checkpoint is read without pipeline.weights
