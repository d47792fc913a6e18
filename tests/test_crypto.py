"""Known answers, round trips and misuse of the cryptographic primitives."""

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsecmem.crypto import aead, agreement, ckks, prg, shamir
from fedsecmem.crypto.errors import CryptoError, OverflowRisk
from fedsecmem.crypto.fixed_point import FixedPoint

H = bytes.fromhex


def test_x25519_rfc7748_vector():
    alice = agreement.keypair_from_private(H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    bob = agreement.keypair_from_private(H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"))
    assert alice.public == H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert bob.public == H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    shared = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert agreement.agree(alice, bob.public, b"x") == agreement.hkdf(shared, b"x")
    assert agreement.agree(bob, alice.public, b"x") == agreement.hkdf(shared, b"x")
    assert agreement.agree(alice, bob.public, b"x") != agreement.agree(alice, bob.public, b"y")


def test_hkdf_rfc5869_case1():
    okm = agreement.hkdf(H("0b" * 22), H("f0f1f2f3f4f5f6f7f8f9"), 42, salt=H("000102030405060708090a0b0c"))
    assert okm == H("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_agreement_rejects_bad_peer_keys():
    me = agreement.generate_keypair()
    with pytest.raises(CryptoError, match="32 raw bytes"):
        agreement.agree(me, b"short", b"x")
    with pytest.raises(CryptoError, match="key agreement failed"):
        agreement.agree(me, bytes(32), b"x")  # low-order point


def test_aead_round_trip_and_misuse():
    key = agreement.generate_keypair().private_bytes()
    ad = aead.associated_data(1, 2, b"session", "share_keys")
    blob = aead.seal(key, b"secret share", ad)
    assert aead.open_sealed(key, blob, ad) == b"secret share"
    tampered = bytearray(blob)
    tampered[20] ^= 1
    for k, b, a in [(bytes(32), blob, ad), (key, bytes(tampered), ad),
                    (key, blob, aead.associated_data(3, 2, b"session", "share_keys")),
                    (key, blob, aead.associated_data(1, 2, b"session", "unmask")),
                    (key, blob, aead.associated_data(1, 2, b"other", "share_keys"))]:
        with pytest.raises(CryptoError, match="authentication failed"):
            aead.open_sealed(k, b, a)
    with pytest.raises(CryptoError, match="too short"):
        aead.open_sealed(key, b"abc", ad)


def test_prg_is_aes256_ctr_from_counter_zero():
    seed = H("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    ecb = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    blocks = ecb.update(b"".join(i.to_bytes(16, "big") for i in range(4))) + ecb.finalize()
    assert prg.expand(seed, 16, 32).tobytes() == blocks
    assert prg.expand(seed, 8, 64).tobytes() == blocks
    with pytest.raises(CryptoError):
        prg.expand(b"short", 4)


@pytest.mark.parametrize("bits", [32, 64])
def test_add_masks_matches_separate_expansion_across_blocks(bits):
    n = 2 * prg.BLOCK_ELEMENTS + 123
    seeds = [bytes([i]) * 32 for i in range(1, 5)]
    signs = [1, -1, 1, -1]
    x = np.arange(n, dtype=prg.ring_dtype(bits))
    want = x.copy()
    for s, sign in zip(seeds, signs):
        want = want + prg.expand(s, n, bits) if sign > 0 else want - prg.expand(s, n, bits)
    got = prg.add_masks(x.copy(), seeds, signs)
    assert np.array_equal(got, want)
    # masks with opposite signs cancel exactly
    assert np.array_equal(prg.add_masks(got, seeds, [-s for s in signs]), x)


def test_shamir_known_answer_and_thresholds():
    secret = (1234).to_bytes(32, "big")
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6], 3, coefficients=[166, 94])
    assert [(s.x, s.y) for s in shares] == [(1, 1494), (2, 1942), (3, 2578), (4, 3402), (5, 4414), (6, 5614)]
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret
    with pytest.raises(CryptoError, match="2 shares given, 3 needed"):
        shamir.combine(shares[:2], 3)
    with pytest.raises(CryptoError, match="duplicate"):
        shamir.combine([shares[0], shares[0], shares[1]], 3)


def test_shamir_random_secrets_and_insufficient_shares():
    secret = agreement.generate_keypair().private_bytes()
    shares = shamir.split(secret, list(range(1, 11)), 6)
    assert shamir.combine(shares[4:], 6) == secret
    assert all(shamir.Share.from_bytes(s.to_bytes()) == s for s in shares)
    # five shares plus a randomly corrupted sixth: detected instead of a wrong secret
    forged = shares[:5] + [shamir.Share(shares[5].x, int.from_bytes(b"\x01" * 65, "big"))]
    with pytest.raises(CryptoError, match="inconsistent"):
        shamir.combine(forged, 6)
    # t - 1 shares are consistent with every secret: for any candidate, a polynomial through them exists
    other = bytes(32)
    xs = [s.x for s in shares[:5]] + [0]
    ys = [s.y for s in shares[:5]] + [0]
    assert shamir.combine([shamir.Share(x, y) for x, y in zip(xs[:5], ys[:5])] +
                          [_point_on_curve_through(shares[:5], other, 11)], 6) == other


def test_shamir_interpolation_is_the_textbook_lagrange_formula_and_the_polynomial():
    """The one-inversion interpolation equals Lagrange's formula term by term (each weight inverted
    on its own) at 0, at a share's own point and at random points, for small and field-sized x, and
    gives back the polynomial's values (Horner) for every degree."""
    import random

    rng, p = random.Random(7), shamir.PRIME
    for trial in range(200):
        t = rng.randint(1, 30)
        xs = rng.sample(range(1, 5000), t) if trial % 2 else [rng.randrange(1, p) for _ in range(t)]
        poly = [rng.randrange(p) for _ in range(t)]
        shares = [shamir.Share(x, shamir._evaluate(poly, x)) for x in xs]
        for x in (0, xs[0], rng.randrange(p)):
            want = 0
            for i, si in enumerate(shares):
                num = den = 1
                for j, xj in enumerate(xs):
                    if i != j:
                        num, den = num * (x - xj) % p, den * (si.x - xj) % p
                want = (want + si.y * num * pow(den, -1, p)) % p
            assert shamir.interpolate(shares, x) == want == shamir._evaluate(poly, x)


def _point_on_curve_through(shares, secret, x):
    """The value at ``x`` of the degree-5 polynomial through ``shares`` and (0, secret)."""
    pts = [(0, int.from_bytes(secret, "big"))] + [(s.x, s.y) for s in shares]
    p = shamir.PRIME
    y = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * (x - xj) % p
                den = den * (xi - xj) % p
        y = (y + yi * num * pow(den, -1, p)) % p
    return shamir.Share(x, y)


def test_shamir_rejects_bad_arguments():
    with pytest.raises(CryptoError, match="32 bytes"):
        shamir.split(b"x", [1, 2], 2)
    with pytest.raises(CryptoError, match="threshold"):
        shamir.split(bytes(32), [1, 2], 3)
    with pytest.raises(CryptoError, match="distinct"):
        shamir.split(bytes(32), [1, 1], 2)


@pytest.mark.parametrize("bits,frac", [(32, 16), (64, 24)])
def test_fixed_point_sum_within_quantization_bound(bits, frac):
    rng = np.random.default_rng(0)
    parties = 7
    fp = FixedPoint(bits, frac, parties)
    xs = [rng.uniform(-1, 1, 1000) * min(fp.bound, 1e4) for _ in range(parties)]
    total = np.zeros(1000, dtype=prg.ring_dtype(bits))
    for x in xs:
        total += fp.encode(x)
    assert np.abs(fp.decode(total) - np.sum(xs, axis=0)).max() <= fp.sum_error() * 1.0001
    # all parties at the bound, of either sign: the sum does not wrap
    for sign in (1, -1):
        full = sum(fp.encode(np.full(3, sign * fp.bound)) for _ in range(parties)).astype(total.dtype)
        assert np.allclose(fp.decode(full), sign * fp.bound * parties, rtol=1e-9)


def test_fixed_point_refuses_values_that_could_wrap():
    fp = FixedPoint(32, 16, 4)
    assert fp.bound == pytest.approx((2**31 - 1) // 4 / 2**16, rel=1e-6)
    fp.encode(np.array([fp.bound, -fp.bound]))
    with pytest.raises(OverflowRisk, match="exceeds the bound"):
        fp.encode(np.array([0.0, fp.bound * 1.001]))
    with pytest.raises(OverflowRisk, match="NaN"):
        fp.encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="no room"):
        FixedPoint(32, 30, 2**30)


def test_stochastic_rounding_is_unbiased():
    fp = FixedPoint(64, 4, 1)
    x = np.full(200_000, 0.3 / 16)  # 0.3 of a quantization step
    decoded = fp.decode(fp.encode(x, "stochastic"))
    assert set(np.unique(decoded * 16)) == {0.0, 1.0}
    assert abs(decoded.mean() * 16 - 0.3) < 0.01
    assert np.all(fp.decode(fp.encode(x)) == 0.0)  # nearest rounds the same values down


@pytest.fixture(scope="module")
def authority():
    return ckks.KeyAuthority()


def test_ckks_public_context_holds_no_secret(authority):
    pub = ckks.load_context(authority.public_context())
    assert not pub.is_private() and not pub.has_galois_keys() and not pub.has_relin_keys()
    assert ckks.load_context(authority.secret_context()).is_private()
    with pytest.raises(CryptoError, match="not a TenSEAL context"):
        ckks.load_context(b"garbage")


def test_ckks_chunked_sum_matches_plaintext(authority):
    params = authority.params
    pub = ckks.load_context(authority.public_context())
    sec = ckks.load_context(authority.secret_context())
    rng = np.random.default_rng(1)
    xs = [rng.normal(0, 100, params.slots * 2 + 17) for _ in range(3)]
    cts = [ckks.encrypt(pub, x, params, 3) for x in xs]
    assert all(len(c) == 3 for c in cts)
    total = ckks.decrypt(sec, ckks.add(pub, cts), len(xs[0]))
    assert np.abs(total - np.sum(xs, axis=0)).max() < 1e-5
    with pytest.raises(CryptoError, match="secret context"):
        ckks.decrypt(pub, cts[0], 10)
    with pytest.raises(CryptoError, match="not a CKKS ciphertext"):
        ckks.decrypt(sec, [b"\x00" * 64], 10)
    with pytest.raises(CryptoError, match="different numbers"):
        ckks.add(pub, [cts[0], cts[1][:1]])
    with pytest.raises(OverflowRisk, match="exceeds the bound"):
        ckks.encrypt(pub, np.array([params.bound(3) * 2]), params, 3)


def test_ckks_rejects_insecure_parameters():
    with pytest.raises(CryptoError, match="rejected by SEAL"):
        ckks.KeyAuthority(ckks.CkksParams(4096, (60, 60, 60), 40))
