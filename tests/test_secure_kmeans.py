"""Federated k-means and weighted averages over the secure sums: equal to the pooled computation,
close to plaintext k-means++, and the same under every protocol."""

import numpy as np
import pytest

from fedsecmem.method.kmeans import weighted_kmeans
from fedsecmem.protocols.kmeans_party import local_moments
from fedsecmem.protocols.secure_kmeans import federated_kmeans, pca_from_sums, secure_weighted_average
from fedsecmem.protocols.secure_sum import make_secure_sum


def _mixture(n_clients=4, per=400, dim=12, modes=20, seed=0):
    """Non-IID parts: each client draws from its own subset of the mixture's modes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (modes, dim))
    parts = {}
    for c in range(n_clients):
        mine = rng.choice(modes, modes // 2, replace=False)
        x = centres[rng.choice(mine, per)] + rng.normal(0, 1, (per, dim))
        parts[c] = (x, rng.uniform(0.05, 1.0, per))
    return parts


def _union(parts):
    return np.concatenate([p[0] for p in parts.values()]), np.concatenate([p[1] for p in parts.values()])


def test_pca_from_summed_moments_equals_pooled_covariance():
    parts = _mixture()
    total = sum(local_moments(x, w) for x, w in parts.values())
    mean, basis = pca_from_sums(total, 12, 3)
    x, w = _union(parts)
    ref_mean = np.average(x, axis=0, weights=w)
    cov = np.cov(x.T, aweights=w, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    assert np.allclose(mean, ref_mean)
    assert np.allclose(np.abs(basis.T @ vecs[:, ::-1][:, :3]), np.eye(3), atol=1e-8)


def test_federated_equals_the_same_algorithm_on_pooled_data():
    parts = _mixture()
    plain = make_secure_sum("plain")
    fed = federated_kmeans(parts, 32, plain, iters=30)
    pooled = federated_kmeans({0: _union(parts)}, 32, plain, iters=30)
    assert fed.objective == pytest.approx(pooled.objective, rel=1e-6)
    assert np.allclose(np.sort(fed.centres, axis=0), np.sort(pooled.centres, axis=0), atol=1e-4)
    assert fed.weights.sum() == pytest.approx(_union(parts)[1].sum(), rel=1e-6)


@pytest.mark.parametrize("k", [16, 64])
def test_objective_within_five_percent_of_plaintext_kmeans_pp(k):
    parts = _mixture(seed=1)
    x, w = _union(parts)
    fed = federated_kmeans(parts, k, make_secure_sum("plain"), iters=20)
    ref = min(weighted_kmeans(x, w, k, 20, seed)[2] for seed in range(3))
    assert fed.objective <= 1.05 * ref


@pytest.mark.parametrize("protocol", ["secagg", "ckks"])
def test_secure_protocols_give_the_plain_result(protocol):
    parts = _mixture(n_clients=3, per=200, seed=2)
    # tol=0: run to a fixed point (CKKS noise may cost an extra update to notice it)
    plain = federated_kmeans(parts, 24, make_secure_sum("plain", wire="float64"), iters=10, tol=0)
    secure = federated_kmeans(parts, 24, make_secure_sum(protocol), iters=10, tol=0)
    # quantization (secagg) and CKKS noise move sums by ~1e-7: a point lying exactly on a split
    # boundary could switch sides, so compare the centre sets and the objective, not bit patterns
    gap = np.abs(secure.centres[:, None] - plain.centres[None]).max(-1).min(1)
    assert np.mean(gap < 1e-4) >= 0.9 and gap.max() < 0.1
    assert secure.objective == pytest.approx(plain.objective, rel=1e-3)
    assert all(b > 0 for b in secure.cost.bytes_up.values())


def test_secure_weighted_average():
    rng = np.random.default_rng(3)
    values = {c: (rng.normal(size=50), float(rng.integers(1, 20))) for c in range(5)}
    ref = np.average([v for v, _ in values.values()], axis=0, weights=[w for _, w in values.values()])
    for protocol in ("plain", "secagg", "ckks"):
        avg, cost = secure_weighted_average(values, make_secure_sum(protocol))
        assert np.abs(avg - ref).max() < 1e-5, protocol
        assert cost.sums == 1
