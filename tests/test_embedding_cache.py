"""The embedding cache returns what the backbone computed, and is keyed by data, seed and backbone."""

from pathlib import Path

import numpy as np

from fedsecmem.config import load_config
from fedsecmem.embedding_cache import cache_key, load_cached
from fedsecmem.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.products=[brick]", "data.train_per_product=4", "data.test_normal_per_product=2",
        "data.test_defect_per_product=2", "data.image_size=64", "data.crop_size=64", "clients.n=1",
        "method=local", "output.embedding_cache=null", "audit.leakage=false"]


def test_cached_run_matches_fresh_run(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config(ROOT / "configs/quickstart.yaml", TINY + [f"output.embedding_cache={cache}"])
    first = run(cfg, tmp_path / "a")
    assert len(list(cache.glob("emb-*.npz"))) == 1
    train, test, _ = load_cached(cfg)
    assert train.patches.shape == (4, 8, 8, 152) and test.patches.shape[0] == 4
    second = run(cfg, tmp_path / "b")
    assert first["auroc"] == second["auroc"]
    fresh = run(load_config(ROOT / "configs/quickstart.yaml", TINY), tmp_path / "c")
    assert np.isclose(fresh["auroc"]["image"], first["auroc"]["image"])


def test_key_changes_with_data_seed_and_backbone_but_not_device():
    base = load_config(ROOT / "configs/quickstart.yaml", TINY)
    k = cache_key(base)
    assert cache_key(load_config(ROOT / "configs/quickstart.yaml", TINY + ["seed=1"])) != k
    assert cache_key(load_config(ROOT / "configs/quickstart.yaml", TINY + ["data.image_size=96"])) != k
    assert cache_key(load_config(ROOT / "configs/quickstart.yaml", TINY + ["backbone.pool_size=1"])) != k
    assert cache_key(load_config(ROOT / "configs/quickstart.yaml", TINY + ["backbone.batch_size=7"])) == k
    assert cache_key(load_config(ROOT / "configs/quickstart.yaml", TINY + ["method=central"])) == k
