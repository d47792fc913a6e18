"""SecAgg+ state machines: exact sums with dropouts at every stage, aborts below the threshold,
refused messages, and what the server's view reveals."""

import numpy as np
import pytest
from scipy import stats

from fedsecmem.crypto import prg, shamir
from fedsecmem.crypto.errors import CryptoError
from fedsecmem.protocols import secagg
from fedsecmem.protocols.errors import CheatingDetected, ProtocolAbort, ProtocolError
from fedsecmem.protocols.graph import harary_graph
from fedsecmem.protocols.secure_sum import SecAggSum, drive_secagg


def _run(inputs, bits=32, k=None, t=None, drop=None):
    """Drive one instance; returns (sum, server, clients, transcript)."""
    params = secagg.make_params(sorted(inputs), len(next(iter(inputs.values()))), bits, k, t)
    server = secagg.SecAggServer(params)
    run = drive_secagg(server, inputs, drop)
    return run.total, server, run.clients, run.transcript


def _share(signed: bytes) -> shamir.Share:
    """The Shamir share of a returned share (which its dealer's signature follows)."""
    return shamir.Share.from_bytes(signed[: shamir.SHARE_BYTES])


def _ints(n_clients, length, bits, seed=0):
    rng = np.random.default_rng(seed)
    dtype = prg.ring_dtype(bits)
    return {c: rng.integers(0, np.iinfo(dtype).max, length, dtype=dtype, endpoint=True) for c in range(n_clients)}


@pytest.mark.parametrize("bits", [32, 64])
def test_integer_sum_is_exact_modulo_ring(bits):
    xs = _ints(5, 1000, bits)
    total, *_ = _run(xs, bits)
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=prg.ring_dtype(bits)))


@pytest.mark.parametrize("stage", ["advertise", "share", "mask", "unmask"])
@pytest.mark.parametrize("k", [None, 4])
def test_dropouts_at_each_stage(stage, k):
    xs = _ints(10, 300, 32, seed=1)
    # on the sparse graph (t = 3) two dropouts may be both live neighbours short of some client, which
    # then refuses to unmask (t - 1 colluders could be all it has left): one dropout there
    gone = {3, 7} if k is None else {3}
    total, server, *_ = _run(xs, 32, k=k, drop={stage: gone})
    in_sum = [c for c in xs if stage == "unmask" or c not in gone]
    assert sorted(server.masked) == in_sum
    assert np.array_equal(total, np.sum([xs[c] for c in in_sum], axis=0, dtype=np.uint32))


def test_dropouts_spread_over_stages_up_to_n_minus_t():
    xs = _ints(7, 200, 64, seed=2)  # complete graph, t = 5: two may drop
    total, server, *_ = _run(xs, 64, drop={"share": {1}, "mask": {4}})
    assert sorted(server.masked) == [0, 2, 3, 5, 6]
    assert np.array_equal(total, np.sum([xs[c] for c in (0, 2, 3, 5, 6)], axis=0, dtype=np.uint64))


def test_abort_below_threshold_at_masking_and_unmasking():
    xs = _ints(5, 50, 32)  # t = 3
    with pytest.raises(ProtocolAbort, match="only 2 clients sent masked inputs, at least 3 needed"):
        _run(xs, drop={"mask": {0, 1, 2}})
    # three masked inputs, but two of them vanish before returning shares: 1 reply < t
    with pytest.raises(ProtocolAbort, match="only 1 clients returned shares, at least 3 needed"):
        _run(xs, drop={"mask": {0, 1}, "unmask": {2, 3}})


