"""Clients as Ray actors (``execution.backend: ray``): the served run, carried by Ray instead of gRPC.

Each client is a Ray actor running the same ``ClientSession`` as ``fedsecmem join``: it loads and
embeds only its own part of the benchmark and holds its generator, bank, privacy state and ledger,
as a hospital would. The driver runs the same ``Server`` as ``fedsecmem serve`` (the sans-IO
round, the SecAgg+ machines, the k-means driver, ledgers and accounting) with ``RayTransport`` in
place of the gRPC server: one pump thread per actor takes the coordinator's open tasks for the
clients that actor holds, calls it once, and hands each reply back through the coordinator's
checks (admission, stage, size, run id). An actor that dies or fails is a dropout, which SecAgg+ recovers from as in a
deployment. So the three drivers (in process, gRPC, Ray) share one round and one set of protocol
state machines; the Ray and gRPC runs share the server code too.

Threat model: the cryptography is the deployment's (SecAgg+ masks, signed key advertisements,
signed ledgers), so the server learns what it learns over gRPC. Each actor is given only its own
clients' ledger signing keys, with the public material (the CA certificate, every party's verify key,
identities and revocations): never another client's key, the server's or ``ca.key``; and a reply an
actor returns for a client it does not hold is refused as an identity refusal, so an actor cannot
answer or sign for another client. But a Ray cluster is one trust domain: whoever runs it (the head
node, or any process on its nodes) can read every actor's memory and objects, keys and data included.
Sites that do not trust each other use ``serve``/``join`` (docs/scaling.md). Ray's own channels are not
the deployment's mutual TLS: on a cluster shared with others, turn on Ray's TLS. Without
``deploy.certs`` the run provisions per-run keys in a temporary folder (deleted at the end; the
public keys stay in ``ledger/keys.json``), like the simulator's per-run keys.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

from fedsecmem.config import ExecutionConfig, RunConfig, config_from_dict
from fedsecmem.crypto.pki import SERVER, client_name, provision
from fedsecmem.deployment.checks import FAULT_ENV, check_deployable
from fedsecmem.deployment.serve import Server
from fedsecmem.errors import UserError
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.wire import parse_envelope
from fedsecmem.run.grid import require_ray

__all__ = ["RayTransport", "actor_groups", "actor_keys", "run_on_ray"]

log = logging.getLogger("fedsecmem.ray")
POLL_S = 0.5  # how long a pump thread waits for its clients' next tasks before looking again
# A local Ray passes call arguments and results up to this size inline instead of through its object
# store: an actor's tasks or replies of one exchange are often a few hundred KB (masked vectors of
# several clients), over Ray's 100 KB default, and each would otherwise add an object-store round
# trip to the exchange. An existing cluster keeps its own setting.
INLINE_BYTES = 8 << 20


PUBLIC_FILES = ("ca.pem", "identities.json", "revoked.json")


def actor_keys(certs: Path, cids: list[int], n: int) -> dict[str, bytes]:
    """What an actor holding clients ``cids`` is given of the provisioned folder ``certs`` (file name ->
    bytes): the public material (CA certificate, identities, revocations, the server's and every
    client's ledger verify key) and its own clients' ledger signing keys. Never another client's
    signing key, any TLS key (actors speak no TLS), the server's keys or ``ca.key``."""
    names = [n for n in PUBLIC_FILES if (Path(certs) / n).is_file()]
    names += [f"{p}.sign.pub" for p in [SERVER] + [client_name(c) for c in range(n)]]
    names += [f"{client_name(c)}.sign.key" for c in cids]
    try:
        return {name: (Path(certs) / name).read_bytes() for name in names}
    except FileNotFoundError as exc:
        raise UserError(f"deploy.certs: missing file {exc.filename}") from None


def _unpack_keys(keys: dict[str, bytes]) -> Path:
    """An actor's key material in a folder of its own (mode 0700, keys 0600), standing for deploy.certs."""
    folder = Path(tempfile.mkdtemp(prefix="fedsecmem-actor-keys-"))
    for name, data in keys.items():
        if Path(name).name != name or name.startswith("."):
            raise ValueError(f"bad key file name {name!r}")
        fd = os.open(folder / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return folder


def _actor_class(ray):
    @ray.remote
    class ClientActor:
        """One client or several (``execution.clients_per_actor``), each apart: its own
        ``ClientSession`` (data, embeddings, generator, bank, budget, ledger). ``keys``: its clients'
        signing keys and the public material only (``actor_keys``), in a folder of its own; the
        signing keys are off the disk once the sessions hold them."""

        def __init__(self, cfg_json: str, cids: list[int], folder: str, threads: int, keys: dict[str, bytes]):
            import torch

            from fedsecmem.deployment.join import ClientSession

            torch.set_num_threads(threads)  # Ray gives workers 1 thread; the same math as the driver's
            cfg = config_from_dict(json.loads(cfg_json))
            self.keys = _unpack_keys(keys)
            try:
                cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"certs": self.keys})})
                self.sessions = {c: ClientSession(cfg, c, Path(folder)) for c in cids}
            finally:
                for c in cids:
                    (self.keys / f"{client_name(c)}.sign.key").unlink(missing_ok=True)
            self.replies: dict[int, bytes] = {}  # each client's last reply, until the server's verdict on it

        def _taken(self, cid: int, verdict: tuple[bool, str] | None) -> None:
            """How the server took ``cid``'s last reply (accepted, reason): into its ledger."""
            reply = self.replies.pop(cid, None)
            if verdict is not None and reply is not None:
                self.sessions[cid].pushed(reply, *verdict)

        def answer(self, tasks: dict[int, tuple[bytes, tuple[bool, str] | None]]) -> dict[int, bytes | str]:
            """Each addressed client's reply to its task (one call per exchange for all the clients
            this process holds). With each task comes the server's verdict on that client's last reply
            (recorded in its ledger first). A client that fails gets its error's first line instead of
            a reply: for the server, a dropout."""
            out: dict[int, bytes | str] = {}
            for cid, (data, verdict) in tasks.items():
                try:
                    self._taken(cid, verdict)
                    out[cid] = self.replies[cid] = self.sessions[cid].answer(data)
                except Exception as exc:  # noqa: BLE001 - this client drops out; its neighbours go on
                    out[cid] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            return out

        def close(self, cid: int, verdict: tuple[bool, str] | None = None) -> bool:
            self._taken(cid, verdict)
            session = self.sessions.pop(cid)
            session.close("completed" if session.finished else "failed: the run ended without it")
            if not self.sessions:  # the public key material too, once no client here needs it
                shutil.rmtree(self.keys, ignore_errors=True)
            return session.finished

    return ClientActor


