"""A server that deviates from the protocol gains nothing a client did not agree to: each client
enforces, from its own configuration, the protocol, the SecAgg+ threshold and graph degree, the
participants and survivors its noise counts on, the releases per round and per k-means run, the
rounds, and its budget over every run of its data (docs/secure_aggregation.md, docs/privacy.md)."""

from pathlib import Path

import numpy as np
import pytest

from fedsecmem.config import config_from_dict, load_config
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.errors import ProtocolError
from fedsecmem.protocols.kmeans_party import KMeansParty, Moments
from fedsecmem.protocols.network_sum import CollectiveMember, JoinedTerms, NetworkCollective
from fedsecmem.protocols.secagg import SecAggServer
from fedsecmem.protocols.secagg_messages import Setup
from fedsecmem.protocols.wire import SERVER_ID, Envelope, encode_secagg

ROOT = Path(__file__).resolve().parents[1]
DIM = 3


def _quickstart(*sets: str):
    return load_config(ROOT / "configs" / "quickstart.yaml", list(sets))


def _member(cfg, cid: int = 0) -> tuple[CollectiveMember, list]:
    from fedsecmem.deployment.join import joined_terms

    member = CollectiveMember(cid, 24, "nearest", 1 << 20, terms=joined_terms(cfg))
    rng = np.random.default_rng(cid)
    member.reset({"patches": KMeansParty(rng.normal(size=(6, DIM)), np.ones(6))}, None)
    computed = []
    member.on_release = computed.append
    return member, computed


def _compute(member, participants, protocol: str, setup: Setup | None = None) -> tuple[str, pb.Payload]:
    col = NetworkCollective(Coordinator("run", set(participants)), "patches", set(participants), DIM, 10,
                            _secagg_sum(), 1.0)
    col.protocol = protocol
    payload = col._task(Moments(), encode_secagg(setup) if setup is not None else None)
    return member.handle(Envelope("run", SERVER_ID, 1, 1, "compute", payload))


def _secagg_sum(cfg=None):
    from fedsecmem.method.aggregation import secure_sum_for

    return secure_sum_for(cfg or _quickstart("privacy.dp=false"))


def _setups(cfg, participants, length):
    ss = _secagg_sum(cfg)
    return SecAggServer(ss.params(sorted(participants), length)).setups()


LENGTH = Moments().length(DIM)


def test_a_client_refuses_plain_when_it_joined_secagg_and_sends_nothing():
    cfg = _quickstart("privacy.dp=false")
    member, _ = _member(cfg)
    with pytest.raises(ProtocolError, match="protocol 'plain' asked; this client joined 'secagg'"):
        _compute(member, range(5), "plain")


def test_a_client_refuses_a_setup_below_its_threshold_or_graph_and_takes_the_honest_one():
    cfg = _quickstart("privacy.dp=false")
    honest = _setups(cfg, range(5), LENGTH)[0]
    member, _ = _member(cfg)
    kind, _ = _compute(member, range(5), "secagg", honest)  # the configured instance: accepted
    assert kind == "advertise"
    lone = Setup(honest.session, 0, (), 1, LENGTH, 64, 5)  # the server would unmask client 0's input alone
    member, _ = _member(cfg)
    with pytest.raises(ProtocolError, match="neighbours"):
        _compute(member, range(5), "secagg", lone)
    low = Setup(honest.session, 0, honest.neighbours, 2, LENGTH, 64, 5)  # t = 2 < the run's 3
    member, _ = _member(cfg)
    with pytest.raises(ProtocolError, match="threshold 2; this client joined threshold 3"):
        _compute(member, range(5), "secagg", low)
    outsider = Setup(honest.session, 0, (1, 2, 3, 7), 3, LENGTH, 64, 5)  # a neighbour that is no participant
    member, _ = _member(cfg)
    with pytest.raises(ProtocolError, match="neighbours"):
        _compute(member, range(5), "secagg", outsider)


