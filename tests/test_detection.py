"""End-to-end detection quality on real images: the pipeline must find defects and semantic anomalies."""

from pathlib import Path

import pytest

from fedsecmem.config import load_config
from fedsecmem.run.runner import run

ROOT = Path(__file__).resolve().parents[1]


def test_textures_defects_are_detected_and_localised(tmp_path):
    """Regression floor on real photos: averaging border patches over their valid neighbours only
    (count_include_pad=False) gave image AUROC 0.689 and a category mean of 0.737 here."""
    cfg = load_config(ROOT / "configs/textures.yaml", [
        "method=central", "data.products=[brick,gravel,immunohistochemistry]",
        "data.train_per_product=20", "data.test_normal_per_product=10", "data.test_defect_per_product=10",
        "data.image_size=128", "data.crop_size=128", "clients.n=1",
    ])
    r = run(cfg, tmp_path)
    a = r["auroc"]
    assert a["image"] > 0.8  # measured 0.841 (0.689 with the border averaged over valid cells only)
    assert a["category_mean_image"] > 0.83  # measured 0.877 (0.737)
    assert a["pixel"] > 0.86  # measured 0.886 (0.848)
    assert a["pro"] > 0.3
    assert set(a["per_category"]) == {"brick", "gravel", "immunohistochemistry"}
    assert all(c["n_test"] == 20 for c in a["per_category"].values())
    assert a["category_mean_image"] == pytest.approx(sum(c["auroc_image"] for c in a["per_category"].values()) / 3)
    assert sum(k["n_test"] for k in a["per_kind"].values()) == 30  # every defective image in one kind


def test_fmnist_one_vs_rest_sneakers(tmp_path):
    cfg = load_config(ROOT / "configs/fmnist_ovr.yaml", [
        "data.normal_class=7", "data.image_size=96", "data.train_per_product=50", "data.test_per_class=20",
    ])
    r = run(cfg, tmp_path)
    assert r["auroc"]["image_knn"] > 0.9  # measured 0.997
    assert r["auroc"]["image_patch_max"] > 0.85  # measured 0.97
    assert r["auroc"]["pixel"] is None


def test_federated_split_local_is_not_better_than_central_on_skewed_clients(tmp_path):
    """With strong product skew, clients alone see fewer images than the pool. With 12 images per
    product one seed's pixel AUROC moves by about 0.02 either way (measured: central - local = -0.018
    at seed 0, +0.017 at seed 1), so the claim is checked on the mean of two seeds."""
    gaps = []
    for seed in (0, 1):
        base = ["data.products=[brick,gravel,immunohistochemistry]", "data.train_per_product=12",
                "data.test_normal_per_product=8", "data.test_defect_per_product=8", "data.image_size=96",
                "data.crop_size=96", "clients.n=3", "clients.alpha=0.3", f"seed={seed}"]
        local = run(load_config(ROOT / "configs/textures.yaml", base + ["method=local"]), tmp_path / f"l{seed}")
        central = run(load_config(ROOT / "configs/textures.yaml", base + ["method=central"]), tmp_path / f"c{seed}")
        assert [c["n_train"] for c in local["per_client"]] == [c["n_train"] for c in central["per_client"]]
        assert len({c["bank_size"] for c in central["per_client"]}) == 1  # one pooled bank for everyone
        assert central["per_client"][0]["bank_size"] == pytest.approx(
            sum(c["bank_size"] for c in local["per_client"]), abs=len(local["per_client"]))
        gaps.append(central["auroc"]["pixel"] - local["auroc"]["pixel"])
    assert sum(gaps) / len(gaps) >= -0.01
