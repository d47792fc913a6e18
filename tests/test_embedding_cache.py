"""The embedding cache returns what the backbone computed, keyed on everything that determines it:
the embedder's code, the weights file's content, the backbone settings that shape the output and
the images themselves; an unreadable cache file is a miss, never a failed run."""

import copy
import hashlib
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest

import fedsecmem.detector.embedding_cache as ec
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.config import load_config
from fedsecmem.data.load import load_benchmark
from fedsecmem.data.types import Benchmark, ImageSet
from fedsecmem.detector.embedding_cache import cache_ingredients, cache_key, load_cached, store_cached
from fedsecmem.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.products=[brick]", "data.train_per_product=4", "data.test_normal_per_product=2",
        "data.test_defect_per_product=2", "data.image_size=64", "data.crop_size=64", "clients.n=1",
        "method=local", "output.embedding_cache=null", "audit.leakage=false"]


def _bench(seed: int = 0, n_train: int = 3, n_test: int = 2, size: int = 8) -> Benchmark:
    rng = np.random.default_rng(seed)

    def images(n: int, label: int) -> ImageSet:
        return ImageSet(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.full(n, label),
                        np.zeros(n, np.int64), ["good" if label == 0 else "scratch"] * n, ["brick"])

    return Benchmark("tiny", images(n_train, 0), images(n_test, 1))


def _emb(n: int, seed: int) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(rng.random((n, 2, 2, 4), dtype=np.float32), rng.random((n, 5), dtype=np.float32))


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"fake state dict, version 1")
    return path


def _cfg(tmp_path, weights, *extra):
    return load_config(ROOT / "configs/quickstart.yaml",
                       [f"output.embedding_cache={tmp_path / 'cache'}", f"backbone.weights={weights}", *extra])


def _store(cfg, bench):
    train, test = _emb(len(bench.train), 1), _emb(len(bench.test), 2)
    store_cached(cfg, bench, train, test, {"embed_train_s": 1.5, "embed_test_s": 0.5})
    return train, test


def test_stored_embeddings_come_back_with_their_ingredients(tmp_path, weights):
    cfg, bench = _cfg(tmp_path, weights), _bench()
    train, test = _store(cfg, bench)
    hit = load_cached(cfg, bench)
    assert hit is not None
    got_train, got_test, timings = hit
    np.testing.assert_array_equal(got_train.patches, train.patches)
    np.testing.assert_array_equal(got_train.images, train.images)
    np.testing.assert_array_equal(got_test.patches, test.patches)
    np.testing.assert_array_equal(got_test.images, test.images)
    assert timings == {"embed_train_s": 1.5, "embed_test_s": 0.5}
    key = cache_key(cfg, bench)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"emb-{key}.json", f"emb-{key}.npz"]
    why = json.loads((tmp_path / "cache" / f"emb-{key}.json").read_text())  # readable by a person
    assert why == cache_ingredients(cfg, bench)
    assert why["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert why["data"]["train"]["images_sha256"] != why["data"]["test"]["images_sha256"]
    assert set(why["backbone"]) == {"name", "weights", "layers", "image_layer", "pool_size"}
    with np.load(tmp_path / "cache" / f"emb-{key}.npz") as z:
        assert json.loads(str(z["ingredients_json"])) == why


def test_unchanged_inputs_hit_whatever_the_device_setting_batch_size_or_method(tmp_path, weights):
    bench = _bench()
    _store(_cfg(tmp_path, weights), bench)
    same = copy.deepcopy(bench)  # other arrays, same content
    for extra in ([], ["backbone.device=auto"], ["backbone.batch_size=7"], ["backbone.allow_network=true"],
                  ["method=central"], ["seed=5"]):  # the seed matters only through the images
        assert load_cached(_cfg(tmp_path, weights, *extra), same) is not None, extra


def test_embeddings_made_on_another_kind_of_device_miss(tmp_path, weights, monkeypatch):
    import torch

    cfg, bench = _cfg(tmp_path, weights), _bench()
    _store(cfg, bench)
    monkeypatch.setattr(ec.fedsecmem.detector.backbone, "resolve_device", lambda name: torch.device("cuda"))
    assert load_cached(cfg, bench) is None


def test_a_change_of_the_embedder_source_misses(tmp_path, weights, monkeypatch):
    cfg, bench = _cfg(tmp_path, weights), _bench()
    _store(cfg, bench)
    real = ec.embedder_source_digest()
    monkeypatch.setattr(ec, "embedder_source_digest", lambda: "f" * 64)
    assert load_cached(cfg, bench) is None
    monkeypatch.setattr(ec, "embedder_source_digest", lambda: real)
    assert load_cached(cfg, bench) is not None


def test_the_source_digest_follows_the_embedding_modules_bytes(tmp_path, monkeypatch):
    src = tmp_path / "fake_backbone.py"
    module = types.ModuleType("fake_backbone")
    module.__file__ = str(src)
    monkeypatch.setattr(ec, "_EMBEDDER_MODULES", (module,))
    src.write_text("POOL = dict(count_include_pad=False)\n")
    before = ec.embedder_source_digest()
    src.write_text("POOL = dict(count_include_pad=True)\n")
    assert ec.embedder_source_digest() != before
    monkeypatch.undo()
    assert ec._EMBEDDER_MODULES[0].__name__ == "fedsecmem.detector.backbone"


def test_a_change_of_the_weights_content_misses_and_hashes_are_memoized(tmp_path, weights, monkeypatch):
    calls = []
    import fedsecmem.provenance as provenance

    real_hash = provenance.hash_file
    monkeypatch.setattr(provenance, "hash_file", lambda p: calls.append(p) or real_hash(p))
    cfg, bench = _cfg(tmp_path, weights), _bench()
    _store(cfg, bench)
    assert load_cached(cfg, bench) is not None
    assert len(calls) == 1  # the same (path, size, mtime) is hashed once per process
    st = weights.stat()
    weights.write_bytes(b"fake state dict, version 2")  # same size, other content
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load_cached(cfg, bench) is None
    assert len(calls) == 2


def test_builtin_hub_and_file_weights_key_differently(tmp_path, weights, monkeypatch):
    bench = _bench()
    builtin = tmp_path / "builtin.pt"
    builtin.write_bytes(weights.read_bytes())
    monkeypatch.setattr(ec.fedsecmem.detector.backbone, "builtin_weights_path", lambda: builtin)
    keys = {cache_key(_cfg(tmp_path, w), bench) for w in (weights, "builtin", "hub")}
    assert len(keys) == 3
    hub = cache_ingredients(_cfg(tmp_path, "hub"), bench)["weights"]
    assert hub["source"] == "hub" and hub["name"] == "tf_efficientnet_lite0" and "timm" in hub


def test_a_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="backbone.weights"):
        load_cached(_cfg(tmp_path, tmp_path / "absent.pt"), _bench())


