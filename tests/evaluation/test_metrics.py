"""ConfusionMatrix against brute-force references on small hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import ConfusionMatrix, confusion_counts


def brute_matrix(pred, gt, num_classes):
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, g in zip(np.ravel(pred), np.ravel(gt)):
        if g != 255:
            m[g, p] += 1
    return m


def brute_iou(pred, gt, c):
    inter = union = 0
    for p, g in zip(np.ravel(pred), np.ravel(gt)):
        if g == 255:
            continue
        inter += (p == c) and (g == c)
        union += (p == c) or (g == c)
    return inter / union if union else math.nan


def test_known_matrix_and_metrics():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(cm.matrix, expected)
    assert cm.matrix.dtype == np.int64
    # IoU: class 0: 1/(2+2-1)=1/3; class 1: 2/(2+3-2)=2/3; class 2: 0/(1+0-0)=0
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx(1 / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    assert cm.mean_class_accuracy() == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_absent_class_is_nan_and_skipped_in_means():
    gt = np.array([[0, 1], [1, 0]])
    pred = np.array([[0, 1], [0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    iou = cm.iou()
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert cm.miou() == pytest.approx(np.mean([2 / 3, 1 / 2]))
    assert cm.mean_class_accuracy() == pytest.approx(np.mean([1.0, 0.5]))
    d = cm.to_dict(["bg", "a", "b", "c"])
    assert d["iou"]["b"] is None and d["iou"]["a"] == pytest.approx(0.5)


def test_predicted_but_absent_class_has_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[2, 0]]), np.array([[0, 0]]))
    assert cm.iou()[2] == 0.0
    assert np.isnan(cm.class_accuracy()[2])


@pytest.mark.parametrize("seed", range(5))
def test_random_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    c = 4
    cm = ConfusionMatrix(c)
    preds, gts = [], []
    for _ in range(3):
        gt = rng.integers(0, c, size=(7, 9))
        gt[rng.random(gt.shape) < 0.2] = 255
        pred = rng.integers(0, c, size=gt.shape).astype(np.uint8)
        cm.update(pred, gt.astype(np.uint8))
        preds.append(pred.ravel())
        gts.append(gt.ravel())
    pred_all, gt_all = np.concatenate(preds), np.concatenate(gts)
    np.testing.assert_array_equal(cm.matrix, brute_matrix(pred_all, gt_all, c))
    np.testing.assert_allclose(cm.iou(), [brute_iou(pred_all, gt_all, k) for k in range(c)])
    valid = gt_all != 255
    assert cm.pixel_accuracy() == pytest.approx(np.mean(pred_all[valid] == gt_all[valid]))


def test_whole_set_not_mean_of_images():
    # image 1: 1 pixel of class 1, correct; image 2: 99 pixels class 1, all predicted 0.
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1]]), np.array([[1]]))
    cm.update(np.zeros((1, 99), int), np.ones((1, 99), int))
    assert cm.iou()[1] == pytest.approx(1 / 100)


def test_merge_equals_single_accumulation():
    rng = np.random.default_rng(0)
    a, b, both = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    for target in (a, b):
        gt = rng.integers(0, 3, size=(5, 5))
        pred = rng.integers(0, 3, size=(5, 5))
        target.update(pred, gt)
        both.update(pred, gt)
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.matrix, both.matrix)
    with pytest.raises(ValueError, match="num_classes"):
        a.merge(ConfusionMatrix(4))


def test_out_of_range_ids_raise_naming_the_value():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[7\]"):
        cm.update(np.array([[0, 1]]), np.array([[7, 0]]))
    with pytest.raises(ValueError, match=r"prediction.*\[5\]"):
        cm.update(np.array([[5, 1]]), np.array([[0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    assert cm.matrix.sum() == 0  # nothing was half-added


def test_predicted_ignore_counts_as_a_miss():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[255, 1]]), np.array([[1, 1]]))
    assert cm.pixel_accuracy() == pytest.approx(0.5)
    assert cm.iou()[1] == pytest.approx(0.5)


def test_empty_and_from_counts():
    cm = ConfusionMatrix(2)
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())
    m, missed = confusion_counts(np.array([[0, 1]]), np.array([[0, 0]]), num_classes=2)
    again = ConfusionMatrix.from_counts(m, missed)
    assert again.pixel_accuracy() == 0.5
    d = again.to_dict()
    assert d["confusion_matrix"] == [[1, 1], [0, 0]]
