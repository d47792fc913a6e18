"""FedDyMem pieces: generator, metric loss (no collapse), memory-reduce, weighted k-means, simulation."""

import numpy as np
import pytest
import torch

from fedsecmem.config import FedDyMemConfig
from fedsecmem.method.generator import MemoryGenerator
from fedsecmem.method.kmeans import weighted_kmeans
from fedsecmem.method.metric_loss import anti_collapse_target, metric_loss, spread
from fedsecmem.method.reduce import reduce_images


def test_generator_starts_as_identity_or_orthonormal_projection():
    x = torch.randn(50, 16)
    g = MemoryGenerator(16, 16, 32)
    torch.testing.assert_close(g(x), x)
    p = MemoryGenerator(16, 8, 32)
    w = p.skip.weight
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    assert p.transform(np.zeros((2, 3, 3, 16), np.float32)).shape == (2, 3, 3, 8)


def _train(var_weight: float, steps: int = 300) -> tuple[float, float]:
    torch.manual_seed(0)
    x = torch.randn(2048, 12) * torch.linspace(0.5, 2.0, 12)
    g = MemoryGenerator(12, 12, 32, seed=0)
    target = anti_collapse_target(x)
    memory = torch.zeros(1, 12)  # a single memory item: the pull alone collapses onto it
    opt = torch.optim.Adam(g.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = metric_loss(g(x), memory, target, var_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(spread(g(x))), float(spread(x))


def test_spread_term_prevents_collapse_and_its_absence_collapses():
    kept, start = _train(var_weight=2.0)
    collapsed, _ = _train(var_weight=0.0)
    assert kept > 0.8 * start
    assert collapsed < 0.2 * start


def test_reduce_weights_sum_to_one_per_image_and_shrink():
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(3, 8, 8, 5)).astype(np.float32)
    protos, w = reduce_images(patches, ratio=16)
    assert protos.shape == (3, 4, 5) and w.shape == (3, 4)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    # a prototype is a weighted average of its image's patches: inside their bounding box
    for i in range(3):
        lo, hi = patches[i].reshape(-1, 5).min(0), patches[i].reshape(-1, 5).max(0)
        live = w[i] > 0
        assert (protos[i][live] >= lo - 1e-5).all() and (protos[i][live] <= hi + 1e-5).all()
    same, w1 = reduce_images(patches, ratio=1)
    np.testing.assert_array_equal(same.reshape(patches.shape), patches)
    np.testing.assert_allclose(w1.sum(1), 1.0, atol=1e-6)


def test_reduce_of_one_image_ignores_the_others():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    b = a.copy()
    b[1:] = rng.normal(size=(3, 6, 6, 3))
    pa, wa = reduce_images(a, 9)
    pb, wb = reduce_images(b, 9)
    np.testing.assert_allclose(pa[0], pb[0], atol=1e-6)
    np.testing.assert_allclose(wa[0], wb[0])


def test_weighted_kmeans_known_answer_and_weight_equals_duplication():
    pts = np.array([[0, 0], [0, 1], [10, 10], [10, 11], [20, 0]], float)
    w = np.array([1, 3, 1, 1, 2], float)
    centres, tot, obj = weighted_kmeans(pts, w, 3, seed=0)
    order = np.argsort(centres[:, 0])
    np.testing.assert_allclose(centres[order], [[0, 0.75], [10, 10.5], [20, 0]], atol=1e-6)
    np.testing.assert_allclose(tot[order], [4, 2, 2])
    assert obj == pytest.approx(3 * 0.25**2 + 0.75**2 + 2 * 0.5**2)
    dup = np.repeat(pts, w.astype(int), axis=0)
    c2, _, obj2 = weighted_kmeans(dup, np.ones(len(dup)), 3, seed=0)
    assert obj2 == pytest.approx(obj)
    with pytest.raises(ValueError):
        weighted_kmeans(pts, w[:2], 2)


def _tiny(method, tmp_path, extra=()):
    from pathlib import Path

    from fedsecmem.config import load_config
    from fedsecmem.run.runner import run
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/quickstart.yaml", [
        f"method={method}", "data.products=[brick,immunohistochemistry]", "data.train_per_product=6",
        "data.test_normal_per_product=4", "data.test_defect_per_product=4", "data.image_size=64",
        "data.crop_size=64", "clients.n=2", "feddymem.rounds=2", "feddymem.global_k=32",
        "output.embedding_cache=null", "protocol=plain", "privacy.dp=false", "audit.leakage=false", *extra])
    return run(cfg, tmp_path / method)


def test_feddymem_run_shares_reduced_memory_and_reports_rounds(tmp_path):
    r = _tiny("feddymem", tmp_path)
    assert r["rounds"] == 2 and len(r["per_round"]) == 2
    assert all(len(b) == 2 for b in r["comm"]["bytes_up"])
    full = _tiny("feddymem", tmp_path / "noreduce", ["feddymem.reduce_ratio=1"])
    # memory-reduce with ratio 16 shares about 16x fewer patch floats
    assert full["comm"]["bytes_up"][0][0] > 5 * r["comm"]["bytes_up"][0][0]
    assert (tmp_path / "feddymem" / "auroc_per_round.png").exists()