def test_abort_when_a_neighbourhood_loses_its_shares():
    xs = _ints(10, 50, 32)
    params = secagg.make_params(list(xs), 50, 32, neighbours=2, threshold=2)
    # a dropped client whose two neighbours both vanish before unmasking: only 0 or 1 share of its key
    v = 0
    a, b = params.neighbours[v]
    server = secagg.SecAggServer(params)
    machines = {c: secagg.SecAggClient(c, s) for c, s in server.setups().items()}
    out = {c: None for c in xs}
    drop = {"mask": {v}, "unmask": {a, b}}
    with pytest.raises(ProtocolAbort, match="shares back, threshold 2; round aborted"):
        for stage in ("advertise", "share", "mask", "unmask"):
            for c, m in out.items():
                if c in drop.get(stage, ()):
                    continue
                cl = machines[c]
                server.receive({"advertise": lambda: cl.advertise(), "share": lambda: cl.share_keys(m),
                                "mask": lambda: cl.mask(m, xs[c]), "unmask": lambda: cl.unmask(m)}[stage]())
            out = server.close_stage()


def test_float_sum_within_quantization_bound_with_dropouts():
    rng = np.random.default_rng(3)
    xs = {c: rng.normal(0, 50, 2000) for c in range(6)}
    ss = SecAggSum(bits=64, frac_bits=24)
    out = ss.sum(xs, drop={"mask": {5}})
    want = np.sum([xs[c] for c in range(5)], axis=0)
    assert out.included == (0, 1, 2, 3, 4)
    assert np.abs(out.total - want).max() <= ss.fixed_point(6).sum_error()
    stoch = SecAggSum(bits=32, frac_bits=12, rounding="stochastic").sum(xs)
    assert np.abs(stoch.total - sum(xs.values())).max() <= SecAggSum(32, 12).fixed_point(6).sum_error("stochastic")


def test_masked_vector_is_uniform_whatever_the_input():
    n = 1 << 16
    inputs = {0: np.zeros(n, np.uint32), 1: np.full(n, 7, np.uint32), 2: np.arange(n, dtype=np.uint32)}
    _, _, _, transcript = _run(inputs, 32)
    masked = {m.sender: m.vector for m in transcript if isinstance(m, secagg.MaskedInput)}
    for c, y in masked.items():
        counts = np.bincount(y >> 24, minlength=256)  # top byte: 256 bins of 256 expected each
        assert stats.chisquare(counts).pvalue > 1e-4, c
        assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-4, c
        assert np.mean(y == inputs[c]) < 1e-3
    # the all-zero input's masked vector tells nothing apart from the structured one's
    assert stats.ks_2samp(masked[0] / 2.0**32, masked[2] / 2.0**32).pvalue > 1e-4


def test_server_view_does_not_unmask_a_single_client():
    xs = _ints(5, 4096, 32, seed=4)
    total, server, machines, transcript = _run(xs, 32)
    replies = [m for m in transcript if isinstance(m, secagg.UnmaskShares)]
    # survivors reveal self-mask shares only: the server can strip client 0's self mask ...
    b0 = shamir.combine([_share(r.self_mask_shares[0]) for r in replies], server.params.threshold)
    y0 = server.masked[0].vector
    stripped = prg.add_masks(y0.copy(), [secagg._self_seed(b0, server.params.session)], [-1])
    # ... but the pairwise masks stay: what is left is still uniform, not client 0's input
    assert np.mean(stripped == xs[0]) < 1e-2
    assert stats.kstest(stripped / 2.0**32, "uniform").pvalue > 1e-4
    assert not any(r.key_shares for r in replies)  # nobody dropped: no mask key share was revealed
    # t - 1 shares of a secret do not reconstruct it
    fewer = [_share(r.self_mask_shares[0]) for r in replies][: server.params.threshold - 1]
    with pytest.raises(CryptoError, match="needed"):
        shamir.combine(fewer, server.params.threshold)


