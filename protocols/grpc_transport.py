"""gRPC over mutual TLS: the server side around a ``Coordinator``, and a client connection.

Both sides authenticate with certificates from ``fedsecmem provision`` (one
CA). The server requires a client certificate (TLS refuses any peer whose
chain does not lead to the CA); a peer whose certificate name is not one of
this run's clients, or is revoked, is refused on every call with
PERMISSION_DENIED and a log line. Messages travel as chunk streams
(``wire.chunks``), so their size is bounded by ``max_message_bytes`` only,
not by gRPC's per-message limit. Clients pull tasks (long poll) and push
replies, so they need no open port (hospitals behind firewalls).

Limits against an authenticated client that stalls the server: each client holds at most one pull
and one push at a time (more are refused with RESOURCE_EXHAUSTED, before anything is read); a push
stream must deliver its first chunk, and each next one, within ``chunk_timeout_s`` or it is cut
(CANCELLED, counted as ``stalled``); the server takes at most as many calls at once as it has
workers. So n clients hold at most 2n of the 2n + 8 workers whatever one of them does, and an honest
client's pull is never queued behind another's silent streams. A client reads a task chunk by chunk
and stops (cancelling the stream) as soon as it is over its size limit.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent import futures
from contextlib import contextmanager

import grpc

from fedsecmem.crypto.pki import TlsMaterial, peer_client_id
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols import federation_pb2_grpc as pb_grpc
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.wire import WireError, chunks, join_chunks

log = logging.getLogger("fedsecmem.transport")
CALL_MARGIN_S = 30.0  # a pull's RPC deadline beyond the server's poll time
CHUNK_TIMEOUT_S = 60.0  # a push stream's first chunk, and each next one (1 MiB), must arrive within this
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
           grpc.StatusCode.RESOURCE_EXHAUSTED)  # a client waits and tries again (within reconnect_s)


class TransportError(RuntimeError):
    """The connection to the server is gone for good (refused identity, or unreachable too long)."""


class _Watchdog:
    """Cuts (cancels) an RPC whose request stream makes no progress for ``timeout`` s: a handler blocked
    on a silent client's next chunk then gets an ``RpcError`` and frees its worker."""

    def __init__(self, context, timeout: float):
        self.context, self.timeout = context, timeout
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="grpc-chunk-deadline", daemon=True).start()

    def _watch(self) -> None:
        while not self._done.wait(max(0.0, self.deadline - time.monotonic())):
            if time.monotonic() >= self.deadline:
                self.expired = True
                self.context.cancel()
                return

    def progress(self, stream):
        """``stream``, each chunk restarting the deadline."""
        for item in stream:
            self.deadline = time.monotonic() + self.timeout
            yield item

    def stop(self) -> None:
        self._done.set()


