"""Pre/post-processing conventions of the released weights."""

import numpy as np
import pytest
import torch

from pipeline.constants import MEAN_BGR
from pipeline.model import deeplab_v1
from pipeline.preprocess import aligned_size, coarse_size, prepare_batch, upsample_logits


def test_prepare_batch_is_bgr_minus_mean_and_pads_bottom_right_with_zero():
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30  # R, G, B
    batch = prepare_batch([rgb], input_size=9)
    assert batch.shape == (1, 3, 9, 9)
    expected = torch.tensor([30 - MEAN_BGR[0], 20 - MEAN_BGR[1], 10 - MEAN_BGR[2]])
    assert torch.allclose(batch[0, :, 4, 6], expected)
    assert torch.count_nonzero(batch[0, :, 5:, :]) == 0 and torch.count_nonzero(batch[0, :, :, 7:]) == 0


def test_prepare_batch_default_size_is_the_aligned_largest_side():
    batch = prepare_batch([np.zeros((10, 20, 3), np.uint8), np.zeros((30, 4, 3), np.uint8)])
    assert batch.shape[-2:] == (33, 33)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_prepare_batch_rejects_bad_images(bad):
    with pytest.raises(ValueError, match=r"images\[0\]"):
        prepare_batch([bad])


def test_prepare_batch_rejects_images_larger_than_input_size():
    with pytest.raises(ValueError, match="exceeds input_size"):
        prepare_batch([np.zeros((40, 10, 3), np.uint8)], input_size=33)


@pytest.mark.parametrize("size,coarse", [(321, 41), (513, 65), (500, 64), (375, 48), (1, 1), (9, 2), (10, 3)])
def test_coarse_size_matches_the_network(size, coarse):
    assert coarse_size(size) == coarse
    assert aligned_size(size) >= size and aligned_size(size) % 8 == 1


def test_coarse_size_equals_network_output_on_odd_sizes():
    model = deeplab_v1("largefov", num_classes=3, width=0.0625).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 50, 37))
    assert out.shape[-2:] == (coarse_size(50), coarse_size(37))


def test_upsample_is_align_corners_then_crop():
    logits = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    up = upsample_logits(logits, height=15, width=12)
    assert up.shape == (2, 15, 12)
    # align_corners=True: every 8th pixel is exactly a coarse value.
    assert torch.equal(up[:, ::8, ::8], logits[:, :2, :2])
    # Midway between two coarse samples is their mean.
    assert torch.allclose(up[0, 0, 4], (logits[0, 0, 0] + logits[0, 0, 1]) / 2)


def test_upsample_batched_and_fp16():
    logits = torch.randn(4, 5, 6, 6).half()
    up = upsample_logits(logits, height=41, width=33)
    assert up.shape == (4, 5, 41, 33) and up.dtype == torch.float32


def test_upsample_refuses_sizes_the_scores_do_not_cover():
    with pytest.raises(ValueError, match="covers at most 17x17"):
        upsample_logits(torch.zeros(2, 3, 3), height=18, width=10)
