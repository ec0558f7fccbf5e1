"""Working resolution (issue #11): the CRF at the network's size, results at the original size, slide mode.

The stages are exercised without Ray (they are plain callables on batches), then
once through a real ``segment`` run on a local Ray instance.
"""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import ConfigError, from_mapping
from pipeline.preprocess import coarse_size
from pipeline.resolution import check_resolution, fitted_shape, label_statistics, max_side, shrink, to_original
from pipeline.stages import CRFStage, DecodeStage, NetworkStage
from pipeline.stages.crf import work_probabilities
from tests.segment.corpus import EXIF_ORIENTATION, encode, shapes_image


def _decode_rows(images: dict[str, bytes], *, max_side: int | None):
    ids = sorted(images)
    n = len(ids)
    return DecodeStage(max_side=max_side)({
        "image_id": ids, "source_uri": ids, "status": ["ok"] * n, "error": [None] * n, "error_kind": [None] * n,
        "t_read": [0.0] * n, "node_read": ["local"] * n, "data": [images[i] for i in ids]})


def _rotated_jpeg(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored W x H, shown H x W (rotated 90 degrees)
    return encode(image, "JPEG", exif=exif, quality=95)


# ----------------------------------------------------------------------------- returning to the original size


def _sharp_probabilities(num_classes: int, height: int, width: int, *, seed: int) -> np.ndarray:
    """CRF-like marginals: smooth, mostly confident, a few classes dominant."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(0, 4, (num_classes, max(2, height // 8), max(2, width // 8))).astype(np.float32))
    coarse[: num_classes // 3] += 6
    logits = F.interpolate(coarse[None], size=(height, width), mode="bilinear", align_corners=True)[0]
    return torch.softmax(logits, dim=0).numpy()


@pytest.mark.parametrize(("classes", "small", "large"), [(21, (49, 65), (391, 517)), (5, (40, 30), (301, 97)),
                                                          (2, (17, 17), (17, 200)), (1, (9, 12), (30, 40))])
def test_to_original_is_the_argmax_of_the_whole_upsampled_map(classes, small, large):
    probs = _sharp_probabilities(classes, *small, seed=classes)
    labels, counts, confidence = to_original(probs, *large, band_bytes=1 << 14)  # many bands
    full = F.interpolate(torch.from_numpy(probs)[None], size=large, mode="bilinear", align_corners=False)[0]
    top2 = full.topk(min(2, classes), dim=0).values
    expected = full.argmax(dim=0).numpy()
    differ = labels != expected
    if classes > 1:  # only exact ties of the float sums may go either way
        assert (top2[0] - top2[1]).numpy()[differ].max(initial=0.0) < 1e-6
    assert differ.sum() <= 2 and labels.shape == large
    assert sum(counts) == large[0] * large[1]
    assert counts == np.bincount(labels.ravel(), minlength=classes).tolist()
    chosen = np.take_along_axis(full.numpy(), labels[None].astype(np.int64), axis=0)[0]
    for k in range(classes):
        if counts[k]:
            assert confidence[k] == pytest.approx(float(chosen[labels == k].mean()), rel=1e-5)
        else:
            assert np.isnan(confidence[k])


def test_to_original_at_the_working_size_is_label_statistics_exactly():
    probs = _sharp_probabilities(4, 33, 47, seed=3)
    ours, reference = to_original(probs, 33, 47), label_statistics(probs)
    assert np.array_equal(ours[0], reference[0]) and ours[1] == reference[1]
    assert np.array_equal(np.asarray(ours[2]), np.asarray(reference[2]), equal_nan=True)


def test_fitted_shape_and_shrink_keep_the_aspect_and_never_enlarge():
    assert fitted_shape(3024, 4032, 513) == (385, 513)
    assert fitted_shape(4032, 3024, 513) == (513, 385)
    assert fitted_shape(300, 200, 513) == (300, 200)
    assert fitted_shape(3024, 4032, None) == (3024, 4032)
    image = shapes_image(300, 1000)
    assert shrink(image, 100).shape == (30, 100, 3) and shrink(image, 2000) is image
    assert max_side("network", input_size=513) == 513 and max_side("full", input_size=513) is None
    assert max_side(1024, input_size=513) == 1024 and max_side("2048", input_size=513) == 2048


# ----------------------------------------------------------------------------- the stages at the working resolution


def test_network_resolution_masks_keep_the_original_exif_size_and_move_little(tiny_checkpoint):
    from pipeline.crf import load_params

    photo = shapes_image(600, 800, seed=5)  # stored 800 wide; shown 600 wide, 800 tall
    images = {"rotated": _rotated_jpeg(photo), "wide": encode(shapes_image(90, 700, seed=6), "PNG"),
              "small": encode(shapes_image(40, 50, seed=7), "PNG")}
    decoded = _decode_rows(images, max_side=65)  # the tiny model's input size
    network = NetworkStage(weights=str(tiny_checkpoint), device="cpu", max_side=65)(decoded)
    crf = CRFStage(params=load_params("largefov"), backend="pydensecrf")(network)
    rows = {r["image_id"]: r for r in network.to_pylist()}
    out = {r["image_id"]: r for r in crf.to_pylist()}
    shown = {"rotated": (800, 600), "wide": (90, 700), "small": (40, 50)}  # (height, width) after EXIF
    for name, (height, width) in shown.items():
        row = rows[name]
        assert (row["height"], row["width"]) == (height, width), name
        work = fitted_shape(height, width, 65)
        assert (row["pixels_height"], row["pixels_width"]) == work, name
        # network -> CRF: the working-resolution image and its coarse logits, not the original pixels
        assert len(row["pixels"]) == work[0] * work[1] * 3
        assert len(row["logits"]) == 5 * coarse_size(work[0]) * coarse_size(work[1]) * 2
        assert out[name]["status"] == "ok", out[name]["error"]
        mask = np.frombuffer(out[name]["mask"], dtype=np.uint8)
        assert mask.size == height * width and sum(out[name]["class_pixels"]) == height * width


def test_crf_resolution_full_reproduces_the_full_resolution_refinement(tiny_checkpoint):
    """crf.resolution: full = the first release's path: logits resampled onto the full coarse grid, CRF at full size."""
    from pipeline.crf import load_params, refine
    from pipeline.decode import decode_image
    from pipeline.inference import record_logits
    from pipeline.preprocess import upsample_logits
    from pipeline.weights import load_checkpoint

    data = {"photo": _rotated_jpeg(shapes_image(150, 210, seed=8))}  # larger than the input size 65
    params = load_params("largefov")
    decoded = _decode_rows(data, max_side=None)
    network = NetworkStage(weights=str(tiny_checkpoint), device="cpu", max_side=None)(decoded)
    (row,) = CRFStage(params=params, backend="pydensecrf")(network).to_pylist()

    image = decode_image(data["photo"])
    model, record = load_checkpoint(tiny_checkpoint)
    (scores,) = record_logits(model, record, [image], dtype=torch.float16)
    full = upsample_logits(scores, height=image.shape[0], width=image.shape[1]).float().numpy()
    expected = refine(image.copy(), np.ascontiguousarray(full), params).argmax(axis=0).astype(np.uint8)
    mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(image.shape[:2])
    assert np.array_equal(mask, expected)
    assert row["class_pixels"] == np.bincount(expected.ravel(), minlength=5).tolist()


def test_crf_max_pixels_bounds_the_working_resolution_not_the_original(tiny_checkpoint):
    from pipeline.crf import load_params

    data = {"big": encode(shapes_image(400, 600, seed=9), "PNG")}
    for side, status in ((65, "ok"), (None, "error")):
        network = NetworkStage(weights=str(tiny_checkpoint), device="cpu", max_side=side)(
            _decode_rows(data, max_side=side))
        (row,) = CRFStage(params=load_params("largefov"), max_pixels=10_000)(network).to_pylist()
        assert row["status"] == status, row["error"]
    assert "at the working resolution > crf.max_pixels 10000; lower crf.resolution" in row["error"]


# ----------------------------------------------------------------------------- slide mode


def _color_checkpoint(path, *, input_size: int):
    """A LargeFOV whose every layer passes colour through (centre taps only): class = dominant colour.

    Its scores at a pixel depend only on the colours near it, so on an image of flat
    regions the labels are the same at any resolution, away from region boundaries.
    """
    from pipeline.constants import MEAN_BGR, voc_palette
    from pipeline.model import deeplab_v1
    from pipeline.weights import ModelRecord, save_checkpoint

    model = deeplab_v1("largefov", num_classes=4, width=0.125)
    offset = 128.0  # input is BGR minus the mean, in [-123, 152]: shift it positive so ReLUs pass it
    with torch.no_grad():
        for name, module in model.named_children():
            if not isinstance(module, torch.nn.Conv2d):
                continue
            module.weight.zero_()
            module.bias.zero_()
            if name == "fc8":
                continue
            kh, kw = module.kernel_size
            for c in range(3):
                module.weight[c, c, kh // 2, kw // 2] = 1.0
            if name == "conv1_1":
                module.bias[:3] = offset
        b, g, r = (m for m in MEAN_BGR)  # fc8: background constant; red/green/blue = 2 x channel - the others
        fc8 = model.fc8
        fc8.bias[0] = 20.0
        for k, (own, others, mean_own, mean_others) in enumerate(
            [(2, (0, 1), r, (b, g)), (1, (0, 2), g, (b, r)), (0, (1, 2), b, (g, r))], start=1
        ):
            fc8.weight[k, own, 0, 0] = 2.0
            for o in others:
                fc8.weight[k, o, 0, 0] = -1.0
            fc8.bias[k] = 2 * mean_own - sum(mean_others)  # cancels the mean: 0 on grey
    record = ModelRecord(variant="largefov", num_classes=4, width=0.125, class_names=("background", "red", "green",
                         "blue"), palette=tuple(voc_palette(4)), input_size=input_size, source="tests (colour)")
    save_checkpoint(path, model=model, record=record)
    return path


def _regions(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat colour blocks (2 rows x 3 columns of grey / red / green / blue) and each pixel's distance to a
    block boundary or the image border."""
    from scipy.ndimage import distance_transform_edt

    def rgb(h, s, v):
        return (np.array(colorsys.hsv_to_rgb(h, s, v)) * 255).astype(np.uint8)

    colours = np.stack([rgb(0, 0, 0.55), rgb(0.0, 0.85, 0.8), rgb(0.33, 0.85, 0.7), rgb(0.62, 0.85, 0.8)])
    blocks = np.array([[3, 1, 0], [0, 1, 2]])  # blue red grey / grey red green
    rows = np.minimum(np.arange(height) * 2 // height, 1)
    columns = np.minimum(np.arange(width) * 3 // width, 2)
    regions = blocks[rows[:, None], columns[None, :]]
    edge = np.zeros(regions.shape, dtype=bool)
    edge[:-1] |= regions[:-1] != regions[1:]
    edge[:, :-1] |= regions[:, :-1] != regions[:, 1:]
    edge[[0, -1], :] = edge[:, [0, -1]] = True  # padding reaches in from the border too
    return colours[regions].astype(np.uint8), distance_transform_edt(~edge)


def test_slide_mode_gives_the_labels_of_resize_mode_on_resolution_independent_content(tmp_path):
    from pipeline.inference import tile_origins, tile_stride

    input_size = 1025
    weights = _color_checkpoint(tmp_path / "colour.safetensors", input_size=input_size)
    height, width = 1400, 2200  # larger than the input: resize shrinks it ~2.1x, slide runs 1025-px tiles
    image, distance = _regions(height, width)
    labels = {}
    for mode in ("resize", "slide"):
        stage = NetworkStage(weights=str(weights), device="cpu", mode=mode, tile_overlap=1 / 3, max_side=None)
        ((work, scores),) = stage.forward([image])
        assert work.shape == image.shape and scores.shape == (4, coarse_size(height), coarse_size(width))
        (probs,) = work_probabilities([image], [scores])
        labels[mode] = to_original(probs, height, width)[0]
    # The colour model's scores at a pixel depend on colours within 31 input pixels (its max pools:
    # 1 + 2 + 4 + 8 + 8 + the 8 of pool5a), then scores are interpolated over one more 8-px cell: 40
    # network-input pixels, i.e. 40 native pixels when sliding and 40 x shrink when resized. Beyond that
    # from every boundary and border, the content is the same at any resolution, and so must the labels be.
    shrink_factor = width / input_size
    away = distance > 40 * (shrink_factor + 1)
    assert away.mean() > 0.25
    assert np.array_equal(labels["slide"][away], labels["resize"][away])
    assert set(np.unique(labels["slide"][away])) == {0, 1, 2, 3}  # every block found, so the check has teeth

    # the tiles cover every pixel: the last one reaches the edge, all start on the coarse grid
    for size in (129, 130, 200, 257, 700, 1100, 4031):
        for tile in (65, 129, 513):
            stride = tile_stride(tile, 1 / 3)
            origins = tile_origins(size, tile=tile, stride=stride)
            assert origins[0] == 0 and all(o % 8 == 0 for o in origins)
            assert origins[-1] + tile >= size
            assert all(b - a <= stride for a, b in zip(origins, origins[1:]))  # no gap between tiles
            assert stride < tile


def test_slide_mode_shrinks_to_the_working_resolution_after_the_network(tmp_path):
    weights = _color_checkpoint(tmp_path / "colour.safetensors", input_size=129)
    image, _ = _regions(400, 600)
    stage = NetworkStage(weights=str(weights), device="cpu", mode="slide", max_side=129)
    ((work, scores),) = stage.forward([image])
    assert work.shape == (86, 129, 3) and scores.shape == (4, coarse_size(86), coarse_size(129))
    assert scores.dtype == np.float16


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("section", "values", "message"), [
    ("crf", {"resolution": "huge"}, "crf.resolution: expected 'network', 'full' or a longer side in pixels >= 65"),
    ("crf", {"resolution": 10}, "crf.resolution: expected 'network', 'full' or a longer side in pixels >= 65, got 10"),
    ("crf", {"resolution": True}, "crf.resolution: expected an integer or a string, got True"),
    ("network", {"mode": "tiles"}, "network.mode: expected one of 'resize', 'slide', got 'tiles'"),
    ("network", {"tile_size": 512}, "network.tile_size: expected 0 (the record's input size) or 8k+1 >= 65"),
    ("network", {"tile_overlap": 0.9}, "network.tile_overlap: expected in [0, 0.75], got 0.9"),
])
def test_bad_resolution_and_slide_settings_are_refused_with_the_field_named(section, values, message):
    with pytest.raises(ConfigError) as info:
        from_mapping({section: values})
    assert message in str(info.value)


def test_resolution_values():
    assert check_resolution("network") == "network" and check_resolution("full") == "full"
    assert check_resolution(1024) == 1024 and check_resolution("1024") == 1024
    assert from_mapping({"crf": {"resolution": 2048}}).crf.resolution == 2048
    with pytest.raises(ValueError, match="--crf-resolution: expected"):
        check_resolution("half", name="--crf-resolution")


# ----------------------------------------------------------------------------- a real run


def test_segment_run_writes_original_size_masks_and_records_the_resolution(ray_local, tmp_path):
    from jobs.segment import EXIT_OK, segment
    from pipeline.outputs import OutputLayout

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rotated.jpg").write_bytes(_rotated_jpeg(shapes_image(900, 1200, seed=11)))
    (tmp_path / "in" / "small.png").write_bytes(encode(shapes_image(120, 160, seed=12), "PNG"))
    config = from_mapping({"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
                           "ray": {"no_progress_timeout_s": 300, "progress": False}})
    assert segment(config, echo=lambda *_: None) == EXIT_OK
    rows = {r["source_uri"].rsplit("/", 1)[-1]: r for r in OutputLayout(uri=str(tmp_path / "out")).read_segments()
            .to_pylist()}
    assert {r["status"] for r in rows.values()} == {"ok"}
    for name, (width, height) in {"rotated.jpg": (900, 1200), "small.png": (160, 120)}.items():
        row = rows[name]
        assert (row["width"], row["height"]) == (width, height)
        with Image.open(tmp_path / "out" / "masks" / f"{row['image_id']}.png") as mask:
            assert mask.size == (width, height)
        assert row["crf"]["resolution"] == "network"
    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["config"]["crf"]["resolution"] == "network"



def test_write_pool_size_is_gone_with_a_reason():
    with pytest.raises(ConfigError, match="write.pool_size: removed: masks and segments files are written by tasks"):
        from_mapping({"write": {"pool_size": 2}})


def test_the_crf_resolution_flag_sets_the_config_and_bad_values_name_the_field(tmp_path):
    import argparse

    from jobs.segment import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve_config(parser.parse_args(["--crf-resolution", "full"])).crf.resolution == "full"
    assert check_resolution(resolve_config(parser.parse_args(["--crf-resolution", "1024"])).crf.resolution) == 1024
    with pytest.raises(ConfigError, match="crf.resolution: expected 'network', 'full' or a longer side"):
        resolve_config(parser.parse_args(["--crf-resolution", "half"]))