class RayTransport:
    """Carries a ``Coordinator``'s tasks to client actors and their replies back (``actors``: client ->
    the actor that holds it): one pump thread per actor, one actor call per exchange."""

    def __init__(self, ray, coord: Coordinator, actors: dict[int, object]):
        self.ray, self.coord, self.actors = ray, coord, actors
        self.stopping = threading.Event()
        self.dead: set[int] = set()  # clients whose actor process died (nothing left to close)
        self.failed: set[int] = set()  # clients whose session failed in a live actor
        self.last: dict[int, tuple[bool, str]] = {}  # how the server took each client's last reply
        held: dict[int, list[int]] = {}  # actor (by id) -> the clients it holds
        for c in sorted(actors):
            held.setdefault(id(actors[c]), []).append(c)
        self.threads = [threading.Thread(target=self._pump, args=(cids,), name=f"ray-actor-{cids[0]}", daemon=True)
                        for cids in held.values()]
        for t in self.threads:
            t.start()

    def _pump(self, cids: list[int]) -> None:
        actor = self.actors[cids[0]]
        done = {c: (0, 0) for c in cids}  # each live client's last (round, step) answered
        while done and not self.stopping.is_set():
            tasks = self.coord.next_tasks(done, wait=POLL_S, record=False)
            if not tasks:
                if self.coord.closed:
                    return
                continue
            try:
                call = actor.answer.remote({c: (d, self.last.pop(c, None)) for c, d in tasks.items()})
                self.coord.record_sent(tasks)  # while the actor works
                replies = self.ray.get(call)
            except Exception as exc:  # RayActorError: the process died, with every client it held
                log.warning("clients %s dropped out: %s", sorted(done), str(exc).splitlines()[0][:300])
                self.dead.update(done)
                return
            self._take(cids, tasks, replies, done)
            for c, task in tasks.items():  # asked once per exchange, whatever came back (as over gRPC)
                if c in done:
                    env = parse_envelope(task)
                    done[c] = (env.round, env.step)

    def _take(self, cids: list[int], tasks: dict[int, bytes], replies, done: dict) -> None:
        """An actor's replies through the coordinator's checks, each as from the client it names, which
        must be one this actor holds and was asked now (as a gRPC reply comes from its certificate's
        client): a reply for another client is refused as an identity refusal, never taken."""
        if not isinstance(replies, dict):
            self.coord.refuse("malformed", f"the reply of the actor of clients {cids}: not a reply per client")
            return
        for c, reply in replies.items():
            if type(c) is not int or c not in cids:
                self.coord.refuse("identity", f"a reply for client {str(c)[:40]!r} from the actor of clients "
                                              f"{cids}: not a client it holds")
                continue
            if c not in tasks or c not in done:
                self.coord.refuse("unexpected", f"a reply for client {c}: no task was sent to it now")
                continue
            if isinstance(reply, str):  # the client failed in its actor
                log.warning("client %d dropped out: %s", c, reply[:300])
                self.failed.add(c)
                del done[c]
                continue
            if not isinstance(reply, bytes):
                self.coord.refuse("malformed", f"a reply for client {c}: {type(reply).__name__}, not bytes")
                continue
            ok, reason = self.coord.admit(c, len(reply))
            if ok:
                try:
                    ok, reason = self.coord.handle_push(c, reply)
                finally:
                    self.coord.received(c)
            self.last[c] = (ok, reason)  # recorded by the client with its next task, or at close

    def stop(self, grace: float) -> None:
        """Stop the pumps and close the ledger of every client whose actor is alive (a client that
        failed ends its ledger as failed)."""
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


