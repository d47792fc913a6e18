"""Parameter-sharing baselines: SoftPull's limits (0 = local training, huge = the global model),
Weight Scope Alignment (weight 0 = the plain baseline; a weight pulls the scopes in), the FedSM
model selector (beats chance on held-out images), and a FedSM run end to end."""

import copy
import json

import numpy as np
import pytest
import torch

from fedsecmem.method.aggregation import average_states
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.config import FedDyMemConfig, config_from_dict
from fedsecmem.errors import UserError
from fedsecmem.method.client import FedDyMemClient
from fedsecmem.baselines.fedsm import ModelSelector, PullTerm, pick, train_selector
from fedsecmem.protocols.secure_sum import PlainSum
from fedsecmem.detector.scoring import Scores
from fedsecmem.baselines.wsa import ScopeTerm, scope_of, scope_penalty, split_scope, with_scope


def _client(seed: int = 3, scale: float = 1.0) -> FedDyMemClient:
    rng = np.random.default_rng(0)
    patches = (rng.normal(size=(12, 4, 4, 16)) * scale).astype(np.float32)
    cfg = FedDyMemConfig(hidden=32, batch_size=64, max_steps_per_epoch=4, local_epochs=2)
    cl = FedDyMemClient(0, Embeddings(patches, None), cfg, seed, 0.5)
    cl.rebuild_bank()
    return cl


def _states_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _reference() -> dict:
    """Another generator's weights: what the global model might be."""
    other = _client(seed=11, scale=2.0)
    other.train_towards(torch.from_numpy(other.bank.items * 0.5))
    return copy.deepcopy(other.generator.state_dict())


def test_softpull_zero_is_local_training_and_huge_is_the_global_model():
    ref = _reference()
    personal, local = _client(), _client()
    for _ in range(2):
        personal.train_towards(torch.from_numpy(personal.bank.items), [PullTerm(0.0, ref)])
        personal.rebuild_bank()
        local.train_towards(torch.from_numpy(local.bank.items))
        local.rebuild_bank()
    assert _states_equal(personal.generator.state_dict(), local.generator.state_dict())
    pulled = _client()
    pulled.train_towards(torch.from_numpy(pulled.bank.items), [PullTerm(1e12, ref)])
    for k, v in pulled.generator.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-6), k
    between = _client()
    between.train_towards(torch.from_numpy(between.bank.items), [PullTerm(50.0, ref)])
    dist = lambda s: sum(float(((s[k] - ref[k]) ** 2).sum()) for k in ref)  # noqa: E731
    assert dist(pulled.generator.state_dict()) < dist(between.generator.state_dict()) < dist(local.generator.state_dict())


def test_wsa_weight_zero_is_the_plain_baseline_and_a_weight_pulls_scopes_in():
    target = scope_of(_reference())
    plain, zero, strong = _client(), _client(), _client()
    targets = torch.from_numpy(plain.bank.items)
    plain.train_towards(targets)
    zero.train_towards(targets, [ScopeTerm(0.0, target)])
    assert _states_equal(plain.generator.state_dict(), zero.generator.state_dict())
    strong.train_towards(targets, [ScopeTerm(100.0, target)])
    with torch.no_grad():
        assert float(scope_penalty(strong.generator, target)) < 0.5 * float(scope_penalty(plain.generator, target))
    with pytest.raises(ValueError, match="names none"):
        scope_penalty(plain.generator, {"nothing.weight": (0.0, 1.0)})


def test_wsa_target_is_the_fused_scope_of_the_client_models():
    a, b = _reference(), _client(seed=5).generator.state_dict()
    b = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in b.items()}
    averaged, _ = average_states([with_scope(a), with_scope(b)], [1.0, 3.0], PlainSum("float64"))
    state, fused = split_scope(averaged)
    plain, _ = average_states([a, b], [1.0, 3.0], PlainSum("float64"))
    assert set(state) == set(a) and all(torch.allclose(state[k], plain[k]) for k in a)  # the model is unchanged
    sa, sb, of_average = scope_of(a), scope_of(b), scope_of(plain)
    assert set(fused) == {k for k in a if k.endswith("weight")}
    for k, (m, sd) in fused.items():
        assert m == pytest.approx(0.25 * sa[k][0] + 0.75 * sb[k][0], abs=1e-12)
        assert sd == pytest.approx(0.25 * sa[k][1] + 0.75 * sb[k][1], rel=1e-9)
        assert sd > of_average[k][1]  # averaging shrinks the spread; the fused scope keeps it


def test_federated_selector_beats_chance_on_held_out_images():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 2

    def sample(c, n):
        x = (centres[c] + rng.normal(size=(n, 16))).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train = [sample(c, 40) for c in range(3)]
    selector = ModelSelector(16, 16, 3, seed=0)
    for _ in range(5):  # FedAvg rounds, each client labelling its own images with its id
        states = []
        for c in range(3):
            local = copy.deepcopy(selector)
            train_selector(local, train[c], c, epochs=10, lr=1e-2)
            states.append(local.state_dict())
        state, _ = average_states(states, [40, 40, 40], PlainSum("float64"))
        selector.load_state_dict(state)
    held = [sample(c, 100) for c in range(3)]
    acc = np.mean(np.concatenate([selector.predict(h) == c for c, h in enumerate(held)]))
    assert acc > 0.6  # chance is 1/3


