"""Differential privacy: the sensitivity bound on real data, the noise actually added, distributed
noise with t survivors, accounting equal to Opacus', calibration, budget refusal, saved state."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedsecmem.audits.accountant import PrivacyAccountant, Step, calibrate, epsilon_of
from fedsecmem.config import DataConfig, FedDyMemConfig, RunConfig
from fedsecmem.data.load import load_benchmark
from fedsecmem.method.metric_loss import per_image_metric_loss
from fedsecmem.protocols.dp_noise import discrete_gaussian, lattice_sensitivity
from fedsecmem.protocols.dp_release import SENSITIVITY, NoisySum, clip_to_unit
from fedsecmem.protocols.errors import ProtocolAbort
from fedsecmem.protocols.kmeans_party import local_cell_stats
from fedsecmem.protocols.secure_sum import make_secure_sum
from fedsecmem.method.reduce import reduce_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prototypes(embedder):
    """Real memory-reduce prototypes of 24 texture images: (P, D) points, weights, owning image."""
    bench = load_benchmark(DataConfig(products=["brick", "retina", "cell"], train_per_product=8,
                                      test_normal_per_product=1, test_defect_per_product=1,
                                      image_size=96, crop_size=96), 0)
    emb = embedder.embed(bench.train.images, 16)
    protos, weights = reduce_images(emb.patches, 16, 3)
    owner = np.repeat(np.arange(len(protos)), protos.shape[1])
    return protos.reshape(-1, protos.shape[-1]).astype(np.float64), weights.reshape(-1).astype(np.float64), owner


def test_removing_one_image_moves_every_release_by_at_most_the_bound(prototypes):
    x, w, owner = prototypes
    xu = clip_to_unit(x, 20.0)  # a tight clip: many points are clipped
    assert np.linalg.norm(xu, axis=1).max() <= 1 + 1e-12
    assert np.allclose(np.bincount(owner, weights=w), 1.0)
    rng = np.random.default_rng(0)
    centres = xu[rng.choice(len(xu), 6, replace=False)]
    directions = rng.standard_normal((3, xu.shape[1]))
    cells = ((xu - xu.mean(0)) @ directions.T > 0) @ (1 << np.arange(3))
    nearest = ((xu[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    releases = {
        "mean": lambda keep: local_cell_stats(xu[keep], w[keep], np.zeros(keep.sum(), np.int64), 1),
        "cells": lambda keep: local_cell_stats(xu[keep], w[keep], cells[keep], 8),
        "lloyd": lambda keep: local_cell_stats(xu[keep], w[keep], nearest[keep], len(centres)),
    }
    everyone = np.ones(len(xu), bool)
    worst = 0.0
    for name, release in releases.items():
        full = release(everyone)
        for image in np.unique(owner):
            change = np.linalg.norm(full - release(owner != image))
            worst = max(worst, change)
            assert change <= SENSITIVITY + 1e-9, (name, image, change)
    assert worst > 0.5 * SENSITIVITY  # the bound is not vacuous on real data


def test_discrete_gaussian_has_the_configured_deviation():
    for sigma in (0.7, 1000.0, 3.0e7):
        y = discrete_gaussian(40_000, sigma)
        assert y.dtype == np.int64
        assert abs(y.std() / sigma - 1) < 0.03
        assert abs(y.mean()) < 4 * sigma / math.sqrt(len(y))


def _noise_of(mode, n, drop, z=0.5, t=3, length=4000, protocol="secagg"):
    rng = np.random.default_rng(1)
    xs = {c: rng.uniform(-0.5, 0.5, length) for c in range(n)}
    noisy = NoisySum(make_secure_sum(protocol), z, mode, t)
    out = noisy.sum(xs, drop)
    truth = np.sum([xs[c] for c in out.included], axis=0)
    sigma = noisy.sigma_lattice(length) / 2.0**noisy.frac_bits  # target std in real units
    return (out.total - truth).std() / sigma, noisy


@pytest.mark.parametrize("mode,drop,expect", [
    # each client adds sigma^2 / (t - 1): exactly t = 3 survivors give the target even without one share
    ("distributed", {"mask": {3, 4}}, math.sqrt(3 / 2)),
    ("distributed", None, math.sqrt(5 / 2)),  # more survivors, more noise, never less
    ("local", None, math.sqrt(5)),
    ("central", None, 1.0),
])
def test_noise_added_meets_the_target(mode, drop, expect):
    ratio, noisy = _noise_of(mode, 5, drop)
    assert abs(ratio / expect - 1) < 0.05, (mode, ratio)
    assert noisy.releases == 1


@pytest.mark.parametrize("protocol", ["plain", "secagg", "ckks"])
def test_distributed_noise_refuses_a_sum_of_fewer_than_t(protocol):
    # 6 clients: secagg's own threshold is 4; the noise counts on 5, and only 4 send their input
    with pytest.raises(ProtocolAbort, match="only 4 .*at least 5 needed"):
        _noise_of("distributed", 6, {"mask": {0, 1}}, t=5, protocol=protocol)


def test_lattice_sensitivity_covers_rounding():
    assert lattice_sensitivity(math.sqrt(2), 10, 100) == pytest.approx(math.sqrt(2) * 1024 + 10)


def test_our_epsilon_is_opacus_epsilon_for_the_same_history():
    history = [Step(1.1, 0.2, 15), Step(1.1, 1.0, 8), Step(1.1, 0.2, 15), Step(1.1, 1.0, 8)]
    for kind, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        ref = cls()
        for s in history:
            for _ in range(s.count):
                ref.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate)
        kwargs = {"alphas": __import__("fedsecmem.audits.accountant", fromlist=["x"]).RDP_ORDERS} if kind == "rdp" else {}
        assert epsilon_of(history, 1e-5, kind) == pytest.approx(ref.get_epsilon(1e-5, **kwargs), rel=1e-6)
    # the design's reference point: sigma 1.0, q 0.01, 1000 steps
    assert epsilon_of([Step(1.0, 0.01, 1000)], 1e-5, "prv") == pytest.approx(1.84, abs=0.02)


def test_calibration_spends_the_target():
    plan = [(1.0, 24), (0.2, 30)]
    z = calibrate(8.0, 1e-5, plan)
    spent = epsilon_of([Step(z, q, n) for q, n in plan], 1e-5)
    assert 7.8 <= spent <= 8.0
    assert epsilon_of([Step(z * 0.97, q, n) for q, n in plan], 1e-5) > 8.0
    with pytest.raises(ValueError, match="positive"):
        calibrate(0, 1e-5, plan)


def test_accountant_state_round_trips(tmp_path):
    acc = PrivacyAccountant([0, 1], 1e-5)
    acc.record(0, [Step(2.0, 0.1, 10), Step(2.0, 1.0, 4)])
    acc.save(tmp_path / "s.json")
    back = PrivacyAccountant.load(tmp_path / "s.json")
    assert back.epsilon(0) == acc.epsilon(0) > 0 and back.epsilon(1) == 0.0
    assert back.would_spend(0, [Step(2.0, 1.0, 4)]) > back.epsilon(0)  # asking records nothing
    assert back.epsilon(0) == acc.epsilon(0)


def test_per_image_loss_depends_on_its_own_image_only():
    torch.manual_seed(0)
    x = torch.randn(4, 30, 8)
    memory = torch.randn(5, 8)
    a = per_image_metric_loss(x * 1.1, x, memory, 2.0)
    y = x.clone()
    y[1:] = torch.randn(3, 30, 8)
    b = per_image_metric_loss(y * 1.1, y, memory, 2.0)
    assert torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


def _tiny_dp(tmp_path, *extra):
    from fedsecmem.config import load_config
    from fedsecmem.run.runner import run
    cfg = load_config(ROOT / "configs/quickstart.yaml", [
        "data.products=[brick,immunohistochemistry]", "data.train_per_product=6",
        "data.test_normal_per_product=4", "data.test_defect_per_product=4", "data.image_size=64",
        "data.crop_size=64", "clients.n=3", "feddymem.rounds=2", "feddymem.global_k=8",
        "feddymem.global_k_images=4", "output.embedding_cache=null", "audit.leakage=false", "protocol=secagg", "privacy.dp=true",
        "privacy.epsilon=null",
        *extra])
    return run(cfg, tmp_path)


def test_dp_run_reports_epsilon_per_client_per_round_and_saves_state(tmp_path):
    r = _tiny_dp(tmp_path / "a", "privacy.epsilon=4")
    pv = r["privacy"]
    assert pv["dp"] and pv["epsilon"] <= 4.0 + 1e-6 and pv["epsilon"] == max(pv["per_client"])
    assert len(pv["per_client_per_round"]) == 2 and all(len(e) == 3 for e in pv["per_client_per_round"])
    assert all(b > a for a, b in zip(*pv["per_client_per_round"]))  # epsilon only grows
    assert r["per_round"][-1]["epsilon"] == pytest.approx(pv["epsilon"])
    saved = PrivacyAccountant.load(tmp_path / "a" / pv["state_file"])
    assert max(saved.epsilon(c) for c in range(3)) == pytest.approx(pv["epsilon"])


def test_budget_refusal_happens_before_anything_is_released(tmp_path, monkeypatch):
    calls = []
    original = NoisySum.sum
    monkeypatch.setattr(NoisySum, "sum", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    from fedsecmem.errors import UserError
    with pytest.raises(UserError, match="round 1 would take client"):
        _tiny_dp(tmp_path / "none", "privacy.noise_multiplier=1.0", "privacy.epsilon_budget=0.5")
    assert calls == []  # refused before the first release
    # a budget that holds one round but not two: the run stops cleanly after round 1
    # the budget check charges a round's *planned* releases (a round may release fewer: cells drowned
    # in noise end the Lloyd loop early), so the budget is set from the plan, not from a probe run
    probe = _tiny_dp(tmp_path / "probe", "privacy.noise_multiplier=2.0", "feddymem.rounds=1")["privacy"]
    one = epsilon_of([Step(2.0, 1.0, probe["releases_per_round"])], 1e-5)
    assert probe["epsilon"] <= one + 1e-9  # what actually happened never exceeds the plan
    calls.clear()
    r = _tiny_dp(tmp_path / "one", "privacy.noise_multiplier=2.0", f"privacy.epsilon_budget={one * 1.2}")
    assert r["rounds"] == 1 and r["privacy"]["stopped"]["round"] == 2
    assert r["privacy"]["epsilon"] <= one * 1.2
    assert json.loads((tmp_path / "one" / "results.json").read_text())["privacy"]["stopped"]["budget"] == one * 1.2


def test_an_aborted_round_is_still_charged(tmp_path, monkeypatch):
    """Releases are recorded as they happen: a failure halfway through a round leaves them on disk."""
    from fedsecmem.errors import UserError
    calls = {"n": 0}
    original = NoisySum.sum

    def flaky(self, inputs, drop=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the third release of round 1 never completes
            raise ProtocolAbort("simulated: too many clients vanished")
        return original(self, inputs, drop)

    monkeypatch.setattr(NoisySum, "sum", flaky)
    with pytest.raises(UserError, match="too many clients vanished"):
        _tiny_dp(tmp_path, "privacy.noise_multiplier=2.0")
    saved = PrivacyAccountant.load(tmp_path / "privacy_state.json")
    assert all(sum(s.count for s in saved.history[c]) == 2 for c in range(3))  # the two releases that happened
    assert saved.epsilon(0) > 0


def _dp_config(*extra):
    from fedsecmem.config import config_from_dict
    return config_from_dict({"method": "feddymem", "protocol": "secagg", "clients": {"n": 3},
                             "privacy": {"dp": True, "epsilon": 8.0}, "feddymem": {"rounds": 3}}, list(extra))


class _CrashingSum:
    """A secure sum that fails after the clients' vectors left them (as a server crash would)."""

    name = "plain"
    tap = None

    def sum(self, inputs, drop=None, min_included=1):
        raise RuntimeError("simulated crash: the vectors were sent, no sum came back")


