"""Metrics against known answers."""

import numpy as np
import pytest

from fedsecmem.metrics import auroc, pixel_auroc, pro_score


def test_auroc_known_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([0, 0, 0], [1, 2, 3]) is None


def test_pixel_auroc_perfect_and_inverted():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    maps = masks.astype(float)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks, -maps) == 0.0


def test_pro_weights_regions_equally():
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 0:20, 0:20] = True  # big region (400 px)
    masks[0, 30:32, 30:32] = True  # small region (4 px)
    normal = np.random.default_rng(0).uniform(-1.0, -0.5, masks.shape)
    hit_big = np.where(masks, -2.0, normal)  # regions below every normal pixel: missed
    hit_big[0, 0:20, 0:20] = 1.0
    hit_small = np.where(masks, -2.0, normal)
    hit_small[0, 30:32, 30:32] = 1.0
    # finding only one of two regions gives PRO about 0.5 whatever the region's size
    assert pro_score(masks, hit_big) == pytest.approx(0.5, abs=0.02)
    assert pro_score(masks, hit_small) == pytest.approx(0.5, abs=0.02)
    perfect = masks.astype(float)
    assert pro_score(masks, perfect) == pytest.approx(1.0, abs=0.02)
    assert pro_score(np.zeros((1, 4, 4), bool), perfect[:, :4, :4]) is None


def test_pro_random_maps_are_low():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), bool)
    masks[:, 10:20, 10:20] = True
    assert pro_score(masks, rng.random(masks.shape)) < 0.25