def test_pick_takes_each_images_scores_from_the_chosen_model():
    a = Scores(np.zeros((3, 2, 2)), np.zeros(3), np.zeros(3))
    b = Scores(np.ones((3, 2, 2)), np.ones(3), np.ones(3))
    s = pick(a, b, np.array([True, False, True]))
    assert s.image_patch.tolist() == [0, 1, 0] and s.patch[1].max() == 1 and s.image_knn.tolist() == [0, 1, 0]


TINY = {
    "name": "tiny-fedsm", "seed": 0, "method": "fedsm",
    "data": {"benchmark": "textures", "products": ["brick", "immunohistochemistry", "grass"],
             "train_per_product": 6, "test_normal_per_product": 4, "test_defect_per_product": 4,
             "image_size": 64, "crop_size": 64},
    "clients": {"n": 3, "alpha": 0.3},
    "protocol": "secagg",
    "feddymem": {"rounds": 2, "max_steps_per_epoch": 5},
    "fl": {"softpull": 1.0, "selector_epochs": 5},
    "output": {"embedding_cache": None, "map_examples_per_product": 0},
}


def test_fedsm_run_reports_the_selector_and_counts_its_bytes(tmp_path):
    from fedsecmem.run.runner import run

    r = run(config_from_dict(json.loads(json.dumps(TINY))), tmp_path / "fedsm")
    avg = run(config_from_dict({**json.loads(json.dumps(TINY)), "method": "fedavg"}), tmp_path / "fedavg")
    assert r["method"] == "fedsm" and r["aggregation"]["softpull"] == 1.0 and len(r["per_round"]) == 2
    assert all(0.0 <= x["selector_accuracy"] <= 1.0 for x in r["per_round"])
    for mine, theirs in zip(r["comm"]["bytes_up"], avg["comm"]["bytes_up"]):
        assert all(m > t for m, t in zip(mine, theirs))  # the selector travels too, through SecAgg+
    # a SoftPull so strong that every personalized generator is the global one: whatever the
    # selector picks, the scores (and so the AUROC) are FedAvg's
    held = run(config_from_dict({**json.loads(json.dumps(TINY)), "fl": {"softpull": 1e12, "selector_epochs": 5}}),
               tmp_path / "fedsm_held")
    assert held["auroc"]["image"] == pytest.approx(avg["auroc"]["image"], abs=1e-9)
    assert held["auroc"]["pixel"] == pytest.approx(avg["auroc"]["pixel"], abs=1e-6)
    assert r["auroc"]["image"] != avg["auroc"]["image"]  # a soft pull does personalize


def test_parameter_sharing_clients_start_from_the_global_generator():
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(6, 4, 4, 16)).astype(np.float32)
    cfg = FedDyMemConfig(hidden=8, memory_dim=8)  # a random projection: the initial space depends on the seed
    a, b = (FedDyMemClient(i, Embeddings(patches, None), cfg, seed, 0.5) for i, seed in ((0, 1), (1, 2)))
    assert not torch.allclose(a.target_std, b.target_std)
    b.start_from(copy.deepcopy(a.generator.state_dict()))
    assert _states_equal(a.generator.state_dict(), b.generator.state_dict())
    assert torch.allclose(a.target_std, b.target_std, atol=1e-6)  # the spread target follows the space


def test_a_wsa_run_aligns_from_round_two_and_sends_the_scopes(tmp_path):
    from fedsecmem.run.runner import run

    base = {**json.loads(json.dumps(TINY)), "method": "fedavg", "fl": {}}
    plain = run(config_from_dict(base), tmp_path / "fedavg")
    wsa = run(config_from_dict({**base, "fl": {"wsa_weight": 10.0}}), tmp_path / "wsa")
    assert wsa["aggregation"]["wsa_weight"] == 10.0
    # round 1 has no target yet (every client starts from the same model): exactly FedAvg
    assert wsa["per_round"][0]["loss"] == plain["per_round"][0]["loss"]
    assert wsa["per_round"][1]["loss"] != plain["per_round"][1]["loss"]
    for mine, theirs in zip(wsa["comm"]["bytes_up"], plain["comm"]["bytes_up"]):
        assert all(m > t for m, t in zip(mine, theirs))  # each layer's (mean, std) travels with the model


def test_wsa_is_refused_where_it_does_not_apply():
    with pytest.raises(UserError, match="wsa_weight applies to method fedavg or fedprox, not fedsm"):
        config_from_dict({**json.loads(json.dumps(TINY)), "fl": {"wsa_weight": 1.0}})
    assert config_from_dict({**json.loads(json.dumps(TINY)), "method": "fedprox",
                             "fl": {"wsa_weight": 1.0}}).fl.wsa_weight == 1.0


def test_dp_is_refused_for_fedsm():
    with pytest.raises(UserError, match="dp applies to method feddymem, not fedsm"):
        config_from_dict({**json.loads(json.dumps(TINY)), "privacy": {"dp": True}})