def test_refused_messages_leave_the_server_able_to_finish():
    xs = _ints(4, 64, 32, seed=5)
    params = secagg.make_params(list(xs), 64, 32)
    other = secagg.make_params(list(xs), 64, 32)
    server = secagg.SecAggServer(params)
    machines = {c: secagg.SecAggClient(c, s) for c, s in server.setups().items()}
    stranger = secagg.SecAggClient(0, secagg.SecAggServer(other).setups()[0])
    ads = {c: m.advertise() for c, m in machines.items()}
    with pytest.raises(ProtocolError, match="another session"):
        server.receive(stranger.advertise())
    server.receive(ads[0])
    with pytest.raises(ProtocolError, match="duplicate"):
        server.receive(ads[0])
    with pytest.raises(ProtocolError, match="refused in stage advertise"):
        server.receive(secagg.MaskedInput(params.session, 1, xs[1]))
    with pytest.raises(ProtocolError, match="not expected"):
        server.receive(secagg.AdvertiseKeys(params.session, 99, b"a" * 32, b"b" * 32))
    for c in (1, 2, 3):
        server.receive(ads[c])
    keys = server.close_stage()
    shares = {c: machines[c].share_keys(keys[c]) for c in xs}
    for m in shares.values():
        server.receive(m)
    routed = server.close_stage()
    # a tampered share ciphertext is caught by its receiver
    victim = routed[1]
    sender = next(iter(victim.ciphertexts))
    bad = bytearray(victim.ciphertexts[sender])
    bad[-1] ^= 1
    forged = {**victim.ciphertexts, sender: bytes(bad)}
    with pytest.raises(ProtocolError, match="authentication failed"):
        machines[1].mask(secagg.SharesForYou(params.session, 1, forged), xs[1])  # refused, state kept
    masked = {c: machines[c].mask(routed[c], xs[c]) for c in xs}
    with pytest.raises(ProtocolError, match="must be 64 uint32"):
        server.receive(secagg.MaskedInput(params.session, 0, xs[0][:10]))
    for m in masked.values():
        server.receive(m)
    requests = server.close_stage()
    for c in xs:
        server.receive(machines[c].unmask(requests[c]))
    total = server.close_stage()
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=np.uint32))
    assert server.rejected == 5


def _advertised(xs, length: int, bits: int):
    """A fresh instance over ``xs``'s clients, through the advertise stage: (server, clients, keys to relay)."""
    server = secagg.SecAggServer(secagg.make_params(list(xs), length, bits))
    machines = {c: secagg.SecAggClient(c, s) for c, s in server.setups().items()}
    for m in machines.values():
        server.receive(m.advertise())
    return server, machines, server.close_stage()


def test_client_refuses_unsafe_unmask_requests():
    xs = _ints(5, 16, 32)
    server, machines, keys = _advertised(xs, 16, 32)
    params = server.params
    for c, m in machines.items():
        server.receive(m.share_keys(keys[c]))
    routed = server.close_stage()
    for c, m in machines.items():
        m.mask(routed[c], xs[c])
    with pytest.raises(ProtocolError, match="both alive and dropped"):
        machines[0].unmask(secagg.UnmaskRequest(params.session, 0, (0, 1, 2), (1,)))
    with pytest.raises(ProtocolAbort, match="only 2 masked inputs"):
        machines[0].unmask(secagg.UnmaskRequest(params.session, 0, (0, 1), (2, 3, 4)))
    with pytest.raises(ProtocolError, match="another session"):
        machines[0].unmask(secagg.UnmaskRequest(b"x" * 16, 0, (0, 1, 2), ()))
    with pytest.raises(ProtocolError, match="in stage unmask"):
        machines[0].advertise()


def test_parameters_are_validated():
    with pytest.raises(ValueError, match="majority"):
        secagg.make_params(list(range(5)), 10, 32, threshold=2)
    with pytest.raises(ValueError, match="at least 2"):
        secagg.make_params([0], 10)
    with pytest.raises(ValueError, match="k \\* n must be even"):
        harary_graph(list(range(5)), 3)


@pytest.mark.parametrize("n,k", [(10, 4), (11, 6), (10, 5), (6, 5), (100, 10)])
def test_harary_graph_is_k_regular_and_symmetric(n, k):
    g = harary_graph(list(range(100, 100 + n)), k)
    assert all(len(v) == k and c not in v for c, v in g.items())
    assert all(c in g[v] for c, vs in g.items() for v in vs)


