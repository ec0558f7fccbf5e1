"""Trimap bands against a pixel-by-pixel brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.metrics import ConfusionMatrix
from pipeline.evaluation.trimap import TrimapConfusion, boundary_mask, trimap_counts


def brute_boundary(gt):
    h, w = gt.shape
    out = np.zeros(gt.shape, bool)
    for y in range(h):
        for x in range(w):
            if gt[y, x] == 255:
                out[y, x] = True
                continue
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and gt[yy, xx] != gt[y, x]:
                    out[y, x] = True
    return out


def brute_band_matrix(pred, gt, num_classes, width):
    edge = brute_boundary(gt)
    pts = [(y, x) for y in range(gt.shape[0]) for x in range(gt.shape[1]) if edge[y, x]]
    m = np.zeros((num_classes, num_classes), np.int64)
    for y in range(gt.shape[0]):
        for x in range(gt.shape[1]):
            if gt[y, x] == 255 or not pts:
                continue
            d = min(math.hypot(y - py, x - px) for py, px in pts)
            if d <= width:
                m[gt[y, x], pred[y, x]] += 1
    return m


def make_case(seed, size=(14, 17), num_classes=3):
    rng = np.random.default_rng(seed)
    gt = np.zeros(size, np.uint8)
    for _ in range(2):
        y0, x0 = rng.integers(0, size[0] - 4), rng.integers(0, size[1] - 4)
        gt[y0 : y0 + rng.integers(3, 8), x0 : x0 + rng.integers(3, 9)] = rng.integers(1, num_classes)
    if seed % 2:
        gt[boundary_mask(gt) & (rng.random(size) < 0.5)] = 255
    pred = gt.copy()
    pred[pred == 255] = 0
    flip = rng.random(size) < 0.3
    pred[flip] = rng.integers(0, num_classes, size=int(flip.sum()))
    return pred, gt


def test_boundary_mask_matches_brute_force():
    for seed in range(4):
        _, gt = make_case(seed)
        np.testing.assert_array_equal(boundary_mask(gt), brute_boundary(gt))


@pytest.mark.parametrize("seed", range(4))
def test_bands_match_brute_force(seed):
    pred, gt = make_case(seed)
    counts = trimap_counts(pred, gt, num_classes=3, max_width=6)
    assert counts.shape == (6, 3, 4)
    for w in (1, 2, 3, 6):
        np.testing.assert_array_equal(counts[w - 1, :, :3], brute_band_matrix(pred, gt, 3, w), err_msg=f"w={w}")


def test_hand_made_band_one():
    # Vertical edge between columns 1 and 2 of a 1 x 5 strip: boundary = cols 1, 2;
    # band 1 adds cols 0 and 3; col 4 is at distance 2.
    gt = np.array([[0, 0, 1, 1, 1]])
    pred = np.array([[1, 0, 1, 1, 0]])
    t = TrimapConfusion(2, max_width=2)
    t.update(pred, gt)
    np.testing.assert_array_equal(t.band(1).matrix, [[1, 1], [0, 2]])
    assert t.pixel_accuracy()[0] == pytest.approx(3 / 4)
    assert t.pixel_accuracy()[1] == pytest.approx(3 / 5)


def test_widest_band_covers_everything_near_and_equals_full_matrix():
    pred, gt = make_case(1, size=(12, 12))
    t = TrimapConfusion(3, max_width=40)
    t.update(pred, gt)
    full = ConfusionMatrix(3)
    full.update(pred, gt)
    np.testing.assert_array_equal(t.band(40).matrix, full.matrix)
    assert np.all(np.diff(t.pixels()) >= 0)  # bands are nested


def test_no_boundary_contributes_nothing():
    t = TrimapConfusion(2, max_width=3)
    t.update(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert t.counts.sum() == 0
    assert all(math.isnan(v) for v in t.miou())
