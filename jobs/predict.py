"""Segment a few local images without Ray: palette PNG masks and overlay previews.

For each input image ``NAME.ext`` writes ``OUT/NAME.png`` (a palette PNG of class
ids, the input's size after EXIF orientation) and ``OUT/NAME_overlay.jpg``.
A file that is not a readable image gets a one-line error naming it; the other
images are still written and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.cli import job_main
from pipeline.constants import flat_palette
from pipeline.crf import default_preset, load_params, refine
from pipeline.data.voc import write_label_png
from pipeline.decode import DecodeError, decode_image
from pipeline.inference import labels_from_logits, record_logits
from pipeline.preprocess import upsample_logits
from pipeline.weights import DEMO_CHECKPOINT, load_checkpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.55

EXAMPLES = """examples:
  deeplab-batch predict pipeline/assets/samples --out out/predict
  deeplab-batch predict photo.jpg --out out/ --weights largefov.safetensors --crf-params largefov
  deeplab-batch predict photo.jpg --out out/ --no-crf
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--weights", default=str(DEMO_CHECKPOINT), help="checkpoint path or URI (default: the demo model)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True, help="refine with the dense CRF")
    parser.add_argument("--crf-params", default=None, help="preset name or parameter file (default: the model variant's preset)")
    parser.add_argument("--crf-backend", choices=("pydensecrf", "torch"), default="pydensecrf")
    parser.add_argument("--device", default="cpu", help="torch device for the network (cpu, cuda)")


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()))
        else:
            paths.append(path)
    return paths


def overlay(image: np.ndarray, labels: np.ndarray, palette: list[int]) -> Image.Image:
    colours = np.array(palette, dtype=np.float32).reshape(-1, 3)[labels]
    alpha = np.where(labels[..., None] > 0, OVERLAY_ALPHA, 0.0)
    return Image.fromarray((image * (1 - alpha) + colours * alpha).round().astype(np.uint8))


def _output_stems(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        n = seen.get(path.stem, 0)
        seen[path.stem] = n + 1
        stems.append(path.stem if n == 0 else f"{path.stem}-{n}")
    return stems


def run(args: argparse.Namespace) -> int:
    paths = expand_inputs(args.inputs)
    if not paths:
        print(f"error: no images found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    model, record = load_checkpoint(args.weights)
    model.to(args.device)
    palette = flat_palette(list(record.palette))
    crf_params = None
    if args.crf:
        crf_params = load_params(args.crf_params or default_preset(record.variant))
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path, stem in zip(paths, _output_stems(paths)):
        try:
            image = decode_image(path.read_bytes())
        except (OSError, DecodeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        h, w = image.shape[:2]
        (logits,) = record_logits(model, record, [image], device=args.device)
        if crf_params is None:
            labels = labels_from_logits(logits, height=h, width=w)
        else:
            full = upsample_logits(logits, height=h, width=w).numpy()
            labels = refine(image, full, crf_params, backend=args.crf_backend).argmax(axis=0).astype(np.uint8)
        write_label_png(args.out / f"{stem}.png", labels, palette=palette)
        overlay(image, labels, palette).save(args.out / f"{stem}_overlay.jpg", quality=90)
    written = len(paths) - failures
    print(f"wrote {written} mask(s) and overlay(s) to {args.out}" + (f"; {failures} file(s) failed" if failures else ""))
    return 1 if failures else 0


main = job_main(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