def _through_share_stage(xs, k=None):
    params = secagg.make_params(list(xs), len(next(iter(xs.values()))), 32, k)
    server = secagg.SecAggServer(params)
    machines = {c: secagg.SecAggClient(c, s) for c, s in server.setups().items()}
    for m in machines.values():
        server.receive(m.advertise())
    keys = server.close_stage()
    return params, server, machines, {c: machines[c].share_keys(keys[c]) for c in xs}


def test_server_refuses_partial_share_lists_and_bad_keys():
    xs = _ints(4, 16, 32)
    params, server, machines, shares = _through_share_stage(xs)
    partial = shares[0].ciphertexts
    victim = next(iter(partial))
    with pytest.raises(ProtocolError, match="exactly its neighbours"):
        server.receive(secagg.EncryptedShares(params.session, 0, {v: c for v, c in partial.items() if v != victim}))
    with pytest.raises(ProtocolError, match="must be"):
        server.receive(secagg.EncryptedShares(params.session, 0, {v: c + b"x" for v, c in partial.items()}))
    fresh = secagg.SecAggServer(secagg.make_params(list(xs), 16, 32))
    with pytest.raises(ProtocolError, match="invalid public key"):
        fresh.receive(secagg.AdvertiseKeys(fresh.params.session, 0, bytes(32), b"\x09" + bytes(31)))


def test_server_refuses_shares_from_non_holders_or_at_wrong_points():
    xs = _ints(10, 16, 32)
    params, server, machines, shares = _through_share_stage(xs, k=4)
    for m in shares.values():
        server.receive(m)
    routed = server.close_stage()
    for c in xs:
        server.receive(machines[c].mask(routed[c], xs[c]))
    requests = server.close_stage()
    honest = machines[0].unmask(requests[0])
    stranger = next(c for c in xs if c not in params.holders(0))
    some = next(iter(honest.self_mask_shares.values()))
    with pytest.raises(ProtocolError, match="holds no share"):
        server.receive(secagg.UnmaskShares(params.session, 0, {stranger: some}, {}))
    owner = next(iter(honest.self_mask_shares))
    wrong = shamir.Share(5, 7).to_bytes() + bytes(64)
    with pytest.raises(ProtocolError, match="wrong point"):
        server.receive(secagg.UnmaskShares(params.session, 0, {owner: wrong}, {}))
    server.receive(honest)  # the honest reply still counts
    for c in list(xs)[1:]:
        server.receive(machines[c].unmask(requests[c]))
    assert np.array_equal(server.close_stage(), np.sum(list(xs.values()), axis=0, dtype=np.uint32))


def test_sparse_graphs_never_reveal_partial_sums():
    with pytest.raises(ValueError, match="degree 1"):
        secagg.make_params(list(range(4)), 8, 32, neighbours=1)
    # k = 2 on 8 clients is a ring: two dropouts on opposite sides cut it into two arcs
    xs = _ints(8, 16, 32)
    params = secagg.make_params(list(xs), 16, 32, neighbours=2, threshold=2)
    ring = params.neighbours
    a = 0
    b = next(c for c in xs if c != a and c not in ring[a] and not set(ring[c]) & set(ring[a]))
    from fedsecmem.protocols.graph import connected
    assert not connected(set(xs) - {a, b}, ring)
    server = secagg.SecAggServer(params)
    machines = {c: secagg.SecAggClient(c, s) for c, s in server.setups().items()}
    out = {c: None for c in xs}
    with pytest.raises(ProtocolAbort, match="disconnected"):
        for stage in ("advertise", "share", "mask"):
            for c, m in out.items():
                if stage == "mask" and c in (a, b):
                    continue
                cl = machines[c]
                server.receive({"advertise": lambda: cl.advertise(), "share": lambda: cl.share_keys(m),
                                "mask": lambda: cl.mask(m, xs[c])}[stage]())
            out = server.close_stage()


# ---- a cheating share holder (attack, then defence) ------------------------------------------------

