"""The server's mailbox: one exchange at a time between the orchestration and the clients.

Transport-free (the gRPC servicer calls ``next_task`` and ``handle_push``; tests
and the fuzzer call them directly). The orchestration opens an *exchange*: a
task for each addressed client, the reply kind it expects, a deadline, and an
``accept`` function that decodes a reply and feeds it to the protocol's state
machine. Every incoming message is checked in this order, and refused with a
one-line reason that is logged and counted, never raised: identity known and
not revoked, envelope decodes, sender equals the TLS identity, same run,
(round, step) of the open exchange (an older one is a replay), the client was
addressed and has not replied yet, the expected kind, then ``accept`` (body
decoding and the state machine's own checks). Clients that have not replied
by the deadline are, for the protocol, dropouts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.errors import ProtocolError
from fedsecmem.protocols.wire import SERVER_ID, Body, Envelope, WireError, parse_envelope

log = logging.getLogger("fedsecmem.server")

ERROR_KIND = "error"  # a client saying it cannot go on (its reason is logged); counts as a dropout


@dataclass
class ClientRefusal:
    reason: str


# Sees every message that reaches or leaves the mailbox, over its exact bytes (a ledger records them):
# (direction "sent" | "received", client, round, step, kind, data, fields).
SMALL_REPLY = 1 << 20  # bytes a control reply (hello, ready, scores, an error) may declare
MessageObserver = Callable[[str, int, int, int, str, bytes, dict], None]


@dataclass
class _Exchange:
    round: int
    step: int
    kind: str
    tasks: dict[int, bytes]
    expect: str
    accept: Callable[[int, Envelope], object]
    max_reply: int  # bytes a reply of this exchange may declare (checked before it is buffered)
    replies: dict[int, object] = field(default_factory=dict)


class Coordinator:
    def __init__(self, run_id: str, clients: set[int], revoked: set[int] | frozenset[int] = frozenset(),
                 max_message: int = 1 << 30):
        self.run_id = run_id
        self.max_message = max_message  # no reply may declare more, whatever its exchange allows
        self.inflight: dict[int, int] = {}  # client -> bytes of the reply being received (one at a time)
        self.clients = set(clients)
        self.revoked = set(revoked)
        self.round = 0
        self.step = 0
        self.rejected: Counter[str] = Counter()
        self.last_seen: dict[int, float] = {}
        self.wire_up: Counter[int] = Counter()  # bytes of accepted envelopes from each client
        self.wire_down: Counter[int] = Counter()  # bytes of tasks delivered to each client
        self.closed = False
        self.observer: MessageObserver | None = None
        self._open: _Exchange | None = None
        self._unrecorded: dict[int, tuple[int, int, str, bytes]] = {}  # tasks handed out, not yet recorded
        self._cv = threading.Condition()

    # ---- identity -------------------------------------------------------------------------------

    def refuse_identity(self, cid: int | None, names: str = "") -> str | None:
        """Why a peer may not talk to this server, or None if it may."""
        if cid is None:
            return f"unknown identity {names or '(no client certificate name)'}"
        if cid in self.revoked:
            return f"revoked identity client-{cid}"
        if cid not in self.clients:
            return f"unknown identity client-{cid} (this run has clients 0..{max(self.clients)})"
        return None

    def refuse(self, category: str, reason: str) -> None:
        """A transport's own refusal (a second call in flight, a stalled stream, a reply an actor may
        not give): counted under ``category`` and logged, as the mailbox's own refusals are."""
        with self._cv:
            self._reject(category, reason)

    def _reject(self, category: str, reason: str) -> tuple[bool, str]:
        self.rejected[category] += 1
        log.warning("refused message: %s", reason)
        return False, reason

    # ---- orchestration side ---------------------------------------------------------------------

    def begin_round(self, round_number: int) -> None:
        """Exchanges from now on belong to ``round_number`` (steps count on within a round)."""
        with self._cv:
            if round_number != self.round:
                self.round, self.step = round_number, 0

    def resume_after(self, round_number: int, step: int) -> None:
        """Continue a run whose last task (before a crash) was ``(round_number, step)``: the next
        exchange of that round is ``step + 1``, so clients that saw it take the new tasks as new."""
        with self._cv:
            self.round, self.step = round_number, step

    def exchange(self, kind: str, bodies: dict[int, pb.Payload], expect: str,
                 accept: Callable[[int, Envelope], object], timeout: float,
                 max_reply: int = SMALL_REPLY) -> dict[int, object]:
        """Send ``kind`` tasks and wait (at most ``timeout`` s) for one accepted ``expect`` reply per
        addressed client; returns client -> what ``accept`` returned, for the clients that went on (a
        client that said it cannot, or did not reply in time, is a dropout: absent). A reply may
        declare at most ``max_reply`` bytes (and ``max_message``)."""
        with self._cv:
            self.step += 1
            tasks = {c: Envelope(self.run_id, SERVER_ID, self.round, self.step, kind, b).to_bytes()
                     for c, b in bodies.items()}
            ex = _Exchange(self.round, self.step, kind, tasks, expect, accept, min(max_reply, self.max_message))
            self._open = ex
            self._cv.notify_all()
            deadline = time.monotonic() + timeout
            while len(ex.replies) < len(tasks):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            self._open = None
            missing = sorted(set(tasks) - set(ex.replies))
            if missing:
                log.warning("round %d step %d (%s): no reply from clients %s within %.0f s: dropped",
                            self.round, self.step, kind, missing, timeout)
            return {c: r for c, r in ex.replies.items() if not isinstance(r, ClientRefusal)}

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    # ---- transport side -------------------------------------------------------------------------

    def next_task(self, cid: int, after_round: int, after_step: int, wait: float) -> bytes | None:
        """The open task for ``cid`` newer than what it completed, waiting up to ``wait`` s."""
        return self.next_tasks({cid: (after_round, after_step)}, wait).get(cid)

    def next_tasks(self, done: dict[int, tuple[int, int]], wait: float, record: bool = True) -> dict[int, bytes]:
        """The open exchange's tasks for the clients in ``done`` (client -> the (round, step) it
        completed) that are newer than what each completed, waiting up to ``wait`` s for any; one
        call for all the clients one process holds. ``record=False``: the caller hands the tasks on
        first and then calls ``record_sent`` (the observer's work off the clients' critical path)."""
        deadline = time.monotonic() + wait
        with self._cv:
            now = time.monotonic()
            for cid in done:
                self.last_seen[cid] = now
            while not self.closed:
                ex = self._open
                if ex is not None:
                    out = {cid: ex.tasks[cid] for cid, after in done.items()
                           if cid in ex.tasks and cid not in ex.replies and (ex.round, ex.step) > after}
                    if out:
                        for cid, task in out.items():
                            self.wire_down[cid] += len(task)
                            self._unrecorded[cid] = (ex.round, ex.step, ex.kind, task)
                        if record:
                            self._record_sent(out)
                        return out
                left = deadline - time.monotonic()
                if left <= 0:
                    return {}
                self._cv.wait(left)
            return {}

    def record_sent(self, cids) -> None:
        """Record the tasks ``next_tasks(..., record=False)`` handed out to ``cids``."""
        with self._cv:
            self._record_sent(cids)

    def _record_sent(self, cids) -> None:
        for cid in cids:
            if cid in self._unrecorded:
                rnd, step, kind, task = self._unrecorded.pop(cid)
                self._observe("sent", cid, rnd, step, kind, task, {})

    def admit(self, cid: int | None, declared: int) -> tuple[bool, str]:
        """Before a reply is buffered: is one expected from ``cid`` now, is its declared size within
        what the open exchange allows, and is no other reply of ``cid`` being received? An admitted
        reply must be followed by ``received(cid)``."""
        with self._cv:
            refused = self.refuse_identity(cid)
            if refused:
                return self._reject("identity", refused)
            ex = self._open
            if ex is None or cid not in ex.tasks or cid in ex.replies:
                return self._reject("unexpected", f"client {cid}: no reply expected now")
            if declared > ex.max_reply:
                return self._reject("oversized", f"client {cid}: a {declared}-byte reply to {ex.kind!r}, at most "
                                                 f"{ex.max_reply} bytes expected")
            if cid in self.inflight:
                return self._reject("busy", f"client {cid}: another reply of this client is being received")
            self.inflight[cid] = declared
            return True, ""

    def received(self, cid: int) -> None:
        """The admitted reply of ``cid`` is in (or broke off): its bytes are no longer in flight."""
        with self._cv:
            self.inflight.pop(cid, None)

    def handle_push(self, cid: int | None, data: bytes) -> tuple[bool, str]:
        """Check and take one reply; never raises. Returns (accepted, reason)."""
        with self._cv:
            refused = self.refuse_identity(cid)
            if refused:
                return self._reject("identity", refused)
            self.last_seen[cid] = time.monotonic()
            try:
                env = parse_envelope(data)
            except WireError as exc:
                env = None
                ok, reason = self._reject("malformed", f"client {cid}: {exc}")
            else:
                ok, reason = self._take(cid, env, len(data))
            # from an authenticated client, whatever became of it
            self._observe("received", cid, env.round if env else -1, env.step if env else -1,
                          env.kind if env else "malformed", data, {"accepted": ok, "reason": reason})
            return ok, reason

    def _observe(self, *event) -> None:
        if self.observer is None:
            return
        try:
            self.observer(*event)
        except Exception:  # a failing record must not take the mailbox down; it is logged
            log.exception("recording a message failed")

    def _take(self, cid: int, env: Envelope, size: int) -> tuple[bool, str]:
        """The checks after the envelope decoded (the caller holds the lock)."""
        if env.sender != cid:
            return self._reject("identity", f"client {cid} sent a message signed as client {env.sender}")
        if env.run_id != self.run_id:
            return self._reject("stale", f"client {cid}: message of another run {env.run_id[:16]!r}")
        ex = self._open
        if ex is None or (env.round, env.step) != (ex.round, ex.step):
            now = "no exchange open" if ex is None else f"open is round {ex.round} step {ex.step}"
            return self._reject("stale", f"client {cid}: reply to round {env.round} step {env.step} "
                                         f"({now}): stale or replayed")
        if cid not in ex.tasks:
            return self._reject("unexpected", f"client {cid}: not addressed in round {ex.round} step {ex.step}")
        if cid in ex.replies:
            return self._reject("duplicate", f"client {cid}: second reply to round {ex.round} step {ex.step}")
        if env.kind == ERROR_KIND:
            try:
                reason = Body(env.body, "error").text("reason", 1000)
            except WireError:
                reason = "(no reason given)"
            log.warning("client %d cannot go on in round %d step %d: %s", cid, ex.round, ex.step, reason)
            ex.replies[cid] = ClientRefusal(reason)
            self._cv.notify_all()
            return True, "noted"
        if env.kind != ex.expect:
            return self._reject("wrong-stage", f"client {cid}: {env.kind!r} refused, expecting {ex.expect!r} "
                                               f"in round {ex.round} step {ex.step}")
        try:
            result = ex.accept(cid, env)
        except (WireError, ProtocolError, ValueError) as exc:
            return self._reject("invalid", f"client {cid}: {exc}")
        except Exception as exc:  # a bug must not take the server down; it is counted apart
            log.exception("accepting a %s from client %d failed", env.kind, cid)
            return self._reject("internal", f"client {cid}: internal error {type(exc).__name__}")
        ex.replies[cid] = result
        self.wire_up[cid] += size
        self._cv.notify_all()
        return True, "accepted"
