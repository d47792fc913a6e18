"""The SecureSum interface over its three backends, and the CKKS state machines' refusals."""

import os

import numpy as np
import pytest

from fedsecmem.crypto import ckks
from fedsecmem.crypto.errors import OverflowRisk
from fedsecmem.protocols.ckks_sum import CkksClient, CkksServer, EncryptedInput
from fedsecmem.protocols.errors import ProtocolAbort, ProtocolError
from fedsecmem.protocols.secure_sum import CkksSum, make_secure_sum


@pytest.fixture(scope="module")
def ckks_sum():
    return CkksSum()


def _inputs(n=5, length=5000, seed=0):
    rng = np.random.default_rng(seed)
    return {c: rng.normal(0, 20, length) for c in range(n)}


@pytest.mark.parametrize("protocol", ["plain", "secagg", "ckks"])
def test_every_backend_sums_with_dropouts(protocol, ckks_sum):
    ss = ckks_sum if protocol == "ckks" else make_secure_sum(protocol)
    xs = _inputs()
    full = ss.sum(xs)
    assert np.abs(full.total - sum(xs.values())).max() < 1e-5
    part = ss.sum(xs, drop={"mask": {1}, "unmask": {2}})
    assert part.included == (0, 2, 3, 4)  # 2 sent its input before vanishing: it is in the sum
    assert np.abs(part.total - (xs[0] + xs[2] + xs[3] + xs[4])).max() < 1e-5
    if protocol == "secagg":  # 1 took part in key sharing, then never sent its masked vector
        assert 0 < part.bytes_up[1] < 5000 * 8 < part.bytes_up[0]
    else:  # 1 sent nothing at all; the others sent exactly what they send with no dropout
        assert set(part.bytes_up) == {0, 2, 3, 4}
        assert all(part.bytes_up[c] == full.bytes_up[c] for c in part.bytes_up)
        if protocol == "plain":
            assert part.bytes_up[0] == 5000 * 4  # float32 on the wire
    assert part.visible_to == ("clients" if protocol == "ckks" else "server")


def test_bytes_reflect_each_protocol(ckks_sum):
    xs = _inputs(length=8192)
    plain = make_secure_sum("plain").sum(xs).bytes_up[0]
    plain64 = make_secure_sum("plain", wire="float64").sum(xs).bytes_up[0]
    sec = make_secure_sum("secagg").sum(xs).bytes_up[0]
    ck = ckks_sum.sum(xs).bytes_up[0]
    assert plain == 8192 * 4 and plain64 == 8192 * 8
    assert plain64 < sec < plain64 + 2500  # uint64 masked vector plus keys and signed shares
    assert ck > 6 * plain  # CKKS expansion


def test_bad_inputs_are_refused_before_anything_is_sent(ckks_sum):
    with pytest.raises(ValueError, match="differ in length"):
        make_secure_sum("secagg").sum({0: np.zeros(3), 1: np.zeros(4)})
    with pytest.raises(OverflowRisk, match="exceeds the bound"):
        make_secure_sum("secagg", bits=32, frac_bits=16).sum({0: np.full(3, 1e6), 1: np.zeros(3)})
    with pytest.raises(OverflowRisk, match="exceeds the bound"):
        ckks_sum.sum({0: np.full(3, 1e9), 1: np.zeros(3)})
    with pytest.raises(ValueError, match="unknown dropout stages"):
        make_secure_sum("plain").sum({0: np.zeros(3)}, drop={"later": {0}})
    with pytest.raises(ValueError, match="protocol must be one of"):
        make_secure_sum("paillier")
    with pytest.raises(ProtocolAbort, match="no client sent"):
        ckks_sum.sum({0: np.zeros(3), 1: np.zeros(3)}, drop={"mask": {0, 1}})


def test_ckks_server_refuses_foreign_keys_and_secret_contexts():
    a, b = ckks.KeyAuthority(), ckks.KeyAuthority()
    session = os.urandom(16)
    with pytest.raises(ProtocolError, match="holds the secret key"):
        CkksServer(a.secret_context(), session, {0, 1}, 10, a.params.slots)
    server = CkksServer(a.public_context(), session, {0, 1}, 10, a.params.slots)
    alien = CkksClient(0, b.secret_context(), b.public_context(), b.params)
    with pytest.raises(ProtocolError, match="another key set"):
        server.receive(alien.encrypt(session, np.ones(10), 2))
    ok = CkksClient(0, a.secret_context(), a.public_context(), a.params)
    with pytest.raises(ProtocolError, match="another session"):
        server.receive(ok.encrypt(os.urandom(16), np.ones(10), 2))
    with pytest.raises(ProtocolError, match="chunks"):
        server.receive(EncryptedInput(session, 0, ok.fp, []))
    server.receive(ok.encrypt(session, np.ones(10), 2))
    with pytest.raises(ProtocolError, match="duplicate"):
        server.receive(ok.encrypt(session, np.ones(10), 2))
    total = server.close_stage()
    assert np.allclose(ok.decrypt(total, 10), 1.0, atol=1e-6)
    with pytest.raises(ProtocolError, match="another key set"):
        alien.decrypt(total, 10)
    assert server.rejected == 4