class _Servicer(pb_grpc.FederationServicer):
    def __init__(self, coord: Coordinator, poll_s: float, max_bytes: int, chunk_timeout_s: float = CHUNK_TIMEOUT_S):
        self.coord, self.poll_s, self.max_bytes = coord, poll_s, max_bytes
        self.chunk_timeout_s = chunk_timeout_s
        self._lock = threading.Lock()
        self._active: set[tuple[int, str]] = set()  # (client, "pull" | "push") in flight

    @contextmanager
    def _one_at_a_time(self, cid: int, rpc: str, context):
        """At most one ``rpc`` of client ``cid`` in flight; another is refused with RESOURCE_EXHAUSTED."""
        key = (cid, rpc)
        with self._lock:
            busy = key in self._active
            if not busy:
                self._active.add(key)
        if busy:
            self.coord.refuse("concurrent", f"a second {rpc} of client {cid} in flight ({context.peer()})")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"client {cid}: another {rpc} of this client is "
                                                              "in flight")
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(key)

    def _identity(self, context) -> int:
        names = [n.decode("ascii", "replace") if isinstance(n, bytes) else str(n)
                 for n in context.auth_context().get("x509_common_name", [])]
        cid = peer_client_id(names)
        refused = self.coord.refuse_identity(cid, ",".join(names))
        if refused:
            self.coord.refuse("identity", f"peer {context.peer()}: {refused}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        return cid

    def Pull(self, request, context):
        cid = self._identity(context)
        with self._one_at_a_time(cid, "pull", context):
            data = self.coord.next_task(cid, request.round, request.step, self.poll_s)
            if data is not None:
                yield from chunks(data)

    def Push(self, request_iterator, context):
        cid = self._identity(context)
        with self._one_at_a_time(cid, "push", context):
            watchdog = _Watchdog(context, self.chunk_timeout_s)
            try:
                return self._push(cid, watchdog.progress(request_iterator), watchdog)
            except grpc.RpcError:  # cut at a chunk deadline (the client sees CANCELLED), or the client went away
                if not watchdog.expired:
                    raise
                return self._stalled(cid)
            finally:
                watchdog.stop()

    def _stalled(self, cid: int) -> pb.PushReply:
        self.coord.refuse("stalled", f"cut a push of client {cid}: no chunk within {self.chunk_timeout_s:g} s")
        return pb.PushReply(accepted=False, reason=f"no chunk within {self.chunk_timeout_s:g} s")

    def _push(self, cid: int, stream, watchdog: _Watchdog) -> pb.PushReply:
        first = next(stream, None)
        if first is None:
            if watchdog.expired:  # a cut stream may read as ended
                return self._stalled(cid)
            self.coord.refuse("malformed", f"client {cid}: empty chunk stream")
            return pb.PushReply(accepted=False, reason="empty chunk stream")
        # admitted (expected now, within the open exchange's size, none other in flight) before
        # anything beyond the first chunk is read
        ok, reason = self.coord.admit(cid, min(first.total_size, 1 << 62))
        if not ok:
            log.warning("refused message from client %s: %s", cid, reason)
            return pb.PushReply(accepted=False, reason=reason)
        try:
            data = join_chunks(itertools.chain([first], stream), min(self.max_bytes, first.total_size))
        except WireError as exc:
            if watchdog.expired:
                return self._stalled(cid)
            self.coord.refuse("malformed", f"client {cid}: {exc}")
            return pb.PushReply(accepted=False, reason=str(exc))
        finally:
            self.coord.received(cid)
        ok, reason = self.coord.handle_push(cid, data)
        return pb.PushReply(accepted=ok, reason=reason)


def start_server(coord: Coordinator, address: str, tls: TlsMaterial, poll_s: float, max_bytes: int,
                 workers: int, chunk_timeout_s: float = CHUNK_TIMEOUT_S) -> grpc.Server:
    """Serve ``coord`` on ``address`` (host:port) with mutual TLS; returns the started server. At most
    ``workers`` calls at once (more are refused with RESOURCE_EXHAUSTED, not queued); a push stream is cut
    when a chunk takes longer than ``chunk_timeout_s``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_receive_message_length", 8 << 20),
                                  ("grpc.max_send_message_length", 8 << 20)])
    pb_grpc.add_FederationServicer_to_server(_Servicer(coord, poll_s, max_bytes, chunk_timeout_s), server)
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                        require_client_auth=True)
    if server.add_secure_port(address, creds) == 0:
        raise TransportError(f"cannot listen on {address}")
    server.start()
    return server


class ServerConnection:
    """A client's channel to the server: pull the next task, push a reply, retrying while the
    server is unreachable or busy for up to ``reconnect_s`` (a restarting server), never on a refusal."""

    def __init__(self, address: str, tls: TlsMaterial, max_bytes: int, poll_s: float, reconnect_s: float):
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key,
                                             certificate_chain=tls.cert)
        self.channel = grpc.secure_channel(address, creds, options=[("grpc.max_receive_message_length", 8 << 20),
                                                                    ("grpc.max_send_message_length", 8 << 20)])
        self.stub = pb_grpc.FederationStub(self.channel)
        self.address, self.max_bytes = address, max_bytes
        self.poll_s, self.reconnect_s = poll_s, reconnect_s

    def _retrying(self, call):
        down_since = None
        delay = 0.2
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    raise TransportError(f"server {self.address} refused this client: {exc.details()}") from None
                if code not in RETRIED:
                    raise TransportError(f"server {self.address}: {code.name}: {exc.details()}") from None
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > self.reconnect_s:
                    raise TransportError(f"server {self.address} unreachable for {self.reconnect_s:.0f} s "
                                         f"({exc.details()})") from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def pull(self, after_round: int, after_step: int) -> bytes | None:
        def call():
            stream = self.stub.Pull(pb.PullRequest(round=after_round, step=after_step),
                                    timeout=self.poll_s + CALL_MARGIN_S)
            try:  # the size checked chunk by chunk: a server cannot make this client buffer more than its limit
                first = next(stream, None)
                return None if first is None else join_chunks(itertools.chain([first], stream), self.max_bytes)
            except WireError:
                stream.cancel()
                raise

        try:
            return self._retrying(call)
        except WireError as exc:
            raise TransportError(f"server sent a bad task: {exc}") from None

    def push(self, data: bytes) -> tuple[bool, str]:
        reply = self._retrying(lambda: self.stub.Push(chunks(data), timeout=self.poll_s + CALL_MARGIN_S))
        return reply.accepted, reply.reason

    def close(self) -> None:
        self.channel.close()