@pytest.mark.parametrize("split", ["train", "test"])
def test_one_changed_pixel_misses(tmp_path, weights, split):
    cfg, bench = _cfg(tmp_path, weights), _bench()
    _store(cfg, bench)
    edited = copy.deepcopy(bench)
    getattr(edited, split).images[-1, 3, 4, 1] ^= 1
    assert load_cached(cfg, edited) is None
    assert load_cached(cfg, bench) is not None


def test_other_seed_order_or_size_of_the_data_misses(tmp_path, weights):
    cfg, bench = _cfg(tmp_path, weights), _bench(seed=0)
    _store(cfg, bench)
    assert load_cached(cfg, _bench(seed=1)) is None
    swapped = copy.deepcopy(bench)  # embeddings are per row: the order matters
    swapped.train.images[[0, 1]] = swapped.train.images[[1, 0]]
    assert load_cached(cfg, swapped) is None
    assert load_cached(cfg, _bench(size=16)) is None


def test_backbone_settings_that_shape_the_output_miss(tmp_path, weights):
    bench = _bench()
    _store(_cfg(tmp_path, weights), bench)
    for extra in (["backbone.pool_size=1"], ["backbone.layers=[1,2]"], ["backbone.image_layer=null"],
                  ["backbone.name=resnet18"]):
        assert load_cached(_cfg(tmp_path, weights, *extra), bench) is None, extra


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other_ingredients", "wrong_count"])
def test_a_damaged_cache_file_is_a_miss_and_is_replaced(tmp_path, weights, damage):
    cfg, bench = _cfg(tmp_path, weights), _bench()
    _store(cfg, bench)
    path = tmp_path / "cache" / f"emb-{cache_key(cfg, bench)}.npz"
    data = path.read_bytes()
    if damage == "truncate":  # a half-written file
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "other_ingredients":  # a readable npz, but other images' (copied, renamed)
        other, other_cfg = _bench(seed=1), _cfg(tmp_path / "other", weights)
        _store(other_cfg, other)
        path.write_bytes((tmp_path / "other" / "cache" / f"emb-{cache_key(other_cfg, other)}.npz").read_bytes())
    else:  # this key's ingredients, but fewer rows than images
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["train_patches"] = arrays["train_patches"][:-1]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    with pytest.warns(RuntimeWarning, match="embedding cache"):
        assert load_cached(cfg, bench) is None
    train, _ = _store(cfg, bench)
    hit = load_cached(cfg, bench)
    assert hit is not None and np.array_equal(hit[0].patches, train.patches)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_off_reads_and_writes_nothing(tmp_path, weights, monkeypatch):
    cfg, bench = _cfg(tmp_path, weights, "output.embedding_cache=null"), _bench()
    monkeypatch.setattr(ec, "cache_ingredients", lambda *a: pytest.fail("hashed with the cache off"))
    assert load_cached(cfg, bench) is None
    _store(cfg, bench)
    assert not (tmp_path / "cache").exists()


def test_cached_run_matches_fresh_run_and_survives_a_truncated_cache(tmp_path):
    """Full runs (need runner.py to call load_cached(cfg, bench) / store_cached(cfg, bench, ...))."""
    from fedsecmem.run.runner import run

    cache = tmp_path / "cache"
    cfg = load_config(ROOT / "configs/quickstart.yaml", TINY + [f"output.embedding_cache={cache}"])
    fresh = run(cfg, tmp_path / "a")
    (path,) = cache.glob("emb-*.npz")
    assert path.with_suffix(".json").is_file()
    bench = load_benchmark(cfg.data, cfg.seed)
    train, test, _ = load_cached(cfg, bench)
    assert train.patches.shape == (4, 8, 8, 152) and test.patches.shape[0] == 4
    path.write_bytes(path.read_bytes()[:1000])  # half-written: embedded again, not a crash
    with pytest.warns(RuntimeWarning, match="embedding cache"):
        again = run(cfg, tmp_path / "b")
    assert np.isclose(again["auroc"]["image"], fresh["auroc"]["image"])
    assert load_cached(cfg, bench) is not None  # replaced by a whole file
    stored = path.stat()
    cached = run(cfg, tmp_path / "c")
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stored.st_ino, stored.st_mtime_ns)  # a hit
    assert cached["timing"]["embed_train_s"] == again["timing"]["embed_train_s"]  # the stored timings
    assert cached["auroc"] == again["auroc"]