def test_an_instance_over_fewer_participants_keeps_the_runs_threshold_and_clients_accept_it():
    cfg = _quickstart("privacy.dp=false")
    setups = _setups(cfg, [0, 2, 4], LENGTH)  # two dropped: the default rule would give t = 2
    assert {s.threshold for s in setups.values()} == {3}
    member, _ = _member(cfg)
    kind, _ = _compute(member, [0, 2, 4], "secagg", setups[0])
    assert kind == "advertise"


def test_a_private_client_refuses_a_sum_over_fewer_clients_than_its_noise_counts_on():
    cfg = _quickstart()  # DP, distributed noise over at least t = 3 survivors
    member, computed = _member(cfg)
    with pytest.raises(ProtocolError, match="a sum over 2 clients; this client joined sums of at least 3"):
        _compute(member, [0, 1], "secagg")
    assert computed == []  # refused before its accountant was charged or anything computed


def test_the_terms_come_from_the_clients_own_config():
    from fedsecmem.deployment.join import joined_terms

    t = joined_terms(_quickstart())
    assert (t.protocol, t.clients, t.threshold, t.neighbours, t.min_survivors) == ("secagg", 5, 3, None, 3)
    t = joined_terms(_quickstart("privacy.dp=false", "clients.n=9", "secure.secagg.threshold=7"))
    assert (t.threshold, t.neighbours, t.min_survivors) == (7, None, 1)
    assert JoinedTerms("plain", 3).least_parties() == 1


# ---- releases: per k-means run, per round, rounds, budget ---------------------------------------

class _Plan:
    """What RoundClient needs of a FedDyMem client to count: its id and DP-SGD plan."""

    def __init__(self, cid: int = 0, n: int = 40):
        self.cid, self.n = cid, n

    def dp_sgd_plan(self, batch: int, epochs: int):
        return min(1.0, batch / self.n), epochs * int(np.ceil(self.n / batch))


def _private_side(tmp_path, cfg=None, lifetime=False, run_id="A"):
    from fedsecmem.method.round import RoundClient
    from fedsecmem.privacy.budget import ClientBudget

    cfg = cfg or _quickstart()
    side = RoundClient(cfg, _Plan(), None, None)
    side.budget = ClientBudget(cfg, 0, side.plan, tmp_path, run_id, lifetime=lifetime, data_sha256="d" * 64)
    side.z, side.round = side.floor, 1
    return cfg, side


def test_a_round_holds_no_more_releases_than_the_clients_plan_and_each_is_signed(tmp_path):
    from fedsecmem.privacy.budget import releases_per_round
    from fedsecmem.protocols.secure_kmeans import dp_kmeans_releases

    cfg, side = _private_side(tmp_path)
    signed = []
    side.on_charged = signed.append
    per_kmeans = dp_kmeans_releases(cfg.privacy.kmeans_iters)
    for _ in range(per_kmeans):
        side.charge_release("patches")
    with pytest.raises(ProtocolError, match=f"its plan allows {per_kmeans}"):
        side.charge_release("patches")  # the review's attack: the same release repeated (300 times)
    for _ in range(releases_per_round(cfg) - per_kmeans):
        side.charge_release("images")
    with pytest.raises(ProtocolError, match="allows"):
        side.charge_release("images")
    assert len(signed) == releases_per_round(cfg)  # one signed epsilon per release, none for a refusal
    assert len(side.budget.accountant.history[0]) == releases_per_round(cfg)
    with pytest.raises(ProtocolError, match="not in its plan"):
        side.charge_release("other")


def test_repeating_releases_round_after_round_stops_at_the_clients_own_target(tmp_path):
    cfg, side = _private_side(tmp_path)
    rounds = 0
    with pytest.raises(ProtocolError, match="its own target 8"):
        for rounds in range(1, 1000):  # the server reopens round 1 again and again
            side.round, side.released = 1, {}
            for _ in range(2):
                side.charge_release("patches")
    assert side.budget.epsilon() <= cfg.privacy.epsilon * (1 + 1e-9)
    assert rounds > 1


def test_a_client_refuses_a_round_beyond_the_run_it_joined(tmp_path):
    from fedsecmem.method.round import RoundTask

    cfg, side = _private_side(tmp_path)
    with pytest.raises(ProtocolError, match="round 4 asked; it joined a run of 3 rounds"):
        side.on_task(RoundTask(4, True, side.floor))


