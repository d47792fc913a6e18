"""Metrics against known answers."""

import numpy as np
import pytest

from fedsecmem.detector.metrics import auroc, pixel_auroc, pro_score


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


def _imageset(labels, products, kinds):
    from fedsecmem.data.types import ImageSet

    n = len(labels)
    return ImageSet(np.zeros((n, 8, 8, 3), np.uint8), np.array(labels), np.array(products), list(kinds),
                    ["a", "b"], np.zeros((n, 8, 8), bool), apart=np.array([k.startswith("unc") for k in kinds]))


def test_per_category_and_uncertain_kinds_against_sklearn():
    """Each category is scored on its own images; uncertain kinds never enter the headline but get
    their own AUROC against the normals."""
    from sklearn.metrics import roc_auc_score

    from fedsecmem.detector.evaluate import across_clients, category_summary, evaluate_client
    from fedsecmem.detector.scoring import Scores

    labels = [0, 0, 1, 1, 0, 0, 1, 1, 1, 1]
    products = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    kinds = ["good", "good", "crack", "crack", "good", "good", "crack", "crack", "uncertain_p33", "uncertain_p67"]
    image = np.array([1.0, 3.0, 2.0, 4.0, 10.0, 11.0, 12.0, 9.0, 0.5, 13.0])  # product b scores higher
    test = _imageset(labels, products, kinds)
    patch = np.repeat(image[:, None, None], 4, axis=1).reshape(10, 2, 2)
    row = evaluate_client(test, Scores(patch, image, None), "patch", 0.0, False)
    head = slice(0, 8)
    assert row["n_test"] == 8 and row["n_test_anomalous"] == 4
    assert row["auroc_image"] == roc_auc_score(labels[head], image[head])
    assert row["per_category"]["a"]["auroc_image"] == roc_auc_score(labels[:4], image[:4]) == 0.75
    assert row["per_category"]["b"]["auroc_image"] == roc_auc_score(labels[4:8], image[4:8]) == 0.5
    assert row["per_kind"]["uncertain_p33"]["auroc_image"] == 0.0  # below every normal
    assert row["per_kind"]["uncertain_p67"]["auroc_image"] == 1.0
    assert row["per_kind"]["crack"]["n_test"] == 4 and not row["per_kind"]["crack"]["apart"]
    assert row["per_kind"]["uncertain_p33"]["apart"] and row["n_test_apart"] == 2
    # a name alone never puts a kind apart (a user's defect folder may be called anything)
    named = _imageset(labels, products, kinds)
    named.apart = None
    assert evaluate_client(named, Scores(patch, image, None), "patch", 0.0, False)["n_test"] == 10
    # image-level primary score without image embeddings: nothing is reported under its name
    none = evaluate_client(test, Scores(patch, image, None), "image", 0.0, False)
    assert none["auroc_image"] is None and none["per_category"] == {} and none["per_kind"] == {}
    # two clients: each category's figure is the test-size weighted mean of the clients' figures
    other = dict(row, per_category={"a": {"n_test": 12, "auroc_image": 1.0, "auroc_pixel": None}})
    merged = across_clients([row, other], "per_category")
    assert merged["a"]["auroc_image"] == (0.75 * 4 + 1.0 * 12) / 16 and merged["a"]["clients"] == 2
    assert merged["b"]["auroc_image"] == 0.5 and merged["b"]["clients"] == 1
    summary = category_summary([row, other])
    assert summary["category_mean_image"] == (merged["a"]["auroc_image"] + 0.5) / 2
