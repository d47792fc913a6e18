"""Deployment over gRPC with mutual TLS on loopback, side by side with the in-process simulator.

1. One FedDyMem aggregation round (federated k-means of the global patch memory, k = 512,
   D = 152, SecAgg+) with 3 and 10 client *processes*, against the same k-means with the same
   points driven in process: round seconds and their ratio.
2. Bytes on the wire per client per round (serialized envelopes) against the protocol payload.
3. Throughput of one 256 MB message each way through the chunked stream.

Usage: python bench/bench_deploy.py   (client processes are this script with --client)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fedsecmem.crypto.pki import provision, tls_material
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.grpc_transport import ServerConnection, start_server
from fedsecmem.protocols.kmeans_party import KMeansParty
from fedsecmem.protocols.network_sum import CollectiveMember, NetworkCollective
from fedsecmem.protocols.secure_kmeans import LocalCollective, kmeans_over
from fedsecmem.protocols.secure_sum import SecAggSum
from fedsecmem.protocols.wire import BodyBuilder, Envelope, parse_envelope

sys.path.insert(0, str(Path(__file__).parent))
from markdown import write_section  # noqa: E402

DIM, K, ITERS, POINTS = 152, 512, 20, 3000  # per client: ~ a quickstart client's reduced memory
SECAGG = SecAggSum(bits=64, frac_bits=24)  # complete graph, default threshold, nearest rounding
BIG_MB = 256


def _points(cid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + cid)
    centres = rng.normal(0, 3, (40, DIM))
    x = centres[rng.integers(0, 40, POINTS)] + rng.normal(0, 1, (POINTS, DIM))
    return x, rng.uniform(0.05, 1.0, POINTS)


def client_main(cid: int, address: str, certs: str) -> None:
    conn = ServerConnection(address, tls_material(Path(certs), f"client-{cid}"), 1 << 30, 2.0, 60)
    member = CollectiveMember(cid, SECAGG.frac_bits, SECAGG.rounding, 1 << 28)
    member.reset({"patches": KMeansParty(*_points(cid))}, None)
    done = (0, 0)
    while True:
        data = conn.pull(*done)
        if data is None:
            continue
        env = parse_envelope(data)
        if env.kind == "finish":
            conn.push(Envelope(env.run_id, cid, env.round, env.step, "bye", BodyBuilder().build()).to_bytes())
            return
        kind, body = member.handle(env)
        conn.push(Envelope(env.run_id, cid, env.round, env.step, kind, body).to_bytes())
        done = (env.round, env.step)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_row(n: int, certs: Path) -> tuple[str, str]:
    parts = {c: _points(c) for c in range(n)}
    t = time.perf_counter()
    local = kmeans_over(LocalCollective(parts, SECAGG), K, ITERS)
    local_s = time.perf_counter() - t

    coord = Coordinator("bench", set(range(n)))
    address = f"127.0.0.1:{_port()}"
    server = start_server(coord, address, tls_material(certs, "server"), 2.0, 1 << 30, 2 * n + 8)
    procs = [subprocess.Popen([sys.executable, __file__, "--client", str(c), address, str(certs)]) for c in range(n)]
    try:
        coord.begin_round(1)
        # wait until every client process is up and pulling
        while len(coord.last_seen) < n:
            time.sleep(0.1)
        col = NetworkCollective(coord, "patches", set(range(n)), DIM, n * POINTS, SECAGG, 300)
        t = time.perf_counter()
        net = kmeans_over(col, K, ITERS)
        net_s = time.perf_counter() - t
        coord.exchange("finish", {c: BodyBuilder().build() for c in range(n)}, "bye", lambda c, e: True, 30)
    finally:
        coord.close()
        for p in procs:
            p.wait(60)
        server.stop(0)
    assert np.array_equal(net.centres, local.centres), "network and in-process k-means differ"
    payload_up = np.mean([local.cost.bytes_up[c] for c in range(n)])
    payload_down = np.mean([col.cost.bytes_down[c] for c in range(n)])
    wire_up = np.mean([coord.wire_up[c] for c in range(n)])
    wire_down = np.mean([coord.wire_down[c] for c in range(n)])
    sums = local.cost.sums
    timing = (f"| {n} | {sums} | {local_s:.1f} | {net_s:.1f} | {net_s / local_s:.2f}x | "
              f"{(net_s - local_s) / (4 * sums) * 1e3:.1f} |")
    size = (f"| {n} | {payload_up / 1e6:.2f} | {wire_up / 1e6:.2f} | {wire_up / payload_up:.3f} | "
            f"{payload_down / 1e6:.2f} | {wire_down / 1e6:.2f} |")
    return timing, size


def throughput(certs: Path) -> str:
    coord = Coordinator("bench", {0})
    address = f"127.0.0.1:{_port()}"
    server = start_server(coord, address, tls_material(certs, "server"), 2.0, 1 << 30, 8)
    values = (BIG_MB << 20) // 4
    big = np.random.default_rng(0).normal(size=values).astype(np.float32)
    body = BodyBuilder().tensor("blob", big).build()
    got = {}
    coord.begin_round(1)
    t = threading.Thread(target=lambda: got.update(coord.exchange(
        "big", {0: body}, "big", lambda c, env: len(env.body.tensors["blob"].data), 600)))
    t.start()
    conn = ServerConnection(address, tls_material(certs, "client-0"), 1 << 30, 2.0, 60)
    try:
        t0 = time.perf_counter()
        task = conn.pull(0, 0)
        down_s = time.perf_counter() - t0
        reply = Envelope("bench", 0, 1, 1, "big", body).to_bytes()
        t0 = time.perf_counter()
        ok, why = conn.push(reply)
        up_s = time.perf_counter() - t0
        t.join(60)
        assert ok and got[0] == big.nbytes, why
    finally:
        coord.close()
        server.stop(0)
    mb = len(task) / 1e6
    return (f"| server -> client (pull) | {mb:.0f} | {down_s:.2f} | {mb / down_s:.0f} |\n"
            f"| client -> server (push) | {len(reply) / 1e6:.0f} | {up_s:.2f} | {len(reply) / 1e6 / up_s:.0f} |\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        provision(certs, 10)
        rows = [round_row(n, certs) for n in (3, 10)]
        tp = throughput(certs)
    body = f"""One aggregation round of the global patch memory (federated k-means, k = {K}, D = {DIM},
{POINTS} weighted points per client, SecAgg+ with the complete graph, at most {ITERS} Lloyd
updates), the clients as separate processes talking gRPC over mutual TLS on 127.0.0.1, against
the same k-means on the same points driven in process (both give identical centres: asserted).
Every secure sum is 4 exchanges (compute + keys, shares, masked input, unmask).

| clients | secure sums | in-process s | gRPC s | ratio | added ms per exchange |
|---:|---:|---:|---:|---:|---:|
""" + "\n".join(r[0] for r in rows) + """

Bytes per client per round: protocol payload (what results.json's `comm` counts, as the
simulator does) against the serialized envelopes on the wire (protobuf framing, message kinds,
k-means requests; TLS record framing is not counted).

| clients | payload up MB | wire up MB | wire / payload | payload down MB | wire down MB |
|---:|---:|---:|---:|---:|---:|
""" + "\n".join(r[1] for r in rows) + f"""

One {BIG_MB} MB message (float32 tensor in an envelope) through the chunked stream, 1 MiB chunks,
mutual TLS, loopback:

| direction | MB | seconds | MB/s |
|---|---:|---:|---:|
""" + tp
    write_section("deploy", "Deployment: gRPC with mutual TLS on loopback", "python bench/bench_deploy.py", body)
    print(body)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", nargs=3, default=None)
    args = ap.parse_args()
    if args.client:
        client_main(int(args.client[0]), args.client[1], args.client[2])
    else:
        main()