# ---- the budget is the site's, across runs ------------------------------------------------------

def _spend_all(side, cfg):
    while True:
        try:
            side.round, side.released = 1, {}
            side.charge_release("patches")
        except ProtocolError:
            return side.budget.lifetime_epsilon()


def test_a_new_run_id_does_not_reset_a_sites_budget(tmp_path):
    import json

    cfg, a = _private_side(tmp_path, lifetime=True, run_id="A")
    spent = _spend_all(a, cfg)
    assert spent > 7.5
    _, b = _private_side(tmp_path, lifetime=True, run_id="B")  # the server starts another run
    assert b.budget.epsilon() == 0.0 and b.budget.lifetime_epsilon() == pytest.approx(spent)
    with pytest.raises(ProtocolError, match="over 2 runs on its data"):
        b.charge_release("patches")
    runs = json.loads((tmp_path / "privacy_state-client-0.json").read_text())["runs"]
    assert [r["run_id"] for r in runs] == ["A"]  # run A kept, never overwritten (B spent nothing)
    _, again = _private_side(tmp_path, lifetime=True, run_id="A")  # a restarted client of run A goes on
    assert again.budget.epsilon() == pytest.approx(spent)


def test_a_malformed_or_non_finite_state_file_is_refused_not_read_as_nothing_spent(tmp_path):
    from fedsecmem.privacy.budget import ClientBudget

    cfg = _quickstart()
    path = tmp_path / "privacy_state-client-0.json"
    path.write_text('{"format": 2, "client": 0, "runs": [{"run_id": "A", "accountant": {"kind": "pld", '
                    '"delta": 1e-05, "history": {"0": [[NaN, 1.0, 300, "release"]]}}}]}')
    with pytest.raises(ValueError, match="privacy_state-client-0.json is unreadable or malformed"):
        ClientBudget(cfg, 0, (0.2, 5), tmp_path, "B", lifetime=True)


def test_only_the_operators_reset_starts_a_new_budget_and_the_ledger_signs_it(tmp_path, monkeypatch, capsys):
    import json

    from fedsecmem.audits.ledger import LEDGER_DIR, verify_ledger
    from fedsecmem.crypto.pki import provision, verify_key
    from fedsecmem.privacy.ledgers import begin, party_ledger

    certs = tmp_path / "certs"
    provision(certs, 5)
    cfg = _quickstart(f"deploy.certs={certs}")
    site = tmp_path / "site"
    _, a = _private_side(site, cfg, lifetime=True, run_id="A")
    ledger = party_ledger(site, "client-0", certs)
    begin(ledger, cfg, "A")
    spent = _spend_all(a, cfg)
    ledger.append("run_end", status="completed", run_id="A")
    ledger.close()
    from fedsecmem.cli import main

    args = ["configs/quickstart.yaml", "--client-id", "0", "--out", str(site), "--set", f"deploy.certs={certs}"]
    monkeypatch.chdir(ROOT)
    assert main(["budget", "show", *args]) == 0
    assert f"epsilon {spent:.3f}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["budget", "reset", *args, "--operator", "dpo"])
    assert exit_.value.code == 2 and "--reason" in capsys.readouterr().err
    assert main(["budget", "reset", *args, "--reason", "new consent period", "--operator", "dpo"]) == 0
    kept = list(site.glob("privacy_state-client-0.reset-*.json"))
    assert len(kept) == 1 and not (site / "privacy_state-client-0.json").exists()
    lines = [json.loads(x) for x in (site / LEDGER_DIR / "client-0.jsonl").read_text().splitlines()]
    reset = next(x for x in lines if x["event"] == "budget_reset")
    assert reset["reason"] == "new consent period" and reset["epsilon_spent"] == pytest.approx(spent, rel=1e-6)
    assert reset["kept_file"] == kept[0].name
    assert lines[-1]["event"] == "run_end"
    _, problems = verify_ledger(site / LEDGER_DIR / "client-0.jsonl", "client-0", verify_key(certs, "client-0"))
    assert problems == []  # the reset is signed with the site's key and the chain holds
    _, b = _private_side(site, cfg, lifetime=True, run_id="B")
    assert b.budget.lifetime_epsilon() == 0.0