def _returning(monkeypatch, forge):
    """Every client returns ``forge(cid, kind, owner, share)`` in place of each share it reveals at
    unmasking (``kind``: ``"self"`` for a self-mask seed, ``"key"`` for a mask key), keeping whatever
    travels with the share (its dealer's signature) as it was."""
    honest = secagg.SecAggClient.unmask
    n = shamir.SHARE_BYTES

    def unmask(self, msg):
        out = honest(self, msg)

        def edit(shares, kind):
            return {o: forge(self.cid, kind, o, shamir.Share.from_bytes(b[:n])).to_bytes() + b[n:]
                    for o, b in shares.items()}

        return secagg.UnmaskShares(out.session, out.sender, edit(out.self_mask_shares, "self"),
                                   edit(out.key_shares, "key"))

    monkeypatch.setattr(secagg.SecAggClient, "unmask", unmask)


def _forging(monkeypatch, cheater: int, victim: int, kind: str, forge):
    """Client ``cheater`` returns a forged share of ``victim``'s self-mask seed (``kind="self"``) or
    mask key (``"key"``) at unmasking, every other message honest."""
    _returning(monkeypatch, lambda cid, k, owner, s: shamir.Share(s.x, forge(s.y) % shamir.PRIME)
               if (cid, k, owner) == (cheater, kind, victim) else s)


@pytest.mark.parametrize("forge", [lambda y: y + 1, lambda y: y ^ (1 << 300)],
                         ids=["shifted share", "random-looking share"])
def test_a_forged_share_is_caught_and_the_sum_stays_exact(monkeypatch, forge):
    """Without commitments, the first t shares were combined blindly: a shifted share gave a wrong sum
    with no error, a random one ended the round. Now the server reconstructs what client 3
    committed to from other shares, names client 1, and the sum is exact."""
    xs = _ints(5, 200, 64, seed=5)
    _forging(monkeypatch, cheater=0, victim=3, kind="self", forge=forge)  # client 0's share comes first
    total, server, *_ = _run(xs, 64)
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=np.uint64))
    assert set(server.cheaters) == {0} and "client 3's self-mask seed" in server.cheaters[0]


def test_a_forged_key_share_of_a_dropped_client_is_caught(monkeypatch):
    xs = _ints(6, 100, 64, seed=6)
    _forging(monkeypatch, cheater=1, victim=4, kind="key", forge=lambda y: y + 12345)
    total, server, *_ = _run(xs, 64, drop={"mask": {4}})
    assert np.array_equal(total, np.sum([xs[c] for c in xs if c != 4], axis=0, dtype=np.uint64))
    assert set(server.cheaters) == {1} and "mask key" in server.cheaters[1]


def test_a_client_sharing_a_seed_other_than_it_committed_to_is_named(monkeypatch):
    """Every holder returns a consistent share, but of a seed the owner never committed to."""
    honest = secagg.SecAggClient.advertise

    def advertise(self):
        msg = honest(self)
        if self.cid == 2:  # commits to (and signs) a seed it will not share
            signed = self.signer.sign(secagg.advertised_bytes(msg.session, 2, msg.c_public, msg.s_public, bytes(32),
                                                              msg.share_key))
            msg = secagg.AdvertiseKeys(msg.session, msg.sender, msg.c_public, msg.s_public, bytes(32), signed,
                                       msg.share_key)
        return msg

    monkeypatch.setattr(secagg.SecAggClient, "advertise", advertise)
    with pytest.raises(CheatingDetected, match="client 2 dealt shares of a self-mask seed other than") as err:
        _run(_ints(5, 50, 64, seed=7), 64)
    assert err.value.clients == {2}


# ---- colluding clients framing honest ones (attack, then defence) ----------------------------------

