"""The wire and the server's message handler: codecs round-trip, chunk streams are bounded, and every
kind of bad message is refused and counted while the exchange goes on (plus a fuzzer)."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsecmem.crypto import shamir
from fedsecmem.protocols import federation_pb2 as pb
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.errors import ProtocolAbort
from fedsecmem.protocols.kmeans_party import KMeansParty, LloydStats
from fedsecmem.protocols.secagg import SecAggClient, SecAggServer, make_params
from fedsecmem.protocols.secagg_messages import (
    AdvertiseKeys, EncryptedShares, NeighbourKeys, SharesForYou, UnmaskShares,
)
from fedsecmem.protocols.wire import (
    SERVER_ID, BodyBuilder, Envelope, WireError, chunks, decode_request, decode_secagg, encode_request,
    encode_secagg, join_chunks, parse_envelope,
)


def test_chunks_carry_a_payload_far_above_grpc_limit():
    data = np.random.default_rng(0).bytes(9 * 2**20 + 123)
    parts = list(chunks(data))
    assert len(parts) == 10 and all(len(p.data) <= 2**20 for p in parts)
    assert join_chunks(parts, 10 * 2**20) == data


def test_chunk_streams_that_lie_are_refused():
    data = b"x" * 3000
    parts = list(chunks(data, 1000))
    with pytest.raises(WireError, match="over the limit"):
        join_chunks(parts, 2000)
    with pytest.raises(WireError, match="ended at 2000"):
        join_chunks(parts[:2], 10_000)
    bad = parts[:2] + [pb.Chunk(total_size=9999, data=b"y")]
    with pytest.raises(WireError, match="disagree"):
        join_chunks(bad, 10_000)
    with pytest.raises(WireError, match="empty"):
        join_chunks([], 10)


def _secagg_messages():
    params = make_params([0, 1, 2], 5, 32)
    server = SecAggServer(params)
    setups = server.setups()
    clients = {c: SecAggClient(c, setups[c]) for c in params.clients}
    msgs = [setups[0]]
    for c, cl in clients.items():
        m = cl.advertise()
        msgs.append(m)
        server.receive(m)
    keys = server.close_stage()
    msgs.append(keys[0])
    for c, cl in clients.items():
        m = cl.share_keys(keys[c])
        msgs.append(m)
        server.receive(m)
    relay = server.close_stage()
    msgs.append(relay[1])
    for c, cl in clients.items():
        m = cl.mask(relay[c], np.arange(5, dtype=np.uint32))
        msgs.append(m)
        server.receive(m)
    req = server.close_stage()
    msgs.append(req[2])
    msgs.append(clients[2].unmask(req[2]))
    return msgs


def test_every_secagg_message_round_trips():
    for msg in _secagg_messages():
        sender = getattr(msg, "sender", SERVER_ID)
        receiver = getattr(msg, "receiver", SERVER_ID)
        back = decode_secagg(type(msg), encode_secagg(msg), sender, receiver, 100)
        for field in msg.__dataclass_fields__:
            a, b = getattr(msg, field), getattr(back, field)
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), field


def test_decoders_name_the_bad_field():
    adv = AdvertiseKeys(b"s" * 16, 0, b"c" * 32, b"k" * 31)
    with pytest.raises(WireError, match="s_public"):
        decode_secagg(AdvertiseKeys, encode_secagg(adv), 0, SERVER_ID, 10)
    body = BodyBuilder().blob("session", b"s" * 16).build()
    body.tensors["vector"].dtype = "uint32"
    body.tensors["vector"].shape.extend([4])
    body.tensors["vector"].data = b"\0" * 15  # 4 uint32 need 16 bytes
    from fedsecmem.protocols.secagg_messages import MaskedInput
    with pytest.raises(WireError, match="bytes do not hold"):
        decode_secagg(MaskedInput, body, 0, SERVER_ID, 10)


def test_secagg_decoders_refuse_keys_ciphertexts_and_shares_of_the_wrong_length():
    """A share-signing key, a share ciphertext or a returned share (share + its dealer's signature)
    of any other length is refused at decoding, naming the field, before a state machine sees it."""
    msgs = {type(m): m for m in _secagg_messages()}
    adv, keys = msgs[AdvertiseKeys], msgs[NeighbourKeys]
    shares, relay, unmask = msgs[EncryptedShares], msgs[SharesForYou], msgs[UnmaskShares]
    sealed = len(next(iter(shares.ciphertexts.values())))
    signed = shamir.SHARE_BYTES + 64  # a share and its dealer's Ed25519 signature

    def refused(kind, msg, edit, match):
        payload = encode_secagg(msg)
        edit(payload)
        with pytest.raises(WireError, match=match):
            decode_secagg(kind, payload, 0, SERVER_ID, 100)

    def set_item(field, size):
        def edit(p):
            items = p.id_blobs[field].items
            items[next(iter(items)) if items else 0] = b"x" * size
        return edit

    refused(EncryptedShares, shares, set_item("ciphertexts", sealed - 1), "ciphertexts")
    refused(SharesForYou, relay, set_item("ciphertexts", sealed + 1), "ciphertexts")
    refused(UnmaskShares, unmask, set_item("self_mask", signed - 1), "self_mask")
    refused(UnmaskShares, unmask, set_item("keys", signed + 1), "keys")
    assert all(len(b) == signed for b in unmask.self_mask_shares.values())
    refused(UnmaskShares, unmask, set_item("self_mask", shamir.SHARE_BYTES), "self_mask")  # signature stripped
    assert len(adv.share_key) == 32 and set(keys.share_keys) == set(keys.keys)
    refused(AdvertiseKeys, adv, lambda p: p.blobs.__setitem__("share_key", b"k" * 31), "share_key")
    refused(AdvertiseKeys, adv, lambda p: p.blobs.__delitem__("share_key"), "share_key")
    refused(NeighbourKeys, keys, set_item("share_keys", 33), "share_keys")
    refused(NeighbourKeys, keys, lambda p: p.id_blobs["share_keys"].items.__delitem__(next(iter(keys.keys))),
            "name different clients")


def test_requests_round_trip_and_are_checked_against_the_points():
    party = KMeansParty(np.random.default_rng(1).normal(size=(30, 4)), np.ones(30))
    req = LloydStats(np.zeros((3, 4)))
    back = decode_request(encode_request(req, BodyBuilder()).build(), 4, 10_000)
    assert np.array_equal(party.answer(back), party.answer(req))
    wrong = LloydStats(np.zeros((3, 5)))
    with pytest.raises(WireError, match="centres do not fit"):
        decode_request(encode_request(wrong, BodyBuilder()).build(), 4, 10_000)
    with pytest.raises(WireError, match="unknown op"):
        decode_request(BodyBuilder().text("op", "exfiltrate").build(), 4, 10)


def test_every_request_kind_round_trips_to_its_own_type_and_the_same_answer():
    from fedsecmem.protocols.kmeans_party import CellStats, Moments, PartitionStats, Pca, PrivateCells, Split

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 4))
    pca = Pca(x.mean(0), np.linalg.qr(rng.normal(size=(4, 2)))[0])
    split = (Split(0, 1, np.zeros(2), np.array([1.0, 0.0])),)
    kinds = [Moments(), PartitionStats(1, 2, pca), PartitionStats(2, 2, None, split), CellStats(2, None, split),
             LloydStats(x[:3]), PrivateCells(5.0), PrivateCells(5.0, "hyperplanes", 2, 7, mean=x.mean(0)),
             PrivateCells(5.0, "nearest", centres=x[:3])]
    here, there = KMeansParty(x, np.ones(40)), KMeansParty(x, np.ones(40))
    for req in kinds:  # in order: the partition requests build on the PCA of the first
        back = decode_request(encode_request(req, BodyBuilder()).build(), 4, 10_000)
        assert type(back) is type(req)
        assert np.array_equal(there.answer(back), here.answer(req)), req.op
        assert len(here.answer(req)) == req.length(4)


def test_a_private_clients_ready_reply_carries_no_training_loss():
    from fedsecmem.deployment.messages import decode_ready, encode_ready
    from fedsecmem.method.round import Ready

    ready = Ready(40, 6, True, 0.1234)
    for private, expect in ((False, Ready(40, 6, True, 0.1234)), (True, Ready(1, 1, True, None))):
        body = encode_ready(ready, private)
        assert ("loss" in body.floats) is not private
        env = Envelope("r" * 16, 0, 2, 1, "ready", body)
        assert decode_ready(0, env) == expect  # under DP: no loss, and no exact counts either


# ---- the server's handler ------------------------------------------------------------------------

class _Open:
    """A coordinator with one exchange open in a background thread: SecAgg+ advertise of 3 clients."""

    def __init__(self, revoked=()):
        self.coord = Coordinator("run-a", {0, 1, 2, 3}, set(revoked))
        self.coord.begin_round(2)
        self.coord.step = 4  # a few exchanges already happened in this round
        self.params = make_params([0, 1, 2], 8, 32)
        self.server = SecAggServer(self.params)
        setups = self.server.setups()
        self.clients = {c: SecAggClient(c, setups[c]) for c in (0, 1, 2)}
        self.adverts = {c: encode_secagg(cl.advertise()) for c, cl in self.clients.items()}
        self.result = {}

        def accept(cid, env):
            msg = decode_secagg(AdvertiseKeys, env.body, cid, SERVER_ID, 8)
            self.server.receive(msg)
            return msg

        bodies = {c: encode_secagg(setups[c]) for c in (0, 1, 2)}
        self.thread = threading.Thread(target=lambda: self.result.update(
            self.coord.exchange("compute", bodies, "advertise", accept, 60)))
        self.thread.start()
        while self.coord._open is None:
            pass

    def envelope(self, cid, kind="advertise", round_=2, step=5, run="run-a", sender=None, body=None):
        body = body if body is not None else self.adverts[cid]
        return Envelope(run, cid if sender is None else sender, round_, step, kind, body).to_bytes()

    def finish(self):
        for c in (0, 1, 2):
            exchange = self.coord._open  # read once: the exchange's thread may close it meanwhile
            if exchange is None:  # every client replied or withdrew: the exchange has closed
                break
            if c not in exchange.replies:
                ok, why = self.coord.handle_push(c, self.envelope(c))
                assert ok, why
        self.thread.join(10)
        return self.result


def test_each_kind_of_bad_message_is_refused_counted_and_the_exchange_completes():
    o = _Open(revoked={3})
    c = o.coord
    cases = [
        (None, b"anything", "identity"),
        (3, o.envelope(0, sender=3), "identity"),  # revoked
        (0, b"\xff\x00garbage", "malformed"),
        (0, o.envelope(0, sender=1), "identity"),  # claims another client's id
        (0, o.envelope(0, run="run-b"), "stale"),
        (0, o.envelope(0, step=3), "stale"),  # a replay of an earlier step
        (0, o.envelope(0, kind="masked"), "wrong-stage"),
        (0, o.envelope(0, body=BodyBuilder().blob("session", b"x" * 16).build()), "invalid"),
    ]
    for cid, data, category in cases:
        before = c.rejected[category]
        ok, why = c.handle_push(cid, data)
        assert not ok and why and c.rejected[category] == before + 1, (category, why)
    ok, _ = c.handle_push(0, o.envelope(0))
    assert ok
    ok, why = c.handle_push(0, o.envelope(0))  # the same reply again: a replay within the step
    assert not ok and c.rejected["duplicate"] == 1
    result = o.finish()
    assert sorted(result) == [0, 1, 2] and c.rejected["internal"] == 0
    assert o.server.close_stage()  # the state machine took exactly the valid ones and goes on


def test_one_process_takes_the_open_tasks_of_all_its_clients_at_once():
    """``next_tasks``: the open exchange's tasks for every client a process holds that has not
    answered them yet, none for a client already past them, and nothing (after the wait) when no
    exchange is open."""
    o = _Open()
    c = o.coord
    assert c.next_tasks({3: (0, 0)}, wait=0.01) == {}  # client 3 is not addressed
    got = c.next_tasks({0: (0, 0), 1: (2, 4), 2: (2, 5)}, wait=0.01)
    assert sorted(got) == [0, 1] and all(parse_envelope(t).step == 5 for t in got.values())
    assert got[0] == c.next_task(0, 0, 0, wait=0.01)  # the single-client form is the same task
    before = dict(c.wire_down)
    for cid in (0, 1, 2):
        assert c.handle_push(cid, o.envelope(cid))[0]
    o.finish()
    assert c.next_tasks({0: (2, 5), 1: (2, 5)}, wait=0.05) == {} and dict(c.wire_down) == before


def _mutations():
    """Random bytes, and valid envelopes with one field mutated."""
    raw = st.binary(max_size=600)
    fields = st.fixed_dictionaries({
        "run": st.sampled_from(["run-a", "run-b", ""]),
        "round": st.integers(0, 5), "step": st.integers(0, 8),
        "kind": st.sampled_from(["advertise", "masked", "error", "hello", "x" * 70]),
        "sender": st.integers(-3, 5),
        "session": st.binary(min_size=0, max_size=20),
        "c": st.binary(min_size=0, max_size=40), "s": st.binary(min_size=0, max_size=40),
        "extra": st.binary(max_size=50),
    })
    return st.one_of(raw, fields)


def test_fuzz_ten_thousand_messages_never_crash_the_handler():
    o = _Open()
    coord = o.coord
    seen = {"n": 0}
    withdrawn = set()  # an authenticated "error" from a client is that client dropping out: allowed

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_mutations(), st.integers(-1, 4))
    def fuzz(msg, cid):
        if isinstance(msg, bytes):
            data = msg
        else:
            body = BodyBuilder().blob("session", msg["session"]).blob("c_public", msg["c"]) \
                .blob("s_public", msg["s"]).blob("junk", msg["extra"]).build()
            data = Envelope(msg["run"], msg["sender"], msg["round"], msg["step"], msg["kind"], body).to_bytes()
            if msg["extra"][:1] == b"\x01":  # sometimes cut it short
                data = data[: len(data) // 2]
        ok, why = coord.handle_push(cid if cid >= 0 else None, data)
        assert isinstance(ok, bool) and isinstance(why, str)
        if ok:  # nothing random passes as a SecAgg+ message; only a well-formed "error" is taken
            assert why == "noted", why
            withdrawn.add(cid)
        seen["n"] += 1

    fuzz()
    assert seen["n"] >= 10_000
    assert coord.rejected["internal"] == 0
    result = o.finish()  # the real clients still complete the stage
    assert sorted(result) == sorted({0, 1, 2} - withdrawn)
    if len(result) >= o.params.threshold:
        assert o.server.close_stage()  # the state machine goes on with exactly the real messages
    else:
        with pytest.raises(ProtocolAbort):
            o.server.close_stage()


def test_parse_envelope_rejects_out_of_range_sender():
    data = Envelope("r", 2**40, 1, 1, "hello", pb.Payload()).to_bytes()
    with pytest.raises(WireError, match="sender"):
        parse_envelope(data)


def test_committed_generated_code_matches_the_proto(tmp_path):
    """protocols/federation_pb2*.py are what `make proto` makes from protocols/federation.proto."""
    import shutil
    from pathlib import Path

    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[1]
    pkg = tmp_path / "fedsecmem" / "protocols"
    pkg.mkdir(parents=True)
    shutil.copy(root / "protocols" / "federation.proto", pkg)
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", str(pkg / "federation.proto")])
    assert rc == 0
    for name in ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py"):
        assert (pkg / name).read_text() == (root / "protocols" / name).read_text(), f"{name}: run `make proto`"


def test_a_client_refuses_an_unknown_task_instead_of_crashing():
    from fedsecmem.protocols.errors import ProtocolError
    from fedsecmem.protocols.network_sum import CollectiveMember

    member = CollectiveMember(0, 24, "nearest", 1000)
    env = Envelope("r", SERVER_ID, 1, 1, "format_disk", pb.Payload())
    with pytest.raises(ProtocolError, match="unknown task"):
        member.handle(env)