# ---- under DP no exact count leaves a client ----------------------------------------------------

def test_the_dp_sgd_plan_is_public_the_same_whatever_a_site_holds(tmp_path):
    """The review's finding: q = 8 / n (in the report) gave back each site's exact n."""
    from fedsecmem.method.round import RoundClient

    cfg = _quickstart()
    small, large = RoundClient(cfg, _Plan(n=13), None, None), RoundClient(cfg, _Plan(n=42), None, None)
    assert small.plan == large.plan == (cfg.privacy.sgd_sample_rate, 4)
    assert small.floor == large.floor


def test_a_private_clients_hello_and_ready_carry_no_training_counts():
    from types import SimpleNamespace

    from fedsecmem.deployment.join import FedDyMemMember
    from fedsecmem.deployment.messages import decode_ready, encode_ready
    from fedsecmem.deployment.serve import _decode_hello
    from fedsecmem.method.round import Ready

    class _Train:
        products = np.array([0] * 30 + [1] * 7)

        def __len__(self):
            return 37

    for dp in (True, False):
        me = SimpleNamespace(dims=(8, 4), cfg=_quickstart(f"privacy.dp={str(dp).lower()}"),
                             data=SimpleNamespace(train=_Train(), test=np.zeros(5)), product_names=["a", "b"])
        hello = _decode_hello(0, Envelope("r", 0, 0, 1, "hello", FedDyMemMember._hello(me)))
        ready = decode_ready(0, Envelope("r", 0, 1, 1, "ready", encode_ready(Ready(2960, 37, True, 0.4), dp)))
        if dp:
            assert hello["n_train"] is None and hello["products"] == {} and hello["n_test"] == 5
            assert (ready.n_prototypes, ready.n_images, ready.loss) == (1, 1, None)
        else:
            assert hello["n_train"] == 37 and hello["products"] == {"a": 30, "b": 7}
            assert (ready.n_prototypes, ready.n_images) == (2960, 37)


def test_the_privacy_report_shows_no_exact_count_of_a_private_run():
    from fedsecmem.audits.report import _participant

    row = {"client": 0, "n_train": 37, "products": {"a": 30, "b": 7}}
    assert _participant(row) == row  # without DP, counts of 5 and more are shown as they are
    assert _participant({**row, "products": {"a": 34, "b": 3}})["n_train"] == "~35"  # a small cell hides its row
    assert _participant(row, dp=True) == {"client": 0, "n_train": "~35", "products": {"a": "~30", "b": "~5"}}
    assert _participant({"client": 1, "n_train": None, "products": {}}, dp=True)["n_train"] == "kept by the site"


def test_the_adversary_table_is_one_table_and_every_test_it_cites_exists():
    import re

    def table(doc: str) -> str:
        text = (ROOT / "docs" / doc).read_text()
        return text[text.index("<!-- adversary-table"):text.index("<!-- /adversary-table -->")]

    mine = table("secure_aggregation.md")
    assert mine == table("privacy.md"), "docs/secure_aggregation.md and docs/privacy.md must hold the same table"
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")),
                             re.M))
    cited = set(re.findall(r"`(test_\w+)`", mine))
    assert len(cited) >= 15 and not cited - defined, f"cited but not in tests/: {sorted(cited - defined)}"
    header = next(line for line in mine.splitlines() if line.startswith("| guarantee"))
    for adversary in ("honest-but-curious server", "deviates from the protocol", "malicious client",
                      "t - 1 clients", "Ray cluster"):
        assert adversary in header


def test_the_simulators_clients_keep_one_run_each_so_a_new_run_in_an_old_folder_starts_over(tmp_path):
    import json

    cfg, a = _private_side(tmp_path, run_id="A")
    _spend_all(a, cfg)
    _, b = _private_side(tmp_path, run_id="B")  # the simulator: one process, no site to deceive
    assert b.budget.lifetime_epsilon() == 0.0
    b.charge_release("patches")
    runs = json.loads((tmp_path / "privacy_state-client-0.json").read_text())["runs"]
    assert [r["run_id"] for r in runs] == ["B"]