def test_colluders_cannot_get_honest_holders_named(monkeypatch):
    """n = 5, t = 3: colluders 0 and 1 add c x (x - x_3) to their shares of client 2's seed, a
    polynomial vanishing at 0 and at holder 3's point. Shares {0, 1, 3} then reconstruct exactly
    what client 2 committed to; the server that searched t-subsets took that polynomial and named
    the honest holders 2 and 4 as forgers (the deployment excluded them). Now each share carries
    its dealer's signature: the colluders' shares fail it, they are named, and the sum is exact."""
    xs = _ints(5, 64, 64, seed=9)
    x3 = 3 + 1  # client 3's Shamir point

    def forge(cid, kind, owner, s):
        if cid in (0, 1) and (kind, owner) == ("self", 2):
            return shamir.Share(s.x, (s.y + 987654321 * s.x * (s.x - x3)) % shamir.PRIME)
        return s

    _returning(monkeypatch, forge)
    total, server, *_ = _run(xs, 64)
    assert not set(server.cheaters) & {2, 3, 4}, f"honest clients named: {server.cheaters}"
    assert set(server.cheaters) == {0, 1}
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=np.uint64))


def test_with_exactly_t_shares_back_a_colluder_cannot_get_the_owner_named(monkeypatch):
    """n = 5, t = 3, clients 3 and 4 gone before unmasking: three shares of each seed come back, and
    any three points lie on some polynomial. One colluder shifting its share of client 1's seed made
    the old server conclude that client 1 shared a seed other than it committed to. Now the
    colluder's share fails its signature: the colluder is named, the owner is not."""
    xs = _ints(5, 64, 64, seed=10)
    _forging(monkeypatch, cheater=0, victim=1, kind="self", forge=lambda y: y + 1)
    with pytest.raises(CheatingDetected) as err:
        _run(xs, 64, drop={"unmask": {3, 4}})
    assert err.value.clients == {0}, f"named {err.value.clients}"


def test_a_forged_share_is_named_with_its_own_share_as_proof(monkeypatch):
    """The proof kept against a forger is the share it returned and the signature that came with it,
    which does not verify under the dealer's advertised share-signing key."""
    xs = _ints(5, 64, 64, seed=11)
    _forging(monkeypatch, cheater=0, victim=3, kind="self", forge=lambda y: y + 1)
    total, server, *_ = _run(xs, 64)
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=np.uint64))
    assert set(server.cheaters) == {0}
    (proof,) = server.evidence[0]
    assert (proof.dealer, proof.holder, proof.kind) == (3, 0, "self")
    assert not proof.signed_by(server.keys[3].share_key)
    # the honest share the same holder was dealt does verify: the proof is the forgery, not the key
    honest = shamir.Share.from_bytes(proof.share)
    real = secagg.ShareEvidence(proof.session, 3, 0, "self",
                                shamir.Share(honest.x, (honest.y - 1) % shamir.PRIME).to_bytes(), proof.signature)
    assert real.signed_by(server.keys[3].share_key)


def test_a_share_returned_as_the_other_secret_is_named(monkeypatch):
    """Client 0 returns its (validly signed) share of client 3's mask key as its share of client 3's
    self-mask seed: the signature names which secret it is, so the swap is caught."""
    honest = secagg.SecAggClient.unmask

    def unmask(self, msg):
        out = honest(self, msg)
        if self.cid == 0:
            out = secagg.UnmaskShares(out.session, 0, {**out.self_mask_shares, 3: self.held[3][1]}, out.key_shares)
        return out

    monkeypatch.setattr(secagg.SecAggClient, "unmask", unmask)
    xs = _ints(5, 32, 64, seed=12)
    total, server, *_ = _run(xs, 64)
    assert set(server.cheaters) == {0}
    assert np.array_equal(total, np.sum(list(xs.values()), axis=0, dtype=np.uint64))


def _dealing(monkeypatch, dealer: int, bend):
    """Client ``dealer`` deals its self-mask seed's shares through ``bend(shares)`` (then signs them
    as usual); every other client deals honestly."""
    honest, split = secagg.SecAggClient.share_keys, shamir.split

    def share_keys(self, msg):
        if self.cid != dealer:
            return honest(self, msg)
        calls = []

        def bent(secret, xs, t, coefficients=None):
            shares = split(secret, xs, t, coefficients)
            calls.append(secret)
            return bend(shares) if len(calls) == 1 else shares  # the first split is the self-mask seed's

        monkeypatch.setattr(shamir, "split", bent)
        try:
            return honest(self, msg)
        finally:
            monkeypatch.setattr(shamir, "split", split)

    monkeypatch.setattr(secagg.SecAggClient, "share_keys", share_keys)