def test_a_release_is_charged_and_on_disk_before_any_client_computes_it(tmp_path):
    """Write-ahead: a crash after the data left cannot lose the charge."""
    from fedsecmem.privacy.budget import STATE_FILE, RunPrivacy

    privacy = RunPrivacy(_dp_config(), {0: (0.2, 4), 1: (0.2, 4), 2: (0.3, 4)}, _CrashingSum(), tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        privacy.noisy.sum({c: np.zeros(5) for c in range(3)})
    saved = PrivacyAccountant.load(tmp_path / STATE_FILE)
    assert all(sum(s.count for s in saved.history[c]) == 1 for c in range(3))
    privacy.record_sgd([0, 1])  # a round's DP-SGD: charged (and saved) before the clients are asked to train
    saved = PrivacyAccountant.load(tmp_path / STATE_FILE)
    assert [len(saved.history[c]) for c in range(3)] == [2, 2, 1] and saved.epsilon(0) > saved.epsilon(2)


def test_a_client_refuses_noise_below_its_own_floor():
    """A server that asks for less noise than the client's own calibration (down to none) is refused
    before anything is trained or released."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.method.client import FedDyMemClient, GlobalMemory
    from fedsecmem.method.round import RoundClient, RoundTask
    from fedsecmem.privacy.budget import RunPrivacy, noise_floor, sgd_plan
    from fedsecmem.protocols.errors import ProtocolError

    cfg = _dp_config()
    patches = np.random.default_rng(0).normal(size=(12, 4, 4, 8)).astype(np.float32)
    client = FedDyMemClient(0, Embeddings(patches, None), cfg.feddymem, 0, 0.5)
    me = RoundClient(cfg, client, None, None)
    plan = sgd_plan(cfg)
    assert me.floor == pytest.approx(noise_floor(cfg, plan)) and me.floor > 0.5
    memory = GlobalMemory(patches[0, 0, :2], None)
    for z in (0.0, me.floor * 0.99, None):
        with pytest.raises(ProtocolError, match="below client 0's floor"):
            me.on_task(RoundTask(2, True, z, memory))
        assert client.losses == [] and me.contribution is None  # nothing trained, nothing to release
    # the server's own choice (the largest floor over its clients) is accepted
    server_z = RunPrivacy(cfg, {0: plan, 1: (plan[0] / 2, plan[1])}, make_secure_sum("plain")).z
    assert server_z == pytest.approx(me.floor)
    assert me.on_task(RoundTask(1, False, server_z, None)).n_prototypes > 0


def test_a_client_refuses_a_round_past_its_own_budget_and_keeps_its_own_account(tmp_path):
    """The client does its own arithmetic: a round that would take it past its own epsilon_budget is
    refused before anything runs, however the server counts; what it spends is on its own disk."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.method.client import FedDyMemClient, GlobalMemory
    from fedsecmem.method.round import RoundClient, RoundTask
    from fedsecmem.privacy.budget import CLIENT_STATE_FILE, ClientBudget
    from fedsecmem.protocols.errors import ProtocolError

    cfg = _dp_config("privacy.epsilon=null", "privacy.noise_multiplier=2.0", "privacy.epsilon_budget=13.0")
    patches = np.random.default_rng(0).normal(size=(12, 4, 4, 8)).astype(np.float32)
    client = FedDyMemClient(0, Embeddings(patches, None), cfg.feddymem, 0, 0.5)
    me = RoundClient(cfg, client, None, None)
    me.budget = ClientBudget(cfg, 0, me.plan, tmp_path, run_id="run-1")
    memory = GlobalMemory(patches[0, 0, :2], None)
    spent = []
    for r in range(1, 20):
        try:
            me.on_task(RoundTask(r, r > 1, 2.0, memory if r > 1 else None))
        except ProtocolError as exc:
            assert "would take it to epsilon" in str(exc) and "its own budget 13" in str(exc)
            break
        for _ in range(me.budget.releases(2.0)[0].count):  # the round's private releases, as computed
            me.charge_release()
        spent.append(me.budget.epsilon())
    else:
        raise AssertionError("the budget never stopped the client")
    assert len(spent) == 2 and spent[-1] <= 13.0 and len(client.losses) == len(spent) - 1  # nothing trained once refused
    saved = json.loads((tmp_path / CLIENT_STATE_FILE.format(cid=0)).read_text())["runs"]
    assert [r["run_id"] for r in saved] == ["run-1"]
    assert PrivacyAccountant.from_json(saved[0]["accountant"]).epsilon(0) == pytest.approx(spent[-1])
    again = ClientBudget(cfg, 0, me.plan, tmp_path, run_id="run-1")  # a restarted client keeps what it spent
    assert again.epsilon() == pytest.approx(spent[-1])


def test_the_pld_accountant_agrees_with_opacus_prv_and_is_tighter_than_rdp():
    """dp_accounting's PLD (pessimistic, a sound upper bound) against Opacus' PRV on the main job's
    history (24 releases at rate 1 and 8 DP-SGD steps at rate 0.3, z = 3.22) and the design's
    reference point; both well under RDP, which is what calibrating with PLD saves."""
    main_job = [Step(3.22, 1.0, 24), Step(3.22, 0.296, 8)]
    for history in (main_job, [Step(1.0, 0.01, 1000)]):
        pld, prv, rdp = (epsilon_of(history, 1e-5, k) for k in ("pld", "prv", "rdp"))
        assert pld == pytest.approx(prv, rel=0.02) and pld < rdp
    assert epsilon_of([Step(1.0, 0.01, 1000)], 1e-5, "pld") == pytest.approx(1.84, abs=0.03)
    plan = [(1.0, 24), (0.296, 8)]
    z_rdp, z_pld = calibrate(8.0, 1e-5, plan, "rdp"), calibrate(8.0, 1e-5, plan, "pld")
    assert z_pld < 0.97 * z_rdp and epsilon_of([Step(z_pld, q, n) for q, n in plan], 1e-5, "pld") <= 8.0


def test_the_fast_pld_is_dp_accountings_plain_pld_on_the_raw_history():
    """The default accountant merges steps and uses a coarser grid; dp_accounting used plainly
    (every step composed as recorded, its default grid) gives the same epsilon, and ours is never
    below it by more than the grid's rounding: the shortcut is sound, not a looser bound."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    from fedsecmem.audits.accountant import DEFAULT_ACCOUNTANT, canonical

    assert DEFAULT_ACCOUNTANT == "pld" and RunConfig().privacy.accountant == "pld"
    history = [Step(3.0, 1.0, 6), Step(3.0, 0.3, 8), Step(3.0, 1.0, 6), Step(4.5, 1.0, 1), Step(3.0, 0.3, 8)]
    assert canonical([(s.noise_multiplier, s.sample_rate, s.count) for s in history]) == (
        (3.0, 0.3, 16), (pytest.approx((12 / 9 + 1 / 4.5 ** 2) ** -0.5), 1.0, 1))
    plain = pld_privacy_accountant.PLDAccountant()
    for s in history:
        event = dp_event.GaussianDpEvent(s.noise_multiplier)
        if s.sample_rate < 1:
            event = dp_event.PoissonSampledDpEvent(s.sample_rate, event)
        for _ in range(s.count):
            plain.compose(event)
    reference = plain.get_epsilon(1e-5)
    ours = epsilon_of(history, 1e-5)
    assert ours == pytest.approx(reference, rel=1e-3) and ours >= reference * (1 - 1e-4)
    assert epsilon_of(history[:2], 1e-5) < ours  # and it still grows with every step


# ---- one patient as the privacy unit ----------------------------------------------------------------

PATIENT_OF = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 9, 10, 11, 11, 11])  # 1-4 images each


def test_removing_one_patient_moves_every_release_by_at_most_the_bound(prototypes):
    """Each of a patient's m images weighs 1/m, so removing the whole patient (all their images)
    moves any release by at most the per-image bound, sqrt(2)."""
    x, w, owner = prototypes
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.method.client import FedDyMemClient

    n_images = owner.max() + 1
    patches = np.zeros((n_images, 1, 1, 4), np.float32)  # only the weights are used below
    cl = FedDyMemClient(0, Embeddings(patches, None), FedDyMemConfig(), 0, 0.1, use_generator=False,
                        groups=PATIENT_OF)
    unit = cl.unit_weights()
    assert np.allclose(np.bincount(PATIENT_OF, weights=unit), 1.0) and cl.units == 12
    wp = w * unit[owner]  # what rebuild() sends: each image's prototype weights times its unit weight
    xu = clip_to_unit(x, 20.0)
    rng = np.random.default_rng(0)
    centres = xu[rng.choice(len(xu), 6, replace=False)]
    nearest = ((xu[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    patient = PATIENT_OF[owner]
    worst = 0.0
    for labels, cells in ((np.zeros(len(xu), np.int64), 1), (nearest, len(centres))):
        full = local_cell_stats(xu, wp, labels, cells)
        for p in np.unique(PATIENT_OF):
            keep = patient != p
            change = np.linalg.norm(full - local_cell_stats(xu[keep], wp[keep], labels[keep], cells))
            worst = max(worst, change)
            assert change <= SENSITIVITY + 1e-9, (p, change)
        # per image instead (weights 1 each): a patient of 4 images moves a release by far more
        whole = local_cell_stats(xu, w, labels, cells)
        keep = patient != 3
        per_image = np.linalg.norm(whole - local_cell_stats(xu[keep], w[keep], labels[keep], cells))
    assert worst > 0.5 * SENSITIVITY and per_image > SENSITIVITY  # the bound is tight and needed


def test_dp_sgd_samples_and_clips_patients(embedder):
    """With patients, the DP-SGD plan counts patients and every Opacus per-sample gradient is one
    patient's (rows of the unit tensor), clipped as one."""
    from fedsecmem.detector.backbone import Embeddings
    from fedsecmem.method.client import FedDyMemClient

    bench = load_benchmark(DataConfig(products=["brick", "retina", "cell"], train_per_product=8,
                                      test_normal_per_product=1, test_defect_per_product=1,
                                      image_size=64, crop_size=64), 0)
    emb = embedder.embed(bench.train.images, 16)
    cfg = FedDyMemConfig(local_epochs=1)
    cl = FedDyMemClient(0, Embeddings(emb.patches, None), cfg, 0, 0.1, groups=PATIENT_OF)
    assert cl.units == 12  # Poisson sampling draws patients
    x = torch.from_numpy(emb.patches.reshape(24, -1, emb.patches.shape[-1]))
    rows, present = cl._units_of(x)
    assert rows.shape[0] == 12 and present.sum(1).tolist() == np.bincount(PATIENT_OF).tolist()
    p = x.shape[1]
    assert torch.equal(rows[9, :p], x[17]) and torch.equal(rows[9, 2 * p:3 * p], x[19])  # patient 9: images 17-19
    cl.rebuild_bank()
    before = [t.detach().clone() for t in cl.generator.parameters()]
    loss = cl.train_towards_dp(torch.from_numpy(cl.bank.items[:8]), 1.0, 1.0, (4 / 12, 3), 4)
    assert np.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, cl.generator.parameters()))


