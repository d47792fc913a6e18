"""Clients as Ray actors (``execution.backend: ray``): the served run, carried by Ray instead of gRPC.

Each client is a Ray actor running the same ``ClientSession`` as ``fedsecmem join``: it loads and
embeds only its own part of the benchmark and holds its generator, bank, privacy state and ledger,
as a hospital would. The driver runs the same ``Server`` as ``fedsecmem serve`` (the sans-IO
round, the SecAgg+ machines, the k-means driver, ledgers and accounting) with ``RayTransport`` in
place of the gRPC server: one pump thread per client takes the coordinator's next task for that
client, calls the actor, and hands the reply back through the coordinator's checks (admission,
stage, size, run id). An actor that dies or fails is a dropout, which SecAgg+ recovers from as in a
deployment. So the three drivers (in process, gRPC, Ray) share one round and one set of protocol
state machines; the Ray and gRPC runs share the server code too.

Threat model: the cryptography is the deployment's (SecAgg+ masks, signed key advertisements,
signed ledgers), so the server learns what it learns over gRPC. Ray's own channels are not the
deployment's mutual TLS: on a cluster shared with others, turn on Ray's TLS. Without
``deploy.certs`` the run provisions per-run keys in a temporary folder (deleted at the end; the
public keys stay in ``ledger/keys.json``), like the simulator's per-run keys.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from fedsecmem.config import RunConfig, config_from_dict
from fedsecmem.crypto.pki import provision
from fedsecmem.deployment.checks import FAULT_ENV, check_deployable
from fedsecmem.deployment.serve import Server
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.wire import WireError, parse_envelope
from fedsecmem.run.grid import require_ray

__all__ = ["RayTransport", "run_on_ray"]

log = logging.getLogger("fedsecmem.ray")
POLL_S = 0.5  # how long a pump thread waits for its client's next task before looking again


def _actor_class(ray):
    @ray.remote
    class ClientActor:
        """One client (or, with ``execution.clients_per_actor``, several, each apart): its
        ``ClientSession`` (data, embeddings, generator, bank, budget, ledger)."""

        def __init__(self, cfg_json: str, cids: list[int], folder: str, threads: int):
            import torch

            from fedsecmem.deployment.join import ClientSession

            torch.set_num_threads(threads)  # Ray gives workers 1 thread; the same math as the driver's
            cfg = config_from_dict(json.loads(cfg_json))
            self.sessions = {c: ClientSession(cfg, c, Path(folder)) for c in cids}

        def answer(self, cid: int, data: bytes, previous: tuple[bytes, bool, str] | None = None) -> bytes:
            """Client ``cid``'s reply to ``data``; ``previous``: how the server took its last reply
            (one call per exchange instead of two)."""
            if previous is not None:
                self.sessions[cid].pushed(*previous)
            return self.sessions[cid].answer(data)

        def close(self, cid: int, previous: tuple[bytes, bool, str] | None = None) -> bool:
            session = self.sessions[cid]
            if previous is not None:
                session.pushed(*previous)
            session.close("completed" if session.finished else "failed: the run ended without it")
            return session.finished

    return ClientActor


class RayTransport:
    """Carries a ``Coordinator``'s tasks to client actors and their replies back (``actors``: client ->
    the actor that holds it)."""

    def __init__(self, ray, coord: Coordinator, actors: dict[int, object]):
        self.ray, self.coord, self.actors = ray, coord, actors
        self.stopping = threading.Event()
        self.dead: set[int] = set()
        self.last: dict[int, tuple[bytes, bool, str]] = {}  # each client's last reply and how it was taken
        self.threads = [threading.Thread(target=self._pump, args=(c,), name=f"ray-client-{c}", daemon=True)
                        for c in sorted(actors)]
        for t in self.threads:
            t.start()

    def _pump(self, cid: int) -> None:
        actor, done = self.actors[cid], (0, 0)
        while not self.stopping.is_set():
            data = self.coord.next_task(cid, *done, wait=POLL_S)
            if data is None:
                if self.coord.closed:
                    return
                continue
            try:
                reply = self.ray.get(actor.answer.remote(cid, data, self.last.pop(cid, None)))
            except Exception as exc:  # RayActorError (the actor died), RayTaskError (it raised): a dropout
                log.warning("client %d dropped out: %s", cid, str(exc).splitlines()[0][:300])
                self.dead.add(cid)
                return
            ok, reason = self.coord.admit(cid, len(reply))
            if ok:
                try:
                    ok, reason = self.coord.handle_push(cid, reply)
                finally:
                    self.coord.received(cid)
            self.last[cid] = (reply, ok, reason)  # recorded by the client with its next task, or at close
            try:
                env = parse_envelope(reply)
                done = (env.round, env.step)
            except WireError:
                continue

    def stop(self, grace: float) -> None:
        """Stop the pumps and close every live client's ledger."""
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=grace + POLL_S)
        for c, actor in sorted(self.actors.items()):
            if c in self.dead:
                continue
            try:
                self.ray.get(actor.close.remote(c, self.last.pop(c, None)), timeout=30)
            except Exception as exc:  # noqa: BLE001 - a dead actor has nothing to close
                log.warning("client %d: closing its ledger failed: %s", c, str(exc).splitlines()[0][:300])


def run_on_ray(cfg: RunConfig, out: Path) -> dict:
    """``fedsecmem run`` with ``execution.backend: ray``: the run's results, as ``serve`` writes them."""
    ray = require_ray()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ex, n = cfg.execution, cfg.clients.n
    with tempfile.TemporaryDirectory(prefix="fedsecmem-keys-") as keys:
        if cfg.deploy.certs is None:  # per-run keys, as the simulator's (public halves in ledger/keys.json)
            provision(Path(keys), n)
            cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"certs": Path(keys)})})
        check_deployable(cfg)
        started = not ray.is_initialized()
        if started:
            ray.init(address=ex.address or None, num_cpus=ex.local_cpus if not ex.address else None,
                     include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
        env = {k: v for k, v in os.environ.items() if k == FAULT_ENV}  # fault drills reach the actors
        cls = _actor_class(ray).options(num_cpus=ex.cpus_per_client, num_gpus=ex.gpus_per_client,
                                        runtime_env={"env_vars": env} if env else None)
        cfg_json = cfg.model_dump_json()
        import torch

        threads = ex.threads_per_client or torch.get_num_threads()
        per = ex.clients_per_actor
        groups = [list(range(i, min(i + per, n))) for i in range(0, n, per)]
        handles = [cls.remote(cfg_json, g, str(out.resolve()), threads) for g in groups]
        actors = {c: h for g, h in zip(groups, handles) for c in g}
        try:
            server = Server(cfg, out, False, transport=lambda coord: RayTransport(ray, coord, actors), name="ray")
            return server.run()
        finally:
            for actor in handles:
                ray.kill(actor)
            if started:
                ray.shutdown()