def actor_groups(n: int, ex: ExecutionConfig, resources: dict[str, float], local: bool = True) -> list[list[int]]:
    """The clients each actor holds: ``clients_per_actor`` apiece, or with ``auto`` as many actors as
    the cluster's CPUs (and GPUs, when each client asks for some) can run at once now, at most one
    per client, the clients dealt in order. ``local``: a Ray started for this run, whose resources
    are all it will ever have."""
    per, actors = ex.clients_per_actor, n
    for name, want in (("cpus", ex.cpus_per_client), ("gpus", ex.gpus_per_client)):
        have = resources.get(name[:-1].upper(), 0.0)
        if local and want > have:  # Ray would wait for them for ever (a cluster may scale up instead)
            raise UserError(f"execution.{name}_per_client: {want:g} asked for each client actor, but the Ray "
                            f"cluster has {have:g} {name[:-1].upper()}s")
        if name == "cpus" or want > 0:  # auto: an actor per CPU (per cpus_per_client CPUs), per GPU share
            actors = min(actors, max(1, int(have // (want or 1.0))))
    if per == "auto":
        per = math.ceil(n / actors)
    return [list(range(i, min(i + per, n))) for i in range(0, n, per)]


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
        # a Ray of our own (no address given, none in RAY_ADDRESS): its settings and resources are ours
        own = started and not ex.address and not os.environ.get("RAY_ADDRESS")
        if started:
            settings = {"num_cpus": ex.local_cpus,
                        "_system_config": {"max_direct_call_object_size": INLINE_BYTES}} if own else {}
            ray.init(address=ex.address or None, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=False, **settings)
        env = {k: v for k, v in os.environ.items() if k == FAULT_ENV}  # fault drills reach the actors
        cls = _actor_class(ray).options(num_cpus=ex.cpus_per_client, num_gpus=ex.gpus_per_client,
                                        scheduling_strategy="SPREAD",  # over the nodes, even at 0 CPUs each
                                        runtime_env={"env_vars": env} if env else None)
        # the actors are not pointed at the driver's key folder: each is given its own keys (below)
        cfg_json = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"certs": None})}).model_dump_json()
        import torch

        threads = ex.threads_per_client or torch.get_num_threads()
        groups = actor_groups(n, ex, ray.cluster_resources(), local=own)
        # each actor its own clients' signing keys and the public material only (passed as bytes: no
        # folder of the driver's is read by an actor, on this node or another)
        handles = [cls.remote(cfg_json, g, str(out.resolve()), threads, actor_keys(cfg.deploy.certs, g, n))
                   for g in groups]
        actors = {c: h for g, h in zip(groups, handles) for c in g}
        try:
            # one call carries every client an actor holds: the per-client deadlines scale with them
            server = Server(cfg, out, False, transport=lambda coord: RayTransport(ray, coord, actors), name="ray",
                            timeout_scale=max(len(g) for g in groups))
            return server.run()
        finally:
            for actor in handles:
                ray.kill(actor)
            if started:
                ray.shutdown()