def test_a_patients_images_stay_with_one_client_and_every_image_needs_a_patient(tmp_path):
    from fedsecmem.data.partition import partition
    from fedsecmem.errors import UserError

    data = DataConfig(products=["brick", "retina", "cell"], train_per_product=8, test_normal_per_product=2,
                      test_defect_per_product=2, image_size=32, crop_size=32)
    rows = ["image,patient"] + [f"{p}/{n},{p}-{n // 3}" for p in ("brick", "retina", "cell") for n in range(8)]
    csv_path = tmp_path / "patients.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    bench = load_benchmark(data.model_copy(update={"patients": csv_path}), 0, patients=True)
    assert len(np.unique(bench.train.groups)) == 9  # 3 patients per product, of 3, 3 and 2 images
    clients = partition(bench, 3, 0.5, 0)
    owner = {}
    for c in clients:
        for g in np.unique(c.train.groups):
            assert owner.setdefault(int(g), c.client) == c.client  # never split across clients
    assert sum(len(c.train) for c in clients) == 24
    csv_path.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(UserError, match=r"1 training images have no patient \(first: cell/7"):
        load_benchmark(data.model_copy(update={"patients": csv_path}), 0, patients=True)
    with pytest.raises(UserError, match="privacy.unit: patient needs each training image's patient"):
        load_benchmark(data, 0, patients=True)


