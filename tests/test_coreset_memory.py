"""Coreset selection, memory search and scoring against brute-force references."""

import numpy as np
import pytest

from fedsecmem.detector.coreset import coreset_size, greedy_coreset, pca_rotate
from fedsecmem.detector.memory import MemoryBank, coreset_bank
from fedsecmem.detector.scoring import anomaly_maps


def naive_greedy(x: np.ndarray, k: int, start: int) -> np.ndarray:
    """Textbook farthest-point sampling in float64."""
    x = x.astype(np.float64)
    chosen = [start]
    mind = ((x - x[start]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(np.argmax(mind))
        chosen.append(i)
        mind = np.minimum(mind, ((x - x[i]) ** 2).sum(1))
    return np.array(chosen)


def clustered(n=3000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d)) * 5
    return (centres[rng.integers(20, size=n)] + rng.normal(size=(n, d)) * np.linspace(2, 0.1, d)).astype(np.float32)


@pytest.mark.parametrize("bound_dim", [1, 4, 24, 64])
def test_pruned_greedy_equals_textbook_greedy(bound_dim):
    x = clustered()
    ours = greedy_coreset(x, 150, start=7, bound_dim=bound_dim)
    ref = naive_greedy(x, 150, start=7)
    np.testing.assert_array_equal(ours, ref)


def test_structureless_data_takes_the_dense_path_and_stays_exact():
    x = np.random.default_rng(3).random((2000, 40)).astype(np.float32)
    np.testing.assert_array_equal(greedy_coreset(x, 60, start=0), naive_greedy(x, 60, 0))


def test_covering_radius_is_within_twice_the_optimum_bound():
    x = clustered(n=1500, d=8, seed=2)
    k = 30
    sel = greedy_coreset(x, k, seed=1)
    assert len(set(sel.tolist())) == k
    d = np.sqrt(((x[:, None] - x[sel][None]) ** 2).sum(-1)).min(1)
    radius = d.max()
    # greedy k-center is a 2-approximation: radius <= 2 * OPT, and OPT >= half the
    # smallest pairwise distance among the k+1 greedy points (they are pairwise >= radius apart)
    nxt = int(np.argmax(d))
    pts = x[np.append(sel, nxt)]
    pair = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    pair[np.diag_indices_from(pair)] = np.inf
    assert pair.min() >= radius - 1e-4


def test_pca_rotation_keeps_distances():
    import torch
    x = torch.from_numpy(clustered(n=200))
    r = pca_rotate(x)
    def dists(a):
        a = a.double().numpy()
        return np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dists(x), dists(r), rtol=1e-4, atol=1e-3)


def test_coreset_size_and_trivial_cases():
    assert coreset_size(1000, 0.01) == 10
    assert coreset_size(10, 0.001) == 1
    assert coreset_size(10, 1.0) == 10
    x = np.zeros((5, 3), np.float32)
    np.testing.assert_array_equal(greedy_coreset(x, 9), np.arange(5))
    with pytest.raises(ValueError):
        greedy_coreset(x, 0)


