"""Synthetic shapes dataset and VOC-format reading."""

import numpy as np
import pytest
from PIL import Image

from pipeline.constants import IGNORE_LABEL
from pipeline.data import synthetic
from pipeline.data.voc import VOCDataset, read_label_png, write_label_png


def test_render_sample_is_deterministic_and_labelled():
    a_img, a_lab = synthetic.render_sample(3, 7)
    b_img, b_lab = synthetic.render_sample(3, 7)
    c_img, _ = synthetic.render_sample(3, 8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img) or a_img.shape != c_img.shape
    assert a_img.shape[:2] == a_lab.shape and a_img.dtype == np.uint8
    values = set(np.unique(a_lab).tolist())
    assert values <= set(range(len(synthetic.CLASS_NAMES))) | {IGNORE_LABEL}
    assert IGNORE_LABEL in values and len(values - {0, IGNORE_LABEL}) >= 1


def test_void_band_surrounds_every_boundary():
    _, labels = synthetic.render_sample(0, 1)
    # No two horizontally or vertically adjacent pixels carry different real classes.
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :])):
        real = (a != IGNORE_LABEL) & (b != IGNORE_LABEL)
        assert np.all(a[real] == b[real])


def test_generate_dataset_round_trips_through_voc_reader(tmp_path):
    synthetic.generate_dataset(tmp_path, num_train=3, num_val=2, seed=5)
    ds = VOCDataset(tmp_path, split="val", num_classes=len(synthetic.CLASS_NAMES))
    assert len(ds) == 2
    image_id, image, label = ds[1]
    _, expected_label = synthetic.render_sample(5, 4)
    assert np.array_equal(label, expected_label)
    assert image.shape[:2] == label.shape and image_id == "shapes_00004"


def test_voc_errors_name_the_file(tmp_path):
    synthetic.generate_dataset(tmp_path, num_train=2, num_val=1, seed=0)
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        VOCDataset(tmp_path, split="test")
    (tmp_path / "ImageSets/Segmentation/broken.txt").write_text("shapes_00000\nnope\n")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        VOCDataset(tmp_path, split="broken")
    label_path = tmp_path / "SegmentationClass/shapes_00000.png"
    write_label_png(label_path, np.full((5, 5), 9, np.uint8))
    ds = VOCDataset(tmp_path, split="train", num_classes=5)
    with pytest.raises(ValueError, match="shapes_00000.png: label is 5x5"):
        ds[0]
    image = np.asarray(Image.open(tmp_path / "JPEGImages/shapes_00000.jpg"))
    write_label_png(label_path, np.full(image.shape[:2], 9, np.uint8))
    with pytest.raises(ValueError, match=r"class ids \[9\] are beyond num_classes=5"):
        ds[0]


def test_label_png_keeps_ids_and_palette(tmp_path):
    labels = np.array([[0, 1], [2, 255]], np.uint8)
    write_label_png(tmp_path / "m.png", labels)
    assert np.array_equal(read_label_png(tmp_path / "m.png"), labels)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P" and im.getpalette()[3:6] == [128, 0, 0]


def test_render_sample_at_a_scale_is_the_same_scene_larger():
    base_image, base_labels = synthetic.render_sample(0, 7, min_size=64, max_size=96)
    image, labels = synthetic.render_sample(0, 7, min_size=64, max_size=96, scale=3)
    assert image.shape == (base_image.shape[0] * 3, base_image.shape[1] * 3, 3)
    assert labels.shape == (base_labels.shape[0] * 3, base_labels.shape[1] * 3)
    centre = labels[1::3, 1::3]  # the centre pixel of each 3 x 3 block
    valid = (centre != IGNORE_LABEL) & (base_labels != IGNORE_LABEL)
    assert valid.mean() > 0.8 and (centre[valid] == base_labels[valid]).mean() > 0.99
    assert set(np.unique(base_labels)) == set(np.unique(labels))
    with pytest.raises(ValueError, match="scale: expected an integer >= 1"):
        synthetic.render_sample(0, 7, scale=0)


def test_make_demo_data_only_at_a_scale(tmp_path, capsys):
    from jobs.make_demo import main

    assert main(["--data-only", "--scale", "0", "--data-dir", str(tmp_path / "x")]) == 2
    assert "--scale: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["--scale", "2"]) == 2
    assert "--scale applies to --data-only" in capsys.readouterr().err