def test_a_private_run_with_patients_accounts_per_patient_and_says_so(tmp_path):
    from fedsecmem.audits.report import build_report
    from fedsecmem.config import config_from_dict
    from fedsecmem.run.runner import run

    rows = ["image,patient"] + [f"{p}/{n},{p}-{n // 2}" for p in ("brick", "grass") for n in range(8)]
    (tmp_path / "patients.csv").write_text("\n".join(rows) + "\n")
    cfg = config_from_dict({
        "name": "patients", "method": "feddymem", "protocol": "secagg",
        "data": {"products": ["brick", "grass"], "train_per_product": 8, "test_normal_per_product": 2,
                 "test_defect_per_product": 2, "image_size": 64, "crop_size": 64,
                 "patients": str(tmp_path / "patients.csv")},
        "clients": {"n": 2, "alpha": 10.0},
        "privacy": {"dp": True, "epsilon": 8, "unit": "patient", "min_survivors": 2, "sgd_batch_images": 2},
        "feddymem": {"rounds": 2, "global_k": 4, "global_k_images": 2},
        "output": {"embedding_cache": None, "map_examples_per_product": 0}})
    res = run(cfg, tmp_path / "out")
    per = res["privacy"]["dp_sgd"]["per_client"]
    for c, row in enumerate(res["per_client"]):  # the public rate, whatever a site holds (Poisson over patients)
        assert per[str(c)] == {"sample_rate": cfg.privacy.sgd_sample_rate, "steps_per_round": 4}
    report = build_report(tmp_path / "out")
    assert report["dp"]["unit"] == "patient" and report["dp"]["per_patient"] is None


