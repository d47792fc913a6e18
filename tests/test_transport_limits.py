"""The gRPC server's limits against one authenticated client that stalls it: streams that never send (or
stop sending) chunks are cut at a per-chunk deadline, one client holds at most one pull and one push at a
time, and a client reads a task only up to its size limit (checked while streaming)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from fedsecmem.crypto.pki import provision, tls_material
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols import federation_pb2_grpc as pb_grpc
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.grpc_transport import ServerConnection, TransportError, start_server
from fedsecmem.protocols.wire import BodyBuilder, encode_vector
from test_deploy import _port

N = 3  # clients; the server's pool has 2n + 8 workers, as `fedsecmem serve` gives it
CHUNK_S = 0.5  # the server's per-chunk deadline in these tests (60 s by default)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("limits-pki")
    provision(d, N)
    return d


def _channel(address, certs, party):
    tls = tls_material(certs, party)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert))


class _Held:
    """A request stream that sends ``first`` chunks and then nothing until released."""

    def __init__(self, first=()):
        self.first, self.release = list(first), threading.Event()

    def __iter__(self):
        yield from self.first
        self.release.wait()


def test_stalled_push_streams_of_one_client_neither_starve_another_clients_pull_nor_stay_open(certs):
    coord = Coordinator("r", set(range(N)))
    address = f"127.0.0.1:{_port()}"
    server = start_server(coord, address, tls_material(certs, "server"), 0.5, 64 << 20, 2 * N + 8,
                          chunk_timeout_s=CHUNK_S)
    channels = []
    held = [_Held() for _ in range(2 * N + 8)]  # client 0: as many silent pushes as the server has workers
    # client 2, admitted mid-exchange: its first chunk declares 100 bytes, then the stream goes silent
    midway = _Held([pb.Chunk(total_size=100, data=b"x" * 10)])
    got = {}
    coord.begin_round(1)
    exchange = threading.Thread(target=lambda: got.update(coord.exchange(
        "ping", {1: BodyBuilder().build(), 2: BodyBuilder().build()}, "pong", lambda c, env: c, timeout=2.5)))
    exchange.start()
    try:
        mallory = pb_grpc.FederationStub(ch := _channel(address, certs, "client-0"))
        channels.append(ch)
        stalled = [mallory.Push.future(iter(h), timeout=30) for h in held]
        late = pb_grpc.FederationStub(ch := _channel(address, certs, "client-2"))
        channels.append(ch)
        cut = late.Push.future(iter(midway), timeout=30)
        time.sleep(0.3)  # the stalled streams are open (or refused) before the honest client pulls
        honest = pb_grpc.FederationStub(ch := _channel(address, certs, "client-1"))
        channels.append(ch)
        t = time.monotonic()
        task = list(honest.Pull(pb.PullRequest(round=0, step=0), timeout=3))  # DEADLINE_EXCEEDED if starved
        waited = time.monotonic() - t
        assert task and task[0].total_size > 0 and waited < 1.5, waited
        codes = []
        for f in [*stalled, cut]:  # every stalled stream ends soon, refused or cut at its chunk deadline
            try:
                f.result(timeout=CHUNK_S + 3)
                codes.append("OK")
            except grpc.FutureTimeoutError:
                codes.append("still open")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes.count("RESOURCE_EXHAUSTED") == len(held) - 1, codes  # one push per client at a time
        assert codes.count("CANCELLED") == 2, codes  # client 0's one admitted silent stream, and client 2's
        until = time.monotonic() + 2  # the handlers count a cut stream just after the client sees it end
        while coord.rejected["stalled"] < 2 and time.monotonic() < until:
            time.sleep(0.02)
        assert coord.rejected["concurrent"] == len(held) - 1 and coord.rejected["stalled"] == 2, coord.rejected
        assert coord.inflight == {}  # client 2's broken-off reply no longer blocks its next one
    finally:
        for h in [*held, midway]:
            h.release.set()
        coord.close()
        exchange.join(10)
        for ch in channels:
            ch.close()
        server.stop(0)


class _Flood:
    """A server that answers a pull with ``chunks`` 64 KiB chunks declaring ``declared`` bytes (counted)."""

    def __init__(self, declared: int, chunks: int):
        self.declared, self.chunks, self.sent = declared, chunks, 0

    def Pull(self, request, context):
        for _ in range(self.chunks):
            self.sent += 1
            yield pb.Chunk(total_size=self.declared, data=b"\0" * (64 << 10))

    def Push(self, request_iterator, context):
        return pb.PushReply(accepted=True)


@pytest.mark.parametrize("declared", [1 << 40, 64 << 10])  # a huge size declared, or a small one overrun
def test_a_client_refuses_an_oversized_task_while_it_streams_not_after_buffering_it(certs, declared):
    flood = _Flood(declared, 400)  # 25 MiB on offer; the client takes tasks up to 1 MiB
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FederationServicer_to_server(flood, server)
    tls = tls_material(certs, "server")
    address = f"127.0.0.1:{_port()}"
    server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.cert)], tls.ca, True))
    server.start()
    conn = ServerConnection(address, tls_material(certs, "client-0"), 1 << 20, 0.5, 1.0)
    try:
        with pytest.raises(TransportError, match="bad task"):
            conn.pull(0, 0)
        time.sleep(0.2)
        assert flood.sent < 100, flood.sent  # it stopped reading (and cancelled) once over its limit
    finally:
        conn.close()
        server.stop(0)


def test_an_honest_push_and_pull_pass_and_a_refused_second_pull_is_retried(certs):
    """The limits leave an honest client alone: a pull while its previous pull is still held (a reconnect)
    is refused with RESOURCE_EXHAUSTED and retried, not a failure."""
    coord = Coordinator("r", set(range(N)))
    address = f"127.0.0.1:{_port()}"
    server = start_server(coord, address, tls_material(certs, "server"), 1.0, 64 << 20, 2 * N + 8,
                          chunk_timeout_s=CHUNK_S)
    conn = ServerConnection(address, tls_material(certs, "client-0"), 64 << 20, 1.0, 10.0)
    got, pulled = {}, []
    try:
        first = threading.Thread(target=lambda: pulled.append(conn.pull(0, 0)))  # held for the poll time
        first.start()
        time.sleep(0.2)
        second = threading.Thread(target=lambda: pulled.append(conn.pull(0, 0)))  # refused while held, retried
        second.start()
        deadline = time.monotonic() + 5
        while coord.rejected["concurrent"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coord.rejected["concurrent"] >= 1
        coord.begin_round(1)
        t = threading.Thread(target=lambda: got.update(coord.exchange(
            "compute", {0: encode_vector(np.zeros(1))}, "vector", lambda c, env: env.kind, timeout=8)))
        t.start()
        first.join(10)
        second.join(10)
        from fedsecmem.protocols.wire import Envelope, parse_envelope

        env = parse_envelope(next(p for p in pulled if p))  # the retried pull is no failure
        assert conn.push(Envelope("r", 0, env.round, env.step, "vector", BodyBuilder().build()).to_bytes()) == (
            True, "accepted")
        t.join(10)
        assert got == {0: "vector"}
    finally:
        coord.close()
        conn.close()
        server.stop(0)