def test_memory_bank_matches_brute_force():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    bank = MemoryBank(items)
    d, idx = bank.search(q, 3)
    full = np.sqrt(((q[:, None] - items[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(idx[:, 0], full.argmin(1))
    np.testing.assert_allclose(d, np.sort(full, 1)[:, :3], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bank.nearest_distance(items[:5]), 0, atol=1e-3)
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank(np.zeros((0, 4), np.float32))


def test_coreset_bank_keeps_ratio_and_original_vectors():
    patches = clustered(n=400, d=8).reshape(4, 10, 10, 8)
    bank = coreset_bank(patches, 0.1)
    assert len(bank) == 40
    flat = patches.reshape(-1, 8)
    assert all(((flat - item) ** 2).sum(1).min() == 0 for item in bank.items)


def test_anomaly_maps_upsample_and_peak_where_patch_is_high():
    s = np.zeros((1, 8, 8), np.float32)
    s[0, 2, 5] = 10
    m = anomaly_maps(s, 64, sigma=2)
    assert m.shape == (1, 64, 64)
    y, x = np.unravel_index(m[0].argmax(), (64, 64))
    assert 16 <= y < 24 and 40 <= x < 48
    assert m[0].max() < 10  # smoothed


def _eq7_by_hand(query_patches, items, k):
    """PatchCore eq. 7 written out for one image and one bank, brute force."""
    d = np.linalg.norm(query_patches[:, None] - items[None], axis=2)  # (P, M)
    patch = d.min(1)
    top = int(patch.argmax())
    m_star = int(d[top].argmin())
    order = np.argsort(np.linalg.norm(items - items[m_star], axis=1), kind="stable")[:k]
    dist = np.linalg.norm(query_patches[top] - items[order], axis=1)
    soft = np.exp(dist - dist.max()) / np.exp(dist - dist.max()).sum()
    return (1 - soft[0]) * patch[top], patch.max()


def test_reweighted_image_score_is_patchcore_eq7():
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.detector.scoring import score_embeddings

    rng = np.random.default_rng(3)
    items = rng.normal(size=(40, 6)).astype(np.float32)
    emb = Embeddings(rng.normal(size=(5, 3, 4, 6)).astype(np.float32) * 1.5, None)
    plain = score_embeddings(emb, [MemoryBank(items)], None)
    re9 = score_embeddings(emb, [MemoryBank(items)], None, reweight_k=9)
    np.testing.assert_array_equal(plain.patch, re9.patch)  # only the image score changes
    for i in range(5):
        want, top = _eq7_by_hand(emb.patches[i].reshape(-1, 6), items, 9)
        assert plain.image_patch[i] == pytest.approx(top, rel=1e-5)
        assert re9.image_patch[i] == pytest.approx(want, rel=1e-4)
        assert re9.image_patch[i] < plain.image_patch[i]
    # two banks: m* and its neighbours come from the bank holding the nearest item
    far = items + 100.0
    two = score_embeddings(emb, [MemoryBank(far), MemoryBank(items)], None, reweight_k=9)
    np.testing.assert_allclose(two.image_patch, re9.image_patch, rtol=1e-5)


def test_reweighting_ranks_a_sparse_region_above_a_dense_one():
    """Same distance to the nearest item: the item with far-away neighbours (a rare normal
    pattern seen once) weighs more than one in a dense cluster."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.detector.scoring import score_embeddings

    rng = np.random.default_rng(0)
    dense = rng.normal(scale=0.05, size=(30, 2))
    items = np.vstack([dense, [[10.0, 0.0]]]).astype(np.float32)
    q = np.array([[[[0.0, 1.0]]], [[[10.0, 1.0]]]], np.float32)  # 1 from the dense centre / the lone item
    s = score_embeddings(Embeddings(q, None), [MemoryBank(items)], None, reweight_k=5)
    assert s.image_patch[1] > s.image_patch[0]


def test_reweighting_a_one_item_bank_keeps_the_plain_max():
    """With no neighbour to weigh against, 1 - softmax would be 0 for every image."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.detector.scoring import score_embeddings

    emb = Embeddings(np.random.default_rng(0).normal(size=(4, 2, 2, 3)).astype(np.float32), None)
    one = [MemoryBank(np.zeros((1, 3), np.float32))]
    np.testing.assert_array_equal(score_embeddings(emb, one, None, reweight_k=9).image_patch,
                                  score_embeddings(emb, one, None).image_patch)


def test_coreset_bank_knows_its_covering_radius():
    """Known answer: the radius is the largest distance from any patch to its nearest bank item."""
    x = np.random.default_rng(4).normal(size=(3000, 12)).astype(np.float32)
    bank = coreset_bank(x, 0.05, seed=1)
    brute = np.sqrt(((x[:, None, :] - bank.items[None]) ** 2).sum(-1)).min(1).max()
    assert bank.radius == pytest.approx(brute, rel=1e-4)
    assert coreset_bank(x[:10], 1.0).radius == 0.0


def test_a_client_scores_only_with_global_items_near_its_own_patches():
    """feddymem.global_near: items of products the client never saw stay out of its scoring."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.config import FedDyMemConfig
    from fedsecmem.method.client import FedDyMemClient, GlobalMemory

    rng = np.random.default_rng(0)
    own = rng.normal(size=(6, 4, 4, 8)).astype(np.float32)  # the client's normal patches, near 0
    near = rng.normal(scale=0.5, size=(5, 8)).astype(np.float32)
    far = (rng.normal(size=(7, 8)) + 40.0).astype(np.float32)  # another product's patches
    memory = GlobalMemory(np.vstack([near, far]), None)
    for setting, used in ((None, 12), (1.0, 5)):
        cfg = FedDyMemConfig(use_generator=False, global_near=setting)
        client = FedDyMemClient(0, Embeddings(own, None), cfg, 0, 0.2, use_generator=False)
        client.rebuild_bank()
        client.receive(memory)
        assert client.global_used == used and len(client.global_bank) == used
        # a test patch that looks like the other product scores high only when its items are left out
        s = client.score(Embeddings(far[:1].reshape(1, 1, 1, 8), None), "local+global", 2)
        assert (s.image_patch[0] > 20.0) == (setting is not None)
