"""Storage cost per image of segment's output options, and of exporting training data afterwards, in one run.

On one corpus (the 24 bundled samples, ``pipeline/assets/samples``; ``--scale N`` renders the
same 24 scenes N times larger, as ``deeplab-batch make-demo --data-only --scale N`` does) it runs
``deeplab-batch segment`` (demo model, default CRF) into four separate outputs:

* ``plain``:        no options (masks/, segments/, the derived files);
* ``confidence``:   ``--confidence`` (adds confidence/<id>.png, 8-bit);
* ``webdataset``:   ``--training webdataset --ignore-below T`` (implies --confidence; adds tar shards under training/);
* ``hf-parquet``:   ``--training hf-parquet --ignore-below T`` (Parquet shards under training/);

then ``deeplab-batch export --from <confidence output> --format webdataset|hf-parquet --ignore-below T``
(the same training data, rebuilt after the run). Each command is a subprocess of the CLI, as a
user runs it (each starts its own local Ray instance, so the wall times of so small a corpus are
mostly Ray's start-up; they are printed for reference, not as throughput).

For each output it sums the bytes of the files left when the command has finished (segments/
after the run's compaction) by folder: ``masks/``, ``confidence/``, ``segments/``, training
shards (``training/*.tar|*.parquet`` of a segment output; ``train/`` and ``val/`` shards of an
export), ``report.html`` (one page per output with a bounded gallery: a fixed cost), and
everything else (``_index/``, ``class_stats.parquet``, ``_run.json``, the lease file,
``training/*.json``; an export's ``id2label.json``, ``sampling.json``, ``_export.json``), and
divides by the ``ok`` images (``_run.json``; an export's ``exported`` count). The inputs' own
bytes per image are printed beside them, with the ratio of training shard bytes to input bytes
(a shard stores every image's bytes as they are, plus its label PNG and JSON record, plus the
container's overhead: 512-byte tar headers per member, Parquet pages and footer). Prints the
machine (CPU model, cores, RAM) and the date. Takes ~3 minutes on 2 CPUs at ``--scale 1``.

    python bench/storage.py
    python bench/storage.py --scale 4 --ignore-below 0.95 --json storage.json
    python bench/storage.py --workdir /tmp/storage --keep       # leave the outputs for a look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLES = REPO / "pipeline" / "assets" / "samples"
#: Segment outputs: (name, extra flags; "{T}" is --ignore-below).
SEGMENT_CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plain", ()),
    ("confidence", ("--confidence",)),
    ("webdataset", ("--training", "webdataset", "--ignore-below", "{T}")),
    ("hf-parquet", ("--training", "hf-parquet", "--ignore-below", "{T}")),
)
#: Exports from the ``confidence`` output: (name, format).
EXPORT_CASES: tuple[tuple[str, str], ...] = (("export webdataset", "webdataset"), ("export hf-parquet", "hf-parquet"))
SHARD_SUFFIXES = (".tar", ".parquet")
FOLDERS = ("masks", "confidence", "segments", "training shards", "report.html", "other")
#: Rows that do not apply to an export.
SEGMENT_ONLY = ("masks", "confidence", "segments", "report.html")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "ram_gib": ram_gib,
            "platform": platform.platform(), "python": platform.python_version(), "host": platform.node()}


def make_inputs(folder: Path, *, scale: int) -> Path:
    """The bundled samples (scale 1), or the same 24 scenes rendered ``scale`` times larger."""
    if scale == 1:
        return SAMPLES
    from PIL import Image

    from pipeline.data import synthetic
    from pipeline.demo import SAMPLES as SPEC

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(SPEC["count"]):
        image, _ = synthetic.render_sample(SPEC["seed"], index, min_size=SPEC["min_size"],
                                           max_size=SPEC["max_size"], scale=scale)
        Image.fromarray(image).save(folder / f"sample_{index:03d}.jpg", quality=synthetic.JPEG_QUALITY)
    return folder


def cli(args: list[str], *, log: Path) -> float:
    """``deeplab-batch ARGS`` in a subprocess (output to ``log``); returns its wall seconds; exits on failure."""
    command = [sys.executable, "-m", "jobs.cli", *args]
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(command, check=False, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"`deeplab-batch {' '.join(args)}` exited {rc}:\n{tail}")
    return seconds


def files_under(root: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``root`` (hidden ones too)."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def segment_folders(root: Path) -> dict[str, int]:
    """Bytes of a segment output by folder (see the module docstring)."""
    sums = dict.fromkeys(FOLDERS, 0)
    for rel, size in files_under(root).items():
        top, _, rest = rel.partition("/")
        if top in ("masks", "confidence", "segments"):
            sums[top] += size
        elif top == "training" and "/" not in rest and rest.endswith(SHARD_SUFFIXES):
            sums["training shards"] += size
        elif rel == "report.html":
            sums["report.html"] += size
        else:
            sums["other"] += size
    return sums


def export_folders(root: Path) -> dict[str, int]:
    """Bytes of an export by folder: shards under train/ and val/, everything else."""
    sums = dict.fromkeys(FOLDERS, 0)
    for rel, size in files_under(root).items():
        top, _, rest = rel.partition("/")
        if top in ("train", "val") and "/" not in rest and rest.endswith(SHARD_SUFFIXES):
            sums["training shards"] += size
        else:
            sums["other"] += size
    return sums


def measure(*, work: Path, inputs: Path, ignore_below: float) -> dict:
    input_files = sorted(p for p in inputs.iterdir() if p.is_file())
    input_bytes = sum(p.stat().st_size for p in input_files)
    cases = []
    for name, flags in SEGMENT_CASES:
        out = work / f"out-{name}"
        args = ["segment", "--input", str(inputs), "--output", str(out), "--no-progress",
                *(f.format(T=ignore_below) for f in flags)]
        seconds = cli(args, log=work / f"{name}.log")
        run = json.loads((out / "_run.json").read_text())
        ok = int(run["counts"]["ok"])
        if ok != len(input_files):
            raise SystemExit(f"{name}: {ok} ok of {len(input_files)} images (see {work / f'{name}.log'})")
        cases.append({"name": name, "command": "deeplab-batch " + " ".join(args), "images": ok, "seconds": seconds,
                      "bytes": segment_folders(out), "segments_files": run["output_files"]["segments"],
                      "training": run.get("training"), "pipeline_s": run["phases_s"].get("pipeline_s")})
        print(f"  {name}: {ok} images, {seconds:.1f} s", flush=True)
    source = work / "out-confidence"
    for name, fmt in EXPORT_CASES:
        dest = work / f"export-{fmt}"
        args = ["export", "--from", str(source), "--to", str(dest), "--format", fmt, "--ignore-below",
                str(ignore_below), "--no-progress"]
        seconds = cli(args, log=work / f"export-{fmt}.log")
        summary = json.loads((dest / "_export.json").read_text())
        exported = int(summary["counts"]["exported"])
        if exported != len(input_files):
            raise SystemExit(f"{name}: {exported} exported of {len(input_files)} images "
                             f"(see {work / f'export-{fmt}.log'})")
        cases.append({"name": name, "command": "deeplab-batch " + " ".join(args), "images": exported,
                      "seconds": seconds, "bytes": export_folders(dest), "counts": summary["counts"]})
        print(f"  {name}: {exported} images, {seconds:.1f} s", flush=True)
    return {"input": str(inputs), "images": len(input_files), "input_bytes": input_bytes,
            "input_bytes_per_image": input_bytes / len(input_files), "ignore_below": ignore_below, "cases": cases}


def report(result: dict) -> None:
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
          f"{m['ram_gib']:.1f} GiB RAM; {m['platform']}, Python {m['python']}")
    print(f"date: {result['date']}")
    print(f"corpus: {result['images']} images ({result['corpus']}), {result['input_bytes_per_image']:,.0f} "
          f"bytes/image of input; demo model, default CRF; --ignore-below {result['ignore_below']:g} on the "
          f"training outputs and the exports (exports from the 'confidence' output)\n")
    cases = result["cases"]
    inputs = result["input_bytes_per_image"]
    plain_total = sum(cases[0]["bytes"].values()) / cases[0]["images"]
    header = ["bytes per image", *(c["name"] for c in cases)]
    rows = [["input (reference)", *(f"{inputs:,.0f}" for _ in cases)]]
    for folder in FOLDERS:
        cells = []
        for c in cases:
            exported = c["name"].startswith("export")
            value = c["bytes"][folder] / c["images"]
            cells.append("-" if exported and folder in SEGMENT_ONLY else f"{value:,.0f}")
        rows.append([f"{folder}/" if folder in ("masks", "confidence", "segments") else folder, *cells])
    totals = [sum(c["bytes"].values()) / c["images"] for c in cases]
    rows.append(["total", *(f"{t:,.0f}" for t in totals)])
    rows.append(["total - plain", *("-" if c["name"].startswith("export") else f"{t - plain_total:+,.0f}"
                                     for c, t in zip(cases, totals))])
    rows.append(["shards / input", *(f"{c['bytes']['training shards'] / c['images'] / inputs:.3f}"
                                     if c["bytes"]["training shards"] else "-" for c in cases)])
    rows.append(["total bytes (all images)", *(f"{sum(c['bytes'].values()):,}" for c in cases)])
    rows.append(["command wall s", *(f"{c['seconds']:.1f}" for c in cases)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print("\nreport.html is one page per output (at most 64 thumbnails, not one per image), and segments/ and "
          "other are mostly\nfixed per file: their bytes per image fall as the output grows. wall s: the whole "
          "command, Ray start-up included.")
    for c in cases:
        print(f"  {c['command']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1,
                        help="render the 24 sample scenes this many times larger (default 1: the bundled files)")
    parser.add_argument("--ignore-below", type=float, default=0.9,
                        help="--ignore-below of the training outputs and the exports (default 0.9)")
    parser.add_argument("--workdir", help="where the outputs go (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="leave the outputs under --workdir")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error("--scale: expected an integer >= 1")

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            parser.error(f"--workdir {work} is not empty (segment would resume into its outputs)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        inputs = make_inputs(work / "inputs", scale=args.scale)
        corpus = "bundled samples" if args.scale == 1 else f"bundled sample scenes at {args.scale}x"
        print(f"segmenting {corpus} into {work} ...", flush=True)
        result = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "machine": machine(),
                  "corpus": corpus, "scale": args.scale, **measure(work=work, inputs=inputs,
                                                                   ignore_below=args.ignore_below)}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
