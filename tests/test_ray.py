"""The Ray backend: clients as Ray actors driving the same round as the simulator and the
deployment, on a local Ray (2 CPUs): the same global memory bit for bit, and a client actor killed
mid-round as a dropout SecAgg+ recovers from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray

from fedsecmem.audits.ledger import verify_run
from fedsecmem.config import config_from_dict
from fedsecmem.deployment.checks import FAULT_ENV
from fedsecmem.model.detector import Detector
from fedsecmem.model.store import model_dir
from fedsecmem.config import ExecutionConfig
from fedsecmem.deployment.ray_backend import RayTransport, actor_groups, run_on_ray
from fedsecmem.errors import UserError
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.wire import BodyBuilder, Envelope, parse_envelope
from fedsecmem.run.runner import run
from test_deploy import TINY as SERVED_TINY

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


def test_a_ray_run_gives_the_simulators_global_memory_and_results(local_ray, tmp_path):
    got = run_on_ray(_cfg(), tmp_path / "ray")
    want = run(_cfg(execution__backend="inprocess"), tmp_path / "sim")
    a, b = np.load(tmp_path / "ray" / "global_memory.npz"), np.load(tmp_path / "sim" / "global_memory.npz")
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)  # bit for bit
    for g, w in zip(got["per_client"], want["per_client"]):  # every client's whole row, evaluated once at the end
        # a raw score (the threshold) to float precision: an actor embeds its images in other batches
        assert g.pop("threshold") == pytest.approx(w.pop("threshold"), rel=1e-5)
        assert g == w, {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
    assert got["aggregation"]["transport"] == "ray" and got["auroc"]["image"] == want["auroc"]["image"]
    v = verify_run(tmp_path / "ray")  # every actor kept its own ledger beside the server's
    assert v.ok and len(v.parties) == 4 and v.messages_matched > 50, [str(p) for p in v.problems[:5]]
    for c in range(3):  # each actor kept its site's model, signed in that site's ledger: the simulator's
        mine, sims = Detector.load(model_dir(tmp_path / "ray", c)), Detector.load(model_dir(tmp_path / "sim", c))
        assert mine.saved.signed is not None and mine.threshold.value == pytest.approx(sims.threshold.value, rel=1e-5)
        assert all(np.allclose(mine.saved.detector.patch_banks[k].items, sims.saved.detector.patch_banks[k].items,
                               rtol=0, atol=1e-4) for k in sims.saved.detector.patch_banks)


def test_a_client_actor_killed_mid_round_is_a_dropout_secagg_recovers_from(local_ray, tmp_path, monkeypatch):
    """Client 2's actor process dies (as a crash would) when round 2's masked inputs are asked for,
    after the key sharing: the round completes without it and SecAgg+ removes its masks. Clients 0
    and 1 share one actor here (``clients_per_actor: 2``), client 2 has its own."""
    monkeypatch.setenv(FAULT_ENV, "role=client-2,kind=secagg_relay,round=2")
    got = run_on_ray(_cfg(execution__clients_per_actor=2), tmp_path / "ray")
    rounds = got["per_round"]
    assert rounds[0]["dropped"] == [] and rounds[1]["dropped"] == [2], rounds
    assert (tmp_path / "ray" / "global_memory.npz").is_file() and got["auroc"]["image"] is not None
    problems = [str(p) for p in verify_run(tmp_path / "ray").problems]
    # what the crash leaves: client 2's ledger ends where it died (no run_end), as a crashed process's would
    assert problems and all(p.startswith("client-2.jsonl") for p in problems), problems


def test_grid_runs_as_ray_tasks_match_in_process_runs_and_are_reused(local_ray, tmp_path):
    from fedsecmem.run.grid import run_grid

    cfgs = [_cfg(execution__backend="inprocess").model_copy(update={"seed": s}) for s in (0, 1)]
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


def test_clients_without_test_images_on_ray_train_and_are_not_scored(local_ray, tmp_path):
    """Six clients, three per actor, four test images in all: the clients left without test images
    (embedded nothing to score) still train and share; their rows say they were not scored."""
    cfg = _cfg(clients__n=6, clients__alpha=10.0, data__products=["brick", "grass"], data__train_per_product=12,
               data__test_normal_per_product=1, data__test_defect_per_product=1, execution__clients_per_actor=3)
    got = run_on_ray(cfg, tmp_path / "ray")
    empty = [row for row in got["per_client"] if row["n_test"] == 0]
    assert len(empty) >= 2 and all(row["auroc_image"] is None for row in empty)
    assert all(r["participants"] == list(range(6)) for r in got["per_round"])


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
    first = coord.exchange("ping", bodies, "pong", lambda c, env: c, timeout=10)
    assert sorted(first) == [0, 2, 3] and transport.failed == {1} and not transport.dead
    second = coord.exchange("ping", {c: b for c, b in bodies.items() if c != 1}, "pong", lambda c, env: c, timeout=10)
    assert sorted(second) == [0, 2, 3]
    assert shared.calls == [[0, 1, 2], [0, 2]] and alone.calls == [[3], [3]]
    coord.close()
    transport.stop(grace=1)
    assert shared.closed == [0, 1, 2] and alone.closed == [3]  # the failed client's ledger ends too