def test_an_owner_dealing_inconsistent_signed_shares_is_named(monkeypatch):
    """Client 2 deals (and signs) holder 0 a share off its polynomial. The old server found a subset
    without it and named the honest holder 0 as a forger. Now the t signed shares that do not give
    the committed seed are the owner's own evidence: client 2 is named, nobody else."""
    xs = _ints(5, 32, 64, seed=13)
    _dealing(monkeypatch, 2, lambda sh: [shamir.Share(sh[0].x, (sh[0].y + 1) % shamir.PRIME), *sh[1:]])
    params = secagg.make_params(sorted(xs), 32, 64)
    server = secagg.SecAggServer(params)
    with pytest.raises(CheatingDetected, match="client 2 dealt") as err:
        drive_secagg(server, xs)
    assert err.value.clients == {2} and set(server.cheaters) == {2}
    proof = server.evidence[2]
    assert len(proof) == params.threshold and all(p.signed_by(server.keys[2].share_key) for p in proof)
    y0 = shamir.interpolate([shamir.Share.from_bytes(p.share) for p in proof], 0)
    assert y0 >= 2**256 or secagg.seed_commitment(y0.to_bytes(32, "big"), params.session, 2) != \
        server.keys[2].b_commitment


def test_a_holder_refuses_a_share_its_dealer_did_not_sign_or_dealt_at_another_point(monkeypatch):
    """An honest holder checks each share when it arrives, so it never returns one the server would
    blame it for: a signature other than under the dealer's advertised key, or a share at another
    holder's point (which would get the holder's whole unmask reply refused), is refused at once."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    xs = _ints(5, 16, 32, seed=14)
    server, machines, keys = _advertised(xs, 16, 32)
    machines[2].share_signer = Ed25519PrivateKey.generate()  # not the key client 2 advertised
    for c, m in machines.items():
        server.receive(m.share_keys(keys[c]))
    routed = server.close_stage()
    with pytest.raises(ProtocolError, match="not signed by client 2"):
        machines[0].mask(routed[0], xs[0])
    assert machines[0].stage == "mask"  # refused, state kept
    # a dealer handing holder 0 a (signed) share at holder 1's point
    _dealing(monkeypatch, 3, lambda sh: [sh[1], sh[0], *sh[2:]])
    params, server, machines, shares = _through_share_stage(xs)
    for m in shares.values():
        server.receive(m)
    routed = server.close_stage()
    with pytest.raises(ProtocolError, match="client 3 dealt it a share at point 2"):
        machines[0].mask(routed[0], xs[0])


def test_a_server_that_substitutes_a_neighbours_key_is_refused():
    """Bonawitz et al.'s active server: it relays its own key as client 1's, to read the shares that
    client 0 encrypts for client 1. The advertisement is signed; client 0 checks and refuses."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedsecmem.crypto.agreement import generate_keypair

    params = secagg.make_params([0, 1, 2, 3], 10, 64)
    server = secagg.SecAggServer(params)
    signers = {c: Ed25519PrivateKey.generate() for c in params.clients}
    verify = {c: k.public_key() for c, k in signers.items()}
    clients = {c: secagg.SecAggClient(c, s, signers[c], verify) for c, s in server.setups().items()}
    for c in clients.values():
        server.receive(c.advertise())
    relayed = server.close_stage()
    honest = relayed[0]
    assert clients[0].share_keys(honest).ciphertexts  # untouched: shares go out
    fake = generate_keypair()
    forged = secagg.NeighbourKeys(honest.session, 0, {**honest.keys, 1: (fake.public, honest.keys[1][1])},
                                  honest.proofs, honest.share_keys)
    again = secagg.SecAggClient(0, server.setups()[0], signers[0], verify)
    again.advertise()
    with pytest.raises(ProtocolAbort, match="keys relayed for client 1 are not the ones it signed"):
        again.share_keys(forged)
    assert again.stage == "share"  # nothing was encrypted under the substituted key
    # nor can it relay a share-signing key of its own for client 1 (to pass off shares as client 1's)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ProtocolAbort, match="keys relayed for client 1 are not the ones it signed"):
        again.share_keys(secagg.NeighbourKeys(honest.session, 0, honest.keys, honest.proofs,
                                              {**honest.share_keys, 1: other}))
    # with identity keys, the share key advertised is the identity key
    assert {c: k.share_key for c, k in server.keys.items()} == {c: k.public_bytes_raw() for c, k in verify.items()}


