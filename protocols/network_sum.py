"""Federated k-means across processes: the server's ``NetworkCollective`` and the client's
``CollectiveMember``, driving the same ``KMeansParty`` requests and SecAgg+ state machines as
the in-process simulator, one coordinator exchange per protocol stage.

For one request the server sends every participant a ``compute`` task (the
request and, for ``secagg``, the client's SecAgg+ setup); the client answers
the request with its party, adds its share of the DP noise when the run is
private, and replies with its vector (``plain``) or its advertised keys
(``secagg``), then follows the SecAgg+ stages. A client that misses a stage's
deadline or is refused is a dropout: SecAgg+ recovers the sum while at least t
remain, and the client takes no further part in this k-means run (its cluster
labels would be out of step). Threat models are those of ``secagg`` and
``dp_release``; the server never holds a point.

A client enforces what it joined (``JoinedTerms``, from its own configuration),
so those threat models hold against a server that deviates from the protocol,
not only an honest one: it refuses a protocol other than its own, a sum over
fewer participants than its threshold and noise count on (or over clients not
in the run), a SecAgg+ threshold below the run's or not a majority of its
share holders, a graph of another degree or with neighbours outside the
participants, and, on the complete graph, unmasking for fewer survivors. Each
refusal happens before anything is computed, charged or sent. Not enforced: a
sparse graph's random draw (a client sees its degree, not how it was drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import time

import numpy as np

from fedsecmem.crypto.fixed_point import FixedPoint
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.coordinator import SMALL_REPLY, Coordinator
from fedsecmem.protocols.dp_release import NoisySum
from fedsecmem.protocols.errors import ProtocolAbort, ProtocolError
from fedsecmem.protocols.kmeans_party import KMeansParty, PrivateCells, Request, broadcast_values
from fedsecmem.protocols.secagg import SecAggClient, SecAggServer
from fedsecmem.protocols.secagg_messages import (
    AdvertiseKeys, EncryptedShares, MaskedInput, NeighbourKeys, Setup, SharesForYou, UnmaskRequest, UnmaskShares,
)
from fedsecmem.protocols.secure_kmeans import AggregateCost, Collective
from fedsecmem.protocols.secure_sum import SecureSum, SumOutcome
from fedsecmem.protocols.wire import (
    SERVER_ID, Body, BodyBuilder, Envelope, WireError, decode_request, decode_secagg, decode_vector,
    encode_request, encode_secagg, encode_vector,
)

# stage tasks (server -> client) and the replies they expect
SECAGG_STAGES = (("compute", "advertise", AdvertiseKeys), ("secagg_keys", "shares", EncryptedShares),
                 ("secagg_relay", "masked", MaskedInput), ("secagg_unmask", "unmask", UnmaskShares))
_TASK_TYPES = {"secagg_keys": NeighbourKeys, "secagg_relay": SharesForYou, "secagg_unmask": UnmaskRequest}


def reply_bound(length: int) -> int:
    """Bytes a client's reply in a k-means sum of ``length`` values may declare: the vector at 8 bytes
    a value (float64, or a Z_(2^64) masked input) plus room for the envelope and the SecAgg+ keys
    and shares."""
    return 8 * length + SMALL_REPLY


class NetworkCollective(Collective):
    """The participants of one k-means run on points called ``name`` (``patches`` or ``images``),
    summing through ``secure_sum``'s protocol (its settings: SecAgg+ graph, threshold, fixed point)."""

    def __init__(self, coord: Coordinator, name: str, participants: set[int], dim: int, n_points: int,
                 secure_sum: SecureSum, timeout: float, noisy: NoisySum | None = None):
        if secure_sum.name not in ("plain", "secagg"):
            raise ValueError(f"network k-means: protocol {secure_sum.name!r} is not available over the network")
        self.coord, self.name = coord, name
        self.participants = set(participants)
        self.clients = tuple(sorted(participants))
        self.dim, self.n_points = dim, n_points
        self.ss, self.protocol, self.timeout, self.noisy = secure_sum, secure_sum.name, timeout, noisy
        self.cost = AggregateCost()
        self.cheaters: dict[int, str] = {}  # clients caught forging shares: left out of the later sums

    def _task(self, request: Request, extra: pb.Payload | None = None) -> pb.Payload:
        b = BodyBuilder().text("collective", self.name).text("protocol", self.protocol)
        b.int("parties", len(self.participants))
        b.tensor("participants", np.array(sorted(self.participants), dtype=np.int64))
        encode_request(request, b)
        payload = b.build()
        if extra is not None:
            payload.MergeFrom(extra)
        return payload

    def total(self, request: Request) -> np.ndarray:
        length = request.length(self.dim)
        need = max(self.noisy.need if self.noisy is not None else 1,
                   (self.ss.threshold or 1) if self.protocol == "secagg" else 1)
        if len(self.participants) < need:
            raise ProtocolAbort(f"{self.name}: only {len(self.participants)} participants, {need} needed")
        if broadcast_values(request):
            self.cost.broadcast(self.participants, broadcast_values(request))
        if self.noisy is not None:  # charged before any client is asked for its data (write-ahead)
            self.noisy.charge(self.participants)
        out = self._plain(request, length, need) if self.protocol == "plain" else self._secagg(request, length, need)
        if self.noisy is not None:
            out = self.noisy.finish(out)
        self.cost.add(out)
        return out.total

    def _plain(self, request: Request, length: int, need: int) -> SumOutcome:
        bodies = {c: self._task(request) for c in sorted(self.participants)}
        replies = self.coord.exchange("compute", bodies, "vector",
                                      lambda c, env: decode_vector(env.body, length), self.timeout,
                                      max_reply=reply_bound(length))
        alive = set(replies)
        self.participants = alive
        if len(alive) < need:
            raise ProtocolAbort(f"plain: only {len(alive)} inputs, at least {need} needed")
        t = time.perf_counter()
        total = np.sum([replies[c] for c in sorted(alive)], axis=0)
        return SumOutcome(total, tuple(sorted(alive)), {c: length * 8 for c in alive}, {c: 0 for c in alive},
                          server_seconds=time.perf_counter() - t)

    def _secagg(self, request: Request, length: int, need: int) -> SumOutcome:
        clients = sorted(self.participants)
        server = SecAggServer(self.ss.params(clients, length), need)
        fp = self.ss.fixed_point(len(clients))
        up = {c: 0 for c in clients}
        down = {c: 0 for c in clients}
        seconds = 0.0

        def accept(kind):
            def fn(cid: int, env: Envelope):
                msg = decode_secagg(kind, env.body, cid, SERVER_ID, length)
                server.receive(msg)
                up[cid] += msg.nbytes
                return msg
            return fn

        outgoing = server.setups()
        for task_kind, reply_kind, reply_type in SECAGG_STAGES:
            bodies = {}
            for c, msg in outgoing.items():
                down[c] += msg.nbytes
                bodies[c] = self._task(request, encode_secagg(msg)) if task_kind == "compute" else encode_secagg(msg)
            replies = self.coord.exchange(task_kind, bodies, reply_kind, accept(reply_type), self.timeout,
                                          max_reply=reply_bound(length))
            t = time.perf_counter()
            outgoing = server.close_stage()
            seconds += time.perf_counter() - t
            if task_kind == "secagg_unmask":
                self.participants = set(replies)
        total = fp.decode(outgoing)
        if server.cheaters:  # the sum is exact without them; they take no further part
            self.cheaters.update(server.cheaters)
            self.participants -= set(server.cheaters)
        return SumOutcome(total, tuple(sorted(server.masked)), up, down, server_seconds=seconds)


