"""Deployment over gRPC with mutual TLS: identities, large payloads, and whole runs as real processes on
127.0.0.1 (same global memory as the simulator, a client crash mid-round, a server crash and resume)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsecmem.crypto.pki import provision, revoke, tls_material
from fedsecmem.protocols.network_sum import reply_bound
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.grpc_transport import ServerConnection, TransportError, start_server
from fedsecmem.protocols.wire import Envelope, decode_vector, encode_vector

ROOT = Path(__file__).resolve().parents[1]
FEDSECMEM = [sys.executable, "-m", "fedsecmem"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    provision(base / "a", 4)
    provision(base / "b", 3)  # another CA
    revoke(base / "a", 2)
    return base


def _serve(coord, pki_dir):
    address = f"127.0.0.1:{_port()}"
    server = start_server(coord, address, tls_material(pki_dir / "a", "server"), 0.5, 64 << 20, 8)
    return server, address


def _connect(address, pki_dir, which, party, reconnect=2.0):
    return ServerConnection(address, tls_material(pki_dir / which, party), 64 << 20, 0.5, reconnect)


def test_only_this_runs_valid_identities_get_in(pki):
    coord = Coordinator("r", {0, 1, 2}, {2})
    server, address = _serve(coord, pki)
    try:
        ok = _connect(address, pki, "a", "client-0")
        assert ok.pull(0, 0) is None  # a valid client: connected, nothing to do yet
        with pytest.raises(TransportError, match="revoked identity client-2"):
            _connect(address, pki, "a", "client-2").pull(0, 0)
        with pytest.raises(TransportError, match="unknown identity client-3"):
            _connect(address, pki, "a", "client-3").pull(0, 0)
        with pytest.raises(TransportError, match="unreachable"):  # TLS refuses a chain from another CA
            _connect(address, pki, "b", "client-0").pull(0, 0)
        assert coord.rejected["identity"] == 2
    finally:
        coord.close()
        server.stop(0)


class _Peer:
    """The gRPC context of an authenticated client (its certificate's common name)."""

    def __init__(self, cid: int):
        self.name = f"client-{cid}".encode()

    def auth_context(self):
        return {"x509_common_name": [self.name]}

    def peer(self):
        return "test"

    def abort(self, code, details):
        raise AssertionError(f"aborted: {details}")


def test_a_reply_is_refused_from_its_first_chunk_before_anything_is_buffered():
    """An authenticated client cannot make the server buffer what no open exchange expects of it, or
    more than the exchange needs, or two replies at once (memory exhaustion)."""
    from fedsecmem.protocols import federation_pb2 as pb
    from fedsecmem.protocols.grpc_transport import _Servicer

    coord = Coordinator("r", {0, 1}, set())
    servicer = _Servicer(coord, 0.1, 1 << 30)
    pulled = []

    def stream(declared, n=64):
        for i in range(n):
            pulled.append(i)
            yield pb.Chunk(total_size=declared, data=b"x" * (declared // n))

    reply = servicer.Push(stream(512 << 20), _Peer(0))  # nothing expected of anyone yet
    assert not reply.accepted and "no reply expected" in reply.reason and pulled == [0]
    coord.begin_round(1)
    t = threading.Thread(target=lambda: coord.exchange("round", {0: encode_vector(np.zeros(1))}, "ready",
                                                       lambda c, env: True, 5))
    t.start()
    try:
        time.sleep(0.2)
        pulled.clear()
        reply = servicer.Push(stream(512 << 20), _Peer(0))  # expected, but 512 MB for a control reply
        assert not reply.accepted and "at most 1048576 bytes" in reply.reason and pulled == [0]
        pulled.clear()
        reply = servicer.Push(stream(1 << 20), _Peer(1))  # a client the exchange did not address
        assert not reply.accepted and pulled == [0]
        assert coord.admit(0, 1000)[0] and not coord.admit(0, 1000)[0]  # one reply in flight per client
        coord.received(0)
        assert coord.rejected["oversized"] == 1 and coord.rejected["busy"] == 1 and coord.inflight == {}
    finally:
        coord.close()
        t.join(10)


def test_a_payload_above_grpc_4mb_limit_passes_and_an_oversized_one_is_refused(pki):
    coord = Coordinator("r", {0, 1}, set())
    server, address = _serve(coord, pki)
    n = 700_000  # 5.6 MB of float64
    vec = np.random.default_rng(0).normal(size=n)
    got = {}
    coord.begin_round(1)
    t = threading.Thread(target=lambda: got.update(coord.exchange(
        "compute", {0: encode_vector(np.zeros(1))}, "vector", lambda c, env: decode_vector(env.body, n), 60,
        max_reply=reply_bound(n))))
    t.start()
    try:
        conn = _connect(address, pki, "a", "client-0")
        task = conn.pull(0, 0)
        assert task is not None
        big = Envelope("r", 0, 1, 1, "vector", encode_vector(vec)).to_bytes()
        assert len(big) > 4 << 20
        huge = b"\0" * (65 << 20)  # more than this exchange's replies may declare
        ok, why = conn.push(huge)
        assert not ok and "at most" in why and coord.rejected["oversized"] == 1
        ok, why = conn.push(big)
        assert ok, why
        t.join(10)
        assert np.array_equal(got[0], vec)
    finally:
        coord.close()
        server.stop(0)


# ---- whole runs as processes --------------------------------------------------------------------

TINY = {
    "name": "tiny", "seed": 0, "method": "feddymem",
    "data": {"benchmark": "textures", "products": ["brick", "immunohistochemistry", "grass"],
             "train_per_product": 6, "test_normal_per_product": 4, "test_defect_per_product": 4,
             "image_size": 64, "crop_size": 64},
    "clients": {"n": 3, "alpha": 0.5},
    "protocol": "secagg", "privacy": {"dp": False},
    "feddymem": {"rounds": 2, "global_k": 32, "global_k_images": 8, "kmeans_init": "pca-partition"},
    "output": {"embedding_cache": None, "map_examples_per_product": 0},
}


def _config(tmp: Path, certs: Path, **changes) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(TINY))
    cfg["deploy"] = {"certs": str(certs), "address": f"127.0.0.1:{_port()}", "stage_timeout_s": 8,
                     "round_timeout_s": 90, "register_timeout_s": 90, "poll_s": 1, "reconnect_s": 60}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(args, log: Path, fault: str | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FEDSECMEM_FAULT", None)
    if fault:
        env["FEDSECMEM_FAULT"] = fault
    return subprocess.Popen([*FEDSECMEM, *args], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(proc, log: Path, timeout=240) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{log.name} did not finish:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    provision(d, 3)
    return d


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, certs):
    """The in-process simulator's run of the tiny config (its global memory is the reference)."""
    from fedsecmem.config import load_config
    from fedsecmem.run.runner import run

    tmp = tmp_path_factory.mktemp("sim")
    run(load_config(_config(tmp, certs)), tmp / "out")
    memory = np.load(tmp / "out" / "global_memory.npz")
    memory.run_dir = tmp / "out"  # its sites' models too
    return memory


def _run_processes(tmp: Path, cfg: Path, faults: dict | None = None, server_args=()):
    faults = faults or {}
    out = tmp / "server"
    server = _start(["serve", str(cfg), "--out", str(out), *server_args], tmp / "server.log", faults.get("server"))
    clients = {c: _start(["join", str(cfg), "--client-id", str(c), "--out", str(out)], tmp / f"client{c}.log",
                         faults.get(c)) for c in range(3)}
    return server, clients, out


def test_grpc_run_gives_the_simulators_global_memory(tmp_path, certs, simulated):
    cfg = _config(tmp_path, certs)
    server, clients, out = _run_processes(tmp_path, cfg)
    assert _wait(server, tmp_path / "server.log") == 0, (tmp_path / "server.log").read_text()[-3000:]
    for c, p in clients.items():
        assert _wait(p, tmp_path / f"client{c}.log") == 0
    got = np.load(out / "global_memory.npz")
    assert np.array_equal(got["patches"], simulated["patches"])
    assert np.array_equal(got["images"], simulated["images"])
    results = yaml.safe_load((out / "results.json").read_text())
    assert results["aggregation"]["transport"] == "grpc" and results["deployment"]["refused_messages"] == {}
    assert all(r["dropped"] == [] for r in results["per_round"])
    _assert_ledgers_verify(out, certs)
    from fedsecmem.model.detector import Detector
    from fedsecmem.model.store import model_dir

    for c in range(3):  # each joined site kept its model in its own --out, signed in its own ledger
        mine, sims = Detector.load(model_dir(out, c)), Detector.load(model_dir(simulated.run_dir, c))
        assert mine.saved.signed is not None and mine.threshold.value == pytest.approx(sims.threshold.value, rel=1e-5)
        assert all(np.allclose(mine.saved.detector.patch_banks[k].items, sims.saved.detector.patch_banks[k].items,
                               rtol=0, atol=1e-4) for k in sims.saved.detector.patch_banks)
    r = subprocess.run([*FEDSECMEM, "audit", "report", str(out), "--keys", str(certs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    report = yaml.safe_load((out / "report.json").read_text())
    assert r.returncode == 0 and report["ledger"]["ok"] and report["run"]["transport"] == "grpc"
    assert report["ledger"]["messages_matched"] > 50 and len(report["participants"]) == 3


def _assert_ledgers_verify(out: Path, certs: Path) -> None:
    """Every party's ledger verifies under its provisioned key and the messages cross-check."""
    r = subprocess.run([*FEDSECMEM, "audit", "verify", str(out), "--keys", str(certs)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 parties" in r.stdout and "messages matched" in r.stdout


def test_client_killed_mid_round_is_dropped_and_rejoins_next_round(tmp_path, certs):
    """DP on: client 2 dies after key sharing in round 2; SecAgg+ recovers; a restarted client 2
    takes part in round 3."""
    cfg = _config(tmp_path, certs, feddymem__rounds=3, privacy__dp=True, privacy__epsilon=8)
    server, clients, out = _run_processes(tmp_path, cfg, {2: "role=client-2,kind=secagg_relay,round=2"})
    assert _wait(clients[2], tmp_path / "client2.log") == 75  # crashed as asked
    again = _start(["join", str(cfg), "--client-id", "2", "--out", str(out)], tmp_path / "client2b.log")
    assert _wait(server, tmp_path / "server.log") == 0, (tmp_path / "server.log").read_text()[-3000:]
    assert _wait(again, tmp_path / "client2b.log") == 0
    results = yaml.safe_load((out / "results.json").read_text())
    rounds = results["per_round"]
    assert [r["participants"] for r in rounds] == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert rounds[1]["dropped"] == [2]
    assert results["privacy"]["dp"] and 0 < results["privacy"]["epsilon"] <= 8.0
    assert (out / "privacy_state.json").exists()
    _assert_ledgers_verify(out, certs)  # the crashed client's ledger resumes its chain
    from fedsecmem.audits.ledger import events

    assert [e["event"] for e in events(out, "client-2") if e["event"] in ("run_start", "resume", "run_end")] == [
        "run_start", "resume", "run_end"]
    assert events(out, "server", "dropout")[0]["clients"] == [2]


def test_server_killed_after_round_one_resumes_to_the_same_result(tmp_path, certs, simulated):
    cfg = _config(tmp_path, certs)
    server, clients, out = _run_processes(tmp_path, cfg, {"server": "role=server,after_round=1"})
    assert _wait(server, tmp_path / "server.log") == 75
    assert (out / "checkpoint.json").exists() and not (out / "results.json").exists()
    time.sleep(1)
    ledger = out / "ledger" / "server.jsonl"
    kept = ledger.read_bytes()
    ledger.write_bytes(b"".join(kept.splitlines(keepends=True)[:5]))  # cut behind the checkpoint's back
    cut = subprocess.run([*FEDSECMEM, "serve", str(cfg), "--out", str(out), "--resume"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert cut.returncode == 2 and "does not match the checkpoint" in cut.stderr, cut.stderr
    ledger.write_bytes(kept)
    resumed = _start(["serve", str(cfg), "--out", str(out), "--resume"], tmp_path / "resumed.log")
    assert _wait(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    for c, p in clients.items():
        assert _wait(p, tmp_path / f"client{c}.log") == 0
    results = yaml.safe_load((out / "results.json").read_text())
    assert results["deployment"]["resumed_after_round"] == 1 and results["rounds"] == 2
    got = np.load(out / "global_memory.npz")
    assert np.array_equal(got["patches"], simulated["patches"])
    assert np.array_equal(got["images"], simulated["images"])
    _assert_ledgers_verify(out, certs)


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path, certs):
    cfg = _config(tmp_path, certs)
    r = subprocess.run([*FEDSECMEM, "serve", str(cfg), "--out", str(tmp_path / "none"), "--resume"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --resume: no checkpoint")


def _released_by_clients(out: Path, n: int) -> dict[int, tuple[int, int]]:
    """From each client's own ledger: (private vectors it sent, rounds it trained before replying)."""
    import json as _json

    counts = {}
    for c in range(n):
        sent = [_json.loads(line) for line in (out / "ledger" / f"client-{c}.jsonl").read_text().splitlines()]
        sent = [e for e in sent if e.get("event") == "message" and e.get("dir") == "sent"]
        masked = sum(e["stage"] == "masked" for e in sent)
        trained = sum(e["stage"] == "ready" and e["round"] > 1 for e in sent)
        counts[c] = (masked, trained)
    return counts


def test_server_killed_mid_round_under_dp_resumes_with_every_release_charged(tmp_path, certs):
    """The crash comes after round 2's private releases left the clients and before its checkpoint:
    the resumed run's epsilon must cover everything released, the lost round included."""
    from fedsecmem.audits.accountant import Step, epsilon_of

    # the re-run round costs privacy: the clients agreed to spend up to 12 for the target 8 (without the
    # room, each client refuses the re-run past its target)
    cfg = _config(tmp_path, certs, privacy__dp=True, privacy__epsilon=8.0, privacy__epsilon_budget=12.0)
    server, clients, out = _run_processes(tmp_path, cfg, {"server": "role=server,round=2,stage=aggregated"})
    assert _wait(server, tmp_path / "server.log") == 75
    resumed = _start(["serve", str(cfg), "--out", str(out), "--resume"], tmp_path / "resumed.log")
    assert _wait(resumed, tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    for c, p in clients.items():
        assert _wait(p, tmp_path / f"client{c}.log") == 0
    results = json.loads((out / "results.json").read_text())
    pv = results["privacy"]
    assert results["deployment"]["resumed_after_round"] == 1 and results["rounds"] == 2
    z, delta = pv["noise_multiplier"], pv["delta"]
    # what no noise covers stays with the clients: no training loss, no per-client AUROC at the server
    assert all(row["withheld"] and row["auroc_image"] is None for row in results["per_client"])
    assert results["auroc"]["image"] is None and not any("loss" in r for r in results["per_round"])
    for c in range(3):
        kept = json.loads((out / f"evaluation-client-{c}.json").read_text())
        assert kept["client"] == c and 0.0 <= kept["auroc_image"] <= 1.0
    for c, (masked, trained) in _released_by_clients(out, 3).items():
        assert masked > pv["releases_per_round"] * 2 and trained == 2  # round 2 ran twice
        q, steps = pv["dp_sgd"]["per_client"][str(c)]["sample_rate"], pv["dp_sgd"]["per_client"][str(c)]["steps_per_round"]
        released = epsilon_of([Step(z, 1.0, masked), Step(z, q, steps * trained)], delta, pv["accountant"])
        assert pv["per_client"][c] >= released * (1 - 1e-9), (c, pv["per_client"][c], released)
    _assert_ledgers_verify(out, certs)


def test_the_readmes_served_run_commands_give_a_folder_the_auditor_can_verify(tmp_path):
    """The README's served-run block, run as written (in a scratch folder, with `.venv/bin/fedsecmem`
    standing for this interpreter; serve and join get small data, a free port and short timeouts
    appended): it ends with `audit verify`, `audit report` and `audit check` on the provisioned keys."""
    text = (ROOT / "README.md").read_text()
    block = text.split("# the same run across processes")[1].split("```")[0]
    script = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("#"))
    assert "audit verify runs/served --keys certs" in script and "--out runs/served" in script
    extra = ["data.products=[brick,grass]", "data.train_per_product=6", "data.test_normal_per_product=3",
             "data.test_defect_per_product=3", "data.image_size=64", "data.crop_size=64", "feddymem.rounds=2",
             "audit.leakage=false", "output.embedding_cache=null", "output.map_examples_per_product=0",
             f"deploy.address=127.0.0.1:{_port()}", "deploy.stage_timeout_s=20", "deploy.poll_s=1",
             "deploy.register_timeout_s=120", "deploy.round_timeout_s=120"]
    sets = " ".join(f"--set '{x}'" for x in extra)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    wrapper = tmp_path / ".venv" / "bin" / "fedsecmem"
    wrapper.write_text(f"""#!/bin/bash
case "$1" in serve|join) exec {sys.executable} -m fedsecmem "$@" {sets} ;; *) exec {sys.executable} -m fedsecmem "$@" ;; esac
""")
    wrapper.chmod(0o755)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("FEDSECMEM_FAULT", None)
    r = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "ledgers verified: 4 parties" in r.stdout and "0 failed" in r.stdout, r.stdout[-3000:]
    assert "client 0: epsilon" in r.stdout and "over 1 runs" in r.stdout  # the site's budget, shown
    report = json.loads((tmp_path / "runs" / "served" / "report.json").read_text())
    assert report["run"]["transport"] == "grpc" and report["dp"]["enabled"]
    assert all(e is not None for e in report["dp"]["epsilon_per_client_signed_by_client"])  # each site's own figure


def test_a_deviating_server_asking_for_a_sites_model_gets_a_refusal_and_no_bank(tmp_path, certs):
    """The site model never leaves: a task asking for it (a kind no honest server sends) is refused with
    a reason in the client's ledger, and the reply carries none of the model's bytes."""
    from fedsecmem.config import load_config
    from fedsecmem.deployment.join import ClientSession
    from fedsecmem.protocols.coordinator import ERROR_KIND
    from fedsecmem.protocols.wire import BodyBuilder, Envelope, parse_envelope

    session = ClientSession(load_config(_config(tmp_path, certs)), 0, tmp_path / "site")
    for kind in ("model", "bank", "export"):
        reply = parse_envelope(session.answer(Envelope("r" * 16, 0, 1, 0, kind, BodyBuilder().build()).to_bytes()))
        assert reply.kind == ERROR_KIND and "unknown task" in reply.body.SerializeToString().decode("latin-1")
        assert len(reply.to_bytes()) < 200  # a reason, not a bank (the bank alone is tens of KB)
    session.close("failed: test")
    refused = [json.loads(line) for line in (tmp_path / "site" / "ledger" / "client-0.jsonl").read_text().splitlines()
               if '"refused"' in line]
    assert [r["task"] for r in refused] == ["model", "bank", "export"]


def test_a_deviating_server_gets_refusals_from_a_private_site_and_no_count_or_charge(tmp_path, certs):
    """A private site as deployed (``ClientSession``) against a server that deviates: its hello holds no
    training count, a task asking for the plain protocol in a secagg run or for a round past the run's
    is refused with a reason in its ledger, and nothing is charged to its budget for either."""
    from fedsecmem.config import load_config
    from fedsecmem.deployment.join import ClientSession
    from fedsecmem.deployment.messages import encode_task
    from fedsecmem.method.round import RoundTask
    from fedsecmem.protocols.coordinator import ERROR_KIND, Coordinator
    from fedsecmem.protocols.kmeans_party import Moments
    from fedsecmem.protocols.network_sum import NetworkCollective
    from fedsecmem.protocols.secure_sum import make_secure_sum
    from fedsecmem.protocols.wire import BodyBuilder, Envelope, parse_envelope

    cfg = load_config(_config(tmp_path, certs, privacy__dp=True, privacy__epsilon=8.0, privacy__min_survivors=2))
    session = ClientSession(cfg, 0, tmp_path / "site")

    def ask(rnd, step, kind, body):
        return parse_envelope(session.answer(Envelope("r" * 16, 0, rnd, step, kind, body).to_bytes()))

    hello = ask(0, 1, "hello", BodyBuilder().build())
    assert hello.kind == "hello" and "n_train" not in hello.body.ints and "products" not in hello.body.texts
    assert "n_test" in hello.body.ints  # the body is read where the counts would be
    assert ask(1, 1, "round", encode_task(RoundTask(1, False, session.me.side.floor))).kind == "ready"
    col = NetworkCollective(Coordinator("r" * 16, {0, 1, 2}), "patches", {0, 1, 2}, 8, 10, make_secure_sum("plain"), 1.0)
    told_plain = ask(1, 2, "compute", col._task(Moments()))
    past_the_run = ask(4, 1, "round", encode_task(RoundTask(4, True, session.me.side.floor)))
    for reply, why in ((told_plain, b"protocol 'plain' asked"), (past_the_run, b"round 4 asked")):
        assert reply.kind == ERROR_KIND and why in reply.body.SerializeToString()
    session.close("failed: test")
    ledger = [json.loads(line) for line in (tmp_path / "site" / "ledger" / "client-0.jsonl").read_text().splitlines()]
    assert [r["task"] for r in ledger if r["event"] == "refused"] == ["compute", "round"]
    assert not [r for r in ledger if r["event"] == "dp"]  # no release was charged or signed
    assert session.me.side.budget.accountant.history[0] == []  # round 1 trains nothing: nothing spent