def test_the_leakage_holdout_withholds_whole_patients():
    """Under unit patient the non-members are whole patients: none of their images is trained on."""
    from fedsecmem.data.partition import partition
    from fedsecmem.run.leakage import hold_out

    data = DataConfig(products=["brick", "retina"], train_per_product=12, test_normal_per_product=2,
                      test_defect_per_product=2, image_size=32, crop_size=32)
    bench = load_benchmark(data, 0)
    bench.train.groups = np.arange(len(bench.train)) // 4  # patients of 4 images
    clients = partition(bench, 2, 10.0, 0)
    kept, held = hold_out(clients, 0.25, 0, by_patient=True)
    for c in kept:
        trained = set(bench.train.groups[c.train_index])
        withheld = set(bench.train.groups[held[c.client]])
        assert withheld and not (trained & withheld)
    per_image, _ = hold_out(clients, 0.25, 0)  # per image: the same as before patients existed
    assert sum(len(c.train_index) for c in per_image) == sum(len(c.train_index) for c in clients) - sum(
        min(max(1, round(0.25 * len(c.train_index))), len(c.train_index) - 2) for c in clients)


def test_mvtec_patient_folders_name_one_person_across_categories(tmp_path):
    from PIL import Image

    from fedsecmem.data.mvtec import make_mvtec

    for cat in ("chest", "knee"):
        for who in ("ann", "bob"):
            d = tmp_path / cat / "train" / "good" / who
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
        (tmp_path / cat / "train" / "good" / "alone.png").parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / cat / "train" / "good" / "alone.png")
        t = tmp_path / cat / "test" / "good"
        t.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(t / "x.png")
    bench = make_mvtec(tmp_path, 32)
    g = bench.train.groups
    assert len(g) == 10 and len(np.unique(g)) == 4  # ann, bob, chest/alone.png, knee/alone.png
    assert g[1] == g[6] and g[3] == g[8]  # ann's chest and knee images: one patient