@dataclass(frozen=True)
class JoinedTerms:
    """What a client joined, from its own configuration: the protocol, the run's clients, the least
    SecAgg+ threshold, the graph degree and the survivors its noise share was calibrated for. A
    client checks every task against them and refuses one that would weaken them, whatever the
    server says (a server that sends ``plain``, threshold 1 or an empty neighbour list gets a
    refusal, not an input)."""

    protocol: str  # "plain" | "secagg"
    clients: int  # n of the run
    threshold: int = 1  # the run's SecAgg+ threshold t (an instance may not have less)
    neighbours: int | None = None  # k of the SecAgg+ graph (None: complete)
    min_survivors: int = 1  # contributions the client's noise share counts on (1: no DP or not distributed)

    def least_parties(self) -> int:
        """Fewest participants a sum may have: t for SecAgg+, and the survivors the noise counts on."""
        return max(self.min_survivors, self.threshold if self.protocol == "secagg" else 1)

    def check_parties(self, cid: int, parties: int, participants: tuple[int, ...]) -> None:
        """The participant list a task names: this client among them, the run's clients only, as
        many as it says, and not fewer than the sum may have."""
        if len(set(participants)) != len(participants) or parties != len(participants):
            raise ProtocolError(f"compute: {parties} parties but {len(participants)} participants named")
        if cid not in participants or any(not 0 <= c < self.clients for c in participants):
            raise ProtocolError(f"compute: the participants {list(participants)[:16]} are not among this run's "
                                f"{self.clients} clients with client {cid}")
        if parties < self.least_parties():
            raise ProtocolError(f"compute: a sum over {parties} clients; this client joined sums of at least "
                                f"{self.least_parties()} (SecAgg+ threshold {self.threshold}, noise counted on "
                                f"{self.min_survivors} survivors); refused")

    def check_setup(self, cid: int, setup: Setup, participants: tuple[int, ...]) -> None:
        """The SecAgg+ instance the server set up: the joined threshold (and a majority of each
        neighbourhood), the joined graph degree over the participants, neighbours among them."""
        n = len(participants)
        k = n - 1 if self.neighbours is None else min(self.neighbours, n - 1)
        nb = setup.neighbours
        if setup.clients != n:
            raise ProtocolError(f"secagg setup: an instance of {setup.clients} clients for {n} participants; refused")
        if len(set(nb)) != len(nb) or cid in nb or not set(nb) <= set(participants) or len(nb) != k:
            raise ProtocolError(f"secagg setup: {len(nb)} neighbours {list(nb)[:16]}; this client joined a graph of "
                                f"degree {k} among the {n} participants; refused")
        if setup.threshold < self.threshold or not (k + 1) / 2 < setup.threshold <= k + 1:
            raise ProtocolError(f"secagg setup: threshold {setup.threshold}; this client joined threshold "
                                f"{self.threshold} (a majority of its {k + 1} share holders); refused")

    def check_unmask(self, cid: int, setup: Setup, survivors: tuple[int, ...]) -> None:
        """On the complete graph a client sees every survivor: refuse to unmask a sum of fewer than
        its noise counts on (on a sparse graph it sees only its neighbourhood; SecAgg+ checks t there)."""
        if not setup.sparse and len(set(survivors)) < self.least_parties():
            raise ProtocolError(f"secagg unmask: only {len(set(survivors))} survivors; this client's noise share "
                                f"counts on {self.min_survivors} and the threshold is {self.threshold}; refused")


