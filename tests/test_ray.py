"""The Ray backend: clients as Ray actors driving the same round as the simulator and the
deployment, on a local Ray (2 CPUs): the main job's config trains on the same images and gives the
same global memory bit for bit and the same rows; a client actor killed mid-round is a dropout SecAgg+
recovers from; an actor holds only its own clients' keys and cannot answer for another client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from fedsecmem.audits.ledger import verify_run
from fedsecmem.config import config_from_dict
from fedsecmem.deployment.checks import FAULT_ENV
from fedsecmem.model.detector import Detector
from fedsecmem.model.store import model_dir
from fedsecmem.config import ExecutionConfig
from fedsecmem.deployment.ray_backend import RayTransport, actor_groups, run_on_ray
from fedsecmem.errors import UserError
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.wire import Body, BodyBuilder, Envelope, parse_envelope
from fedsecmem.run.runner import run
from test_deploy import TINY as SERVED_TINY

ROOT = Path(__file__).resolve().parents[1]
# the served runs' tiny config (tests/test_deploy.py), on Ray
TINY = {**json.loads(json.dumps(SERVED_TINY)), "name": "tiny-ray",
        "deploy": {"stage_timeout_s": 6, "round_timeout_s": 120, "register_timeout_s": 120},
        "execution": {"backend": "ray"}}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _cfg(**changes):
    tree = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})[name] = value
    return config_from_dict(tree)


def _quickstart():
    """The main job's config (configs/quickstart.yaml, the data, clients, rounds and audit.leakage as
    they are) without DP (its noise is fresh per run: with it no two runs agree), on Ray."""
    tree = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    tree["privacy"]["dp"] = False
    tree["output"]["embedding_cache"] = None  # nothing written into the repository's runs/
    tree["execution"] = {"backend": "ray"}
    return config_from_dict(tree)


def test_the_main_jobs_config_on_ray_trains_on_the_same_images_and_gives_the_in_process_results(
        local_ray, tmp_path, monkeypatch):
    """The same config trains on the same images on every backend: with ``audit.leakage: true`` every
    site withholds the same non-members as in process (per-client n_train), and every client's whole
    evaluation row, the global memory (bit for bit) and each site's kept model are the simulator's.
    The leakage a Ray run cannot measure (the candidates stay at the sites) is said in results.json."""
    from fedsecmem.run import runner

    cfg = _quickstart()
    assert cfg.audit.leakage and cfg.clients.n == 5
    got = run_on_ray(cfg, tmp_path / "ray")
    # the in-process reference skips its membership inference: it runs after training and changes no row
    monkeypatch.setattr(runner, "LeakageViews", lambda cfg: None)
    want = run(cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"backend": "inprocess"})}),
               tmp_path / "sim")
    assert [r["n_train"] for r in got["per_client"]] == [r["n_train"] for r in want["per_client"]]
    a, b = np.load(tmp_path / "ray" / "global_memory.npz"), np.load(tmp_path / "sim" / "global_memory.npz")
    # to float32 precision: an actor embeds its images in other batches, and a client's local k-means sums
    # of those (before the fixed point) can round to the neighbouring fixed-point value (measured: patches bit
    # for bit, 5% of the image centres' values one float32 ulp apart)
    assert a.files == b.files and all(np.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a.files)
    for g, w in zip(got["per_client"], want["per_client"]):  # every client's whole row, evaluated once at the end
        # a raw score (the threshold) to float precision: an actor embeds its images in other batches
        assert g.pop("threshold") == pytest.approx(w.pop("threshold"), rel=1e-5)
        assert g == w, {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
    assert got["aggregation"]["transport"] == "ray" and got["auroc"]["image"] == want["auroc"]["image"]
    assert got["leakage"]["measured"] is False and "stay at the sites" in got["leakage"]["reason"]
    v = verify_run(tmp_path / "ray")  # every actor kept its own ledger beside the server's
    assert v.ok and len(v.parties) == 6 and v.messages_matched > 50, [str(p) for p in v.problems[:5]]
    starts = [json.loads(f.read_text().splitlines()[0]) for f in sorted((tmp_path / "ray" / "ledger").glob("*.jsonl"))]
    assert len({s["config_sha256"] for s in starts}) == 1  # one config signed by all, whatever folder holds its keys
    for c in range(5):  # each actor kept its site's model, signed in that site's ledger: the simulator's
        mine, sims = Detector.load(model_dir(tmp_path / "ray", c)), Detector.load(model_dir(tmp_path / "sim", c))
        assert mine.saved.signed is not None and mine.threshold.value == pytest.approx(sims.threshold.value, rel=1e-5)
        assert all(np.allclose(mine.saved.detector.patch_banks[k].items, sims.saved.detector.patch_banks[k].items,
                               rtol=0, atol=1e-4) for k in sims.saved.detector.patch_banks)


def test_a_client_actor_killed_mid_round_is_a_dropout_secagg_recovers_from_and_clients_without_test_images_train(
        local_ray, tmp_path, monkeypatch):
    """Six clients, two per actor (``clients_per_actor: 2``), four test images in all. The actor of
    clients 2 and 3 dies (as a crash would) when round 2's masked inputs are asked for, after the key
    sharing: the round completes without them and SecAgg+ removes their masks. The clients the split
    left without test images (embedded nothing to score) still train and share; their rows say they
    were not scored."""
    monkeypatch.setenv(FAULT_ENV, "role=client-2,kind=secagg_relay,round=2")
    cfg = _cfg(clients__n=6, clients__alpha=10.0, data__products=["brick", "grass"], data__train_per_product=12,
               data__test_normal_per_product=1, data__test_defect_per_product=1, execution__clients_per_actor=2)
    got = run_on_ray(cfg, tmp_path / "ray")
    rounds = got["per_round"]
    assert rounds[0]["participants"] == list(range(6)) and rounds[0]["dropped"] == [], rounds
    assert rounds[1]["dropped"] == [2, 3] and rounds[1]["participants"] == [0, 1, 4, 5], rounds
    assert (tmp_path / "ray" / "global_memory.npz").is_file() and got["auroc"]["image"] is not None
    assert [row["client"] for row in got["per_client"]] == [0, 1, 4, 5]
    empty = [row for row in got["per_client"] if row["n_test"] == 0]
    assert len(empty) == 2 and all(row["auroc_image"] is None for row in empty)  # clients 0 and 5
    problems = [str(p) for p in verify_run(tmp_path / "ray").problems]
    # what the crash leaves: clients 2 and 3's ledgers end where their process died (no run_end), as a
    # crashed process's would (client 3's last reply, recorded with its next task, is not in its ledger)
    assert all(any(p.startswith(f"client-{c}.jsonl") and "run_end" in p for p in problems) for c in (2, 3))
    assert all("client-2" in p or "client-3" in p for p in problems), problems  # nobody else's


def test_grid_runs_as_ray_tasks_match_in_process_runs_and_are_reused(local_ray, tmp_path):
    from fedsecmem.run.grid import run_grid

    cfgs = [_cfg(execution__backend="inprocess", feddymem__rounds=1).model_copy(update={"seed": s}) for s in (0, 1)]
    on_ray = run_grid([(c, tmp_path / f"ray{i}") for i, c in enumerate(cfgs)], "ray")
    here = run_grid([(c, tmp_path / f"here{i}") for i, c in enumerate(cfgs)], "inprocess")
    assert [r["auroc"]["image"] for r in on_ray] == [r["auroc"]["image"] for r in here]
    assert [r["seed"] for r in on_ray] == [0, 1]
    stamp = (tmp_path / "ray0" / "results.json").stat().st_mtime_ns
    again = run_grid([(c, tmp_path / f"ray{i}") for i, c in enumerate(cfgs)], "ray")  # finished: reused
    assert again == on_ray and (tmp_path / "ray0" / "results.json").stat().st_mtime_ns == stamp


def test_without_ray_the_backend_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    import sys

    from fedsecmem.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    cfg = tmp_path / "c.yaml"
    cfg.write_text("execution:\n  backend: ray\n")
    assert main(["run", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fedsecmem[ray]'" in err


def test_auto_deals_the_clients_to_one_actor_per_cpu_and_refuses_resources_the_cluster_lacks():
    auto = ExecutionConfig()
    assert actor_groups(10, auto, {"CPU": 2.0}) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert actor_groups(3, auto, {"CPU": 16.0}) == [[0], [1], [2]]  # at most one actor per client
    assert actor_groups(5, ExecutionConfig(cpus_per_client=2), {"CPU": 4.0}) == [[0, 1, 2], [3, 4]]
    assert actor_groups(4, ExecutionConfig(gpus_per_client=0.5), {"CPU": 8.0, "GPU": 1.0}) == [[0, 1], [2, 3]]
    assert actor_groups(5, ExecutionConfig(clients_per_actor=2), {"CPU": 64.0}) == [[0, 1], [2, 3], [4]]
    with pytest.raises(UserError, match=r"^execution.gpus_per_client: 1 asked .* has 0 GPUs$"):
        actor_groups(4, ExecutionConfig(gpus_per_client=1), {"CPU": 16.0})
    # an existing cluster may scale up: its current resources are not refused, only used to deal
    assert actor_groups(4, ExecutionConfig(gpus_per_client=1), {"CPU": 16.0}, local=False) == [[0, 1, 2, 3]]


class _Ref:
    def __init__(self, value):
        self.value = value


class _FakeRay:
    """Ray's calls as plain function calls: the transport's own logic, without processes."""

    @staticmethod
    def get(ref, timeout=None):
        return ref.value


class _Method:
    def __init__(self, fn):
        self.remote = lambda *a: _Ref(fn(*a))


class _Actor:
    """Answers ``ping`` with ``pong``; ``fails``: the clients whose session raises."""

    def __init__(self, fails=()):
        self.calls, self.fails, self.closed = [], set(fails), []
        self.answer = _Method(self._answer)
        self.close = _Method(lambda cid, verdict=None: self.closed.append(cid) or True)

    def _answer(self, tasks):
        self.calls.append(sorted(tasks))
        out = {}
        for cid, (data, _verdict) in tasks.items():
            env = parse_envelope(data)
            out[cid] = ("RuntimeError: broken" if cid in self.fails else
                        Envelope(env.run_id, cid, env.round, env.step, "pong", BodyBuilder().build()).to_bytes())
        return out


def test_one_call_per_actor_per_exchange_and_a_failing_client_drops_out_alone():
    """Clients 0, 1 and 2 share one actor, client 3 has its own: each exchange is one call per actor
    carrying all its clients' tasks; client 1's session failing makes it (only it) a dropout, its
    actor-mates and the other actor go on, and every client of a live actor has its ledger closed."""
    coord = Coordinator("run-a", {0, 1, 2, 3})
    coord.begin_round(1)
    shared, alone = _Actor(fails={1}), _Actor()
    transport = RayTransport(_FakeRay(), coord, {0: shared, 1: shared, 2: shared, 3: alone})
    bodies = {c: BodyBuilder().build() for c in range(4)}
    first = coord.exchange("ping", bodies, "pong", lambda c, env: c, timeout=1.5)  # client 1 never answers
    assert sorted(first) == [0, 2, 3] and transport.failed == {1} and not transport.dead
    second = coord.exchange("ping", {c: b for c, b in bodies.items() if c != 1}, "pong", lambda c, env: c, timeout=10)
    assert sorted(second) == [0, 2, 3]
    assert shared.calls == [[0, 1, 2], [0, 2]] and alone.calls == [[3], [3]]
    coord.close()
    transport.stop(grace=1)
    assert shared.closed == [0, 1, 2] and alone.closed == [3]  # the failed client's ledger ends too


class _Impostor(_Actor):
    """Holds client 0 and answers for it, and for client 1 too (a reply in client 1's name)."""

    def _answer(self, tasks):
        out = super()._answer(tasks)
        env = parse_envelope(tasks[0][0])
        out[1] = Envelope(env.run_id, 1, env.round, env.step, "pong", BodyBuilder().text("by", "impostor").build()
                          ).to_bytes()
        return out


class _Late(_Actor):
    """Answers once ``first`` has answered (so a forged reply would arrive before this real one)."""

    def __init__(self, first):
        super().__init__()
        self.first = first

    def _answer(self, tasks):
        while not self.first.calls:
            time.sleep(0.01)
        time.sleep(0.2)
        return {c: Envelope((e := parse_envelope(d)).run_id, c, e.round, e.step, "pong",
                            BodyBuilder().text("by", "real").build()).to_bytes() for c, (d, _) in tasks.items()}


def test_an_actor_answering_for_a_client_it_does_not_hold_is_refused_and_the_real_reply_taken():
    coord = Coordinator("run-a", {0, 1})
    coord.begin_round(1)
    impostor = _Impostor()
    real = _Late(impostor)
    transport = RayTransport(_FakeRay(), coord, {0: impostor, 1: real})
    by = lambda c, env: Body(env.body, "pong").text("by", 20) if env.body.texts else "plain"  # noqa: E731
    got = coord.exchange("ping", {c: BodyBuilder().build() for c in (0, 1)}, "pong", by, timeout=5)
    coord.close()
    transport.stop(grace=1)
    assert got == {0: "plain", 1: "real"}, got
    assert coord.rejected["identity"] == 1 and sum(coord.rejected.values()) == 1, coord.rejected


@pytest.mark.parametrize("provisioned", [True, False])  # deploy.certs given, or per-run keys
def test_an_actor_is_given_its_own_clients_private_keys_and_public_material_only(tmp_path, monkeypatch, provisioned):
    """What each actor can read: the files of any folder named in its arguments (its config's
    deploy.certs included) and any key material passed as bytes."""
    from types import SimpleNamespace

    from fedsecmem.crypto.pki import provision
    from fedsecmem.deployment import ray_backend

    certs = tmp_path / "certs"
    if provisioned:
        provision(certs, 3)
    given, readable = [], []

    class _Class:
        def options(self, **kw):
            return self

        def remote(self, *args):
            given.append(args)
            return object()

    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def server(cfg, out, *a, **k):  # while the run's keys exist: what could each actor read?
        for args in given:
            seen = {}
            for arg in args:
                if isinstance(arg, dict):
                    seen.update({str(k): v for k, v in arg.items()})
                elif isinstance(arg, str) and arg.lstrip().startswith("{"):
                    folder = json.loads(arg)["deploy"]["certs"]
                    seen.update(files(Path(folder)) if folder else {})
                elif isinstance(arg, str) and Path(arg).is_dir():
                    seen.update(files(Path(arg)))
            readable.append((args[1], seen))
        return SimpleNamespace(run=lambda: {})

    fake_ray = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2.0},
                               kill=lambda actor: None, shutdown=lambda: None)
    monkeypatch.setattr(ray_backend, "require_ray", lambda: fake_ray)
    monkeypatch.setattr(ray_backend, "_actor_class", lambda ray: _Class())
    monkeypatch.setattr(ray_backend, "Server", server)
    run_on_ray(_cfg(deploy__certs=str(certs) if provisioned else None, execution__clients_per_actor=2), tmp_path / "out")
    assert [cids for cids, _ in readable] == [[0, 1], [2]]
    for cids, seen in readable:
        private = {name for name in seen if name.endswith(".key")}
        assert private == {f"client-{c}.sign.key" for c in cids}, (cids, sorted(private))  # no ca.key, no server's
        assert {f"client-{c}.sign.pub" for c in range(3)} | {"ca.pem"} <= set(seen)  # its neighbours' verify keys