def test_fedprox_with_mu_zero_is_fedavg(tmp_path):
    a = _tiny("fedavg", tmp_path)
    b = _tiny("fedprox", tmp_path, ["feddymem.prox_mu=0"])
    assert a["auroc"]["image"] == b["auroc"]["image"]
    assert a["comm"]["bytes_up"] == b["comm"]["bytes_up"]
    # the generator's parameters and the client's weight, as float32
    assert a["comm"]["bytes_up"][0][0] == MemoryGenerator(152, 152, FedDyMemConfig().hidden).n_bytes() + 4


def test_weighted_kmeans_runs_lloyd_to_convergence():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(800, 6)), rng.random(800)
    one = weighted_kmeans(x, w, 12, iters=1, seed=0)[2]
    two = weighted_kmeans(x, w, 12, iters=2, seed=0)[2]
    centres, _, full = weighted_kmeans(x, w, 12, iters=200, seed=0)
    assert full < two < one  # each further Lloyd update lowers the objective
    # at the returned centres another Lloyd update gains (almost) nothing: converged
    from fedsecmem.method.kmeans import lloyd_step
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    sums, tot, _ = lloyd_step(xt, wt, torch.from_numpy(centres.astype(np.float64)))
    moved = sums / tot[:, None]
    _, _, d2 = lloyd_step(xt, wt, moved)
    assert float((wt * d2).sum()) >= full * (1 - 1e-4)


@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    runs = {p: _tiny("feddymem", tmp / p, [f"protocol={p}"]) for p in ("secagg", "ckks")}
    runs["plain"] = _tiny("feddymem", tmp / "plain", ["protocol=plain", "feddymem.kmeans_init=pca-partition"])
    runs["upload"] = _tiny("feddymem", tmp / "upload", ["protocol=plain"])
    return runs


@pytest.mark.parametrize("protocol", ["secagg", "ckks"])
def test_secure_feddymem_matches_plain_auroc(protocol_runs, protocol):
    secure, plain = protocol_runs[protocol], protocol_runs["plain"]
    assert secure["protocol"] == protocol and secure["aggregation"]["kmeans_init"] == "pca-partition"
    assert abs(secure["auroc"]["image"] - plain["auroc"]["image"]) <= 0.002
    assert abs(secure["auroc"]["pixel"] - plain["auroc"]["pixel"]) <= 0.002
    rnd = secure["per_round"][-1]
    assert rnd["secure_sums"] > 2 and rnd["kmeans_objective"] == pytest.approx(
        plain["per_round"][-1]["kmeans_objective"], rel=1e-3)
    # masked uint64 / ciphertexts cost more bytes than plain float32 sums
    assert secure["comm"]["bytes_up"][0][0] > plain["comm"]["bytes_up"][0][0]


def test_plain_upload_mode_is_the_faithful_feddymem(protocol_runs):
    r = protocol_runs["upload"]
    assert r["aggregation"] == {"protocol": "plain", "kmeans_init": "kmeans++"}
    assert r["per_round"][0]["secure_sums"] == 0


def test_secure_protocol_refuses_kmeans_pp_seeding():
    from fedsecmem.config import config_from_dict
    from fedsecmem.errors import UserError
    with pytest.raises(UserError, match="kmeans\\+\\+ shows the server every prototype"):
        config_from_dict({"method": "feddymem", "protocol": "secagg", "feddymem": {"kmeans_init": "kmeans++"}})


def test_fedavg_averages_through_secagg(tmp_path):
    plain = _tiny("fedavg", tmp_path / "p")
    secure = _tiny("fedavg", tmp_path / "s", ["protocol=secagg"])
    assert secure["protocol"] == "secagg"
    assert abs(secure["auroc"]["image"] - plain["auroc"]["image"]) <= 0.002


def test_a_client_without_test_images_is_not_scored_and_the_run_completes(tmp_path):
    """Many clients, few test images: some clients get none. They take part in training and the
    global memory, and their row says they were not scored (n_test 0, AUROC null)."""
    from fedsecmem.config import config_from_dict
    from fedsecmem.run.runner import run

    cfg = config_from_dict({
        "name": "sparse-test", "method": "feddymem", "protocol": "secagg",
        "data": {"products": ["brick", "grass"], "train_per_product": 12, "test_normal_per_product": 1,
                 "test_defect_per_product": 1, "image_size": 64, "crop_size": 64},
        "clients": {"n": 6, "alpha": 10.0}, "privacy": {"dp": False},
        "feddymem": {"rounds": 2, "global_k": 8, "global_k_images": 4},
        "output": {"embedding_cache": None, "map_examples_per_product": 0}})
    res = run(cfg, tmp_path / "out")
    empty = [row for row in res["per_client"] if row["n_test"] == 0]
    scored = [row for row in res["per_client"] if row["n_test"] > 0]
    assert len(empty) >= 2 and all(row["auroc_image"] is None for row in empty)
    assert scored and res["auroc"]["image"] is not None
    assert all(r["participants"] == list(range(6)) for r in res["per_round"])  # everyone still trained and shared