class CollectiveMember:
    """A client's side of the network k-means runs of one round: its parties (by name), its noise,
    and the SecAgg+ instance in progress. ``handle`` answers one task with (reply kind, body)."""

    def __init__(self, cid: int, frac_bits: int, rounding: str, max_length: int, clip: dict[str, float] | None = None,
                 signer: Ed25519PrivateKey | None = None, verify_keys: Mapping[int, Ed25519PublicKey] | None = None,
                 terms: JoinedTerms | None = None):
        """``signer``/``verify_keys``: this client's provisioned Ed25519 key and every client's public one
        (SecAgg+ key advertisements are signed and checked). ``terms``: what it joined (its own
        configuration; every task is checked against them)."""
        self.cid, self.frac_bits, self.rounding, self.max_length = cid, frac_bits, rounding, max_length
        self.signer, self.verify_keys = signer, verify_keys
        self.terms = terms
        self.clip = clip or {}
        self.on_release: Callable[[str], None] | None = None  # before each private answer (its accountant; may refuse)
        self.parties: dict[str, KMeansParty] = {}
        self.noisy: NoisySum | None = None
        self._secagg: SecAggClient | None = None
        self._encoded: np.ndarray | None = None

    def reset(self, parties: dict[str, KMeansParty], noisy: NoisySum | None) -> None:
        self.parties, self.noisy = parties, noisy
        self._secagg = None

    def handle(self, env: Envelope) -> tuple[str, pb.Payload]:
        if env.kind == "compute":
            return self._compute(env.body)
        if env.kind not in _TASK_TYPES:
            raise ProtocolError(f"unknown task {env.kind[:32]!r}")
        if self._secagg is None:
            raise ProtocolError(f"{env.kind} task without a SecAgg+ instance in progress")
        msg = decode_secagg(_TASK_TYPES[env.kind], env.body, SERVER_ID, self.cid, self.max_length)
        if env.kind == "secagg_keys":
            return "shares", encode_secagg(self._secagg.share_keys(msg))
        if env.kind == "secagg_relay":
            return "masked", encode_secagg(self._secagg.mask(msg, self._encoded))
        if self.terms is not None:
            self.terms.check_unmask(self.cid, self._secagg.setup, msg.survivors)
        out = self._secagg.unmask(msg)
        self._secagg = self._encoded = None
        return "unmask", encode_secagg(out)

    def _compute(self, payload: pb.Payload) -> tuple[str, pb.Payload]:
        body = Body(payload, "compute")
        name = body.text("collective", 32)
        if name not in self.parties:
            raise WireError(f"compute: no points called {name!r} this round")
        party = self.parties[name]
        protocol = body.text("protocol", 16)
        parties = body.int("parties", 1)
        if self.terms is not None:  # before anything is computed, charged or sent
            if protocol != self.terms.protocol:
                raise ProtocolError(f"compute: protocol {protocol[:16]!r} asked; this client joined "
                                    f"{self.terms.protocol!r}; refused")
            self.terms.check_parties(self.cid, parties, body.ids("participants", self.terms.clients))
        request = decode_request(payload, party.dim, self.max_length)
        if isinstance(request, PrivateCells):
            if self.noisy is None:
                raise ProtocolError("compute: a private release asked of a run without DP")
            if request.clip != self.clip.get(name):  # the client's privacy rests on its own clip
                raise ProtocolError(f"compute: clip {request.clip} differs from this client's "
                                    f"{self.clip.get(name)}")
        elif self.noisy is not None:
            raise ProtocolError(f"compute: a non-private request {request.op!r} in a private run")
        if protocol not in ("plain", "secagg"):
            raise WireError(f"compute: unknown protocol {protocol[:16]!r}")
        setup: Setup | None = None
        if protocol == "secagg":
            setup = decode_secagg(Setup, payload, SERVER_ID, self.cid, self.max_length)
            if setup.length != request.length(party.dim):
                raise ProtocolError(f"compute: setup length {setup.length} but the answer has "
                                    f"{request.length(party.dim)} values")
            if self.terms is not None:
                self.terms.check_setup(self.cid, setup, body.ids("participants", self.terms.clients))
        if self.noisy is not None and self.on_release is not None:
            self.on_release(name)  # charged by the client's own accountant (or refused) before anything is computed
        vector = party.answer(request)
        if self.noisy is not None:
            vector = self.noisy.client_noise(vector)
        if setup is None:
            return "vector", encode_vector(vector)
        if setup.length != len(vector):
            raise ProtocolError(f"compute: setup length {setup.length} but the answer has {len(vector)} values")
        self._encoded = FixedPoint(setup.bits, self.frac_bits, parties).encode(vector, self.rounding)
        self._secagg = SecAggClient(self.cid, setup, self.signer, self.verify_keys)
        return "advertise", encode_secagg(self._secagg.advertise())