# ---- a sparse graph: one colluder and one dropout (attack, then defence) ---------------------------

def _strip_victim(params, server, run, victim, dropped, colluder):
    """The server with one colluding client: every mask of the victim's masked input stripped, from
    what the unmask stage revealed and the colluder's own mask key; None if the shares are not there."""
    t, session = params.threshold, params.session
    replies = [m for m in run.transcript if isinstance(m, secagg.UnmaskShares)]
    b = [_share(r.self_mask_shares[victim]) for r in replies if victim in r.self_mask_shares]
    s = [_share(r.key_shares[dropped]) for r in replies if dropped in r.key_shares]
    if len(b) < t or len(s) < t:
        return None
    v_public = server.keys[victim].s_public
    seeds = [secagg._self_seed(shamir.combine(b, t), session),
             secagg._pair_seed(secagg.keypair_from_private(shamir.combine(s, t)), v_public, session, victim, dropped),
             secagg._pair_seed(run.clients[colluder].s_keys, v_public, session, victim, colluder)]
    signs = [-1, -secagg._sign(victim, dropped), -secagg._sign(victim, colluder)]
    return prg.add_masks(server.masked[victim].vector.copy(), seeds, signs)


def test_on_a_sparse_graph_one_colluder_and_one_dropout_cannot_isolate_an_input():
    """n = 6, k = 2, t = 2: the victim's two neighbours are a client that drops after sharing keys and
    a client colluding with the server. Before, the victim revealed its self-mask share and the
    dropped neighbour's key share, and the server stripped every mask of its input exactly. Now a
    client on a sparse graph with fewer than t live neighbours refuses to unmask: nothing is revealed."""
    xs = _ints(6, 64, 64, seed=8)
    params = secagg.make_params(sorted(xs), 64, 64, neighbours=2, threshold=2)
    victim = 0
    dropped, colluder = params.neighbours[victim]
    server = secagg.SecAggServer(params)
    try:
        run = drive_secagg(server, xs, {"mask": {dropped}})
    except ProtocolAbort:
        run = None  # the honest clients refused: no sum, and no single input either
    if run is not None:
        stripped = _strip_victim(params, server, run, victim, dropped, colluder)
        assert stripped is None or not np.array_equal(stripped, xs[victim]), "the victim's input was recovered"


def test_a_sparse_graph_outside_bell_et_al_bounds_is_refused_in_one_line():
    from fedsecmem.config import config_from_dict
    from fedsecmem.errors import UserError

    base = {"method": "feddymem", "protocol": "secagg", "clients": {"n": 6}}
    with pytest.raises(UserError, match=r"neighbours 2 of 6 clients: an honest client is isolated .* 2\^-40") as err:
        config_from_dict({**base, "secure": {"secagg": {"neighbours": 2, "threshold": 2}}})
    assert "\n" not in str(err.value)
    config_from_dict({**base, "secure": {"secagg": {"neighbours": 5}}})  # the complete graph: always allowed
    big = {"method": "feddymem", "protocol": "secagg", "clients": {"n": 1000}}
    config_from_dict({**big, "secure": {"secagg": {"neighbours": 60}}})  # O(log n) neighbours at n = 1000
    with pytest.raises(UserError, match="isolated"):
        config_from_dict({**big, "secure": {"secagg": {"neighbours": 20}}})
