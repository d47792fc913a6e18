"""Federation PKI: chains, names, usages, key file modes, ledger keys, revocation and misuse."""

import datetime
import ipaddress
import json
import os
import shutil
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsecmem.crypto import pki
from fedsecmem.crypto.pki import ProvisioningError

HOSTS = ("localhost", "127.0.0.1", "node.example")
PARTIES = (pki.SERVER, "client-0", "client-1", "client-2")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return pki.provision(tmp_path_factory.mktemp("fed") / "pki", clients=3, hosts=HOSTS)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return pki.provision(tmp_path_factory.mktemp("other"), clients=3, hosts=HOSTS)


@pytest.fixture
def copy(fed, tmp_path):
    """A private copy of the module's provisioning, for tests that alter it."""
    return shutil.copytree(fed.directory, tmp_path / "copy")


def cert(directory, party):
    return x509.load_pem_x509_certificate((directory / f"{party}.pem").read_bytes())


def common_names(c):
    return [a.value for a in c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def test_provisioned_summary_and_files(fed):
    assert fed.clients == 3 and fed.hosts == HOSTS
    for party in PARTIES:
        for suffix in (".pem", ".key", ".sign.key", ".sign.pub"):
            assert (fed.directory / f"{party}{suffix}").is_file()
    assert not (fed.directory / "client-3.pem").exists()
    assert json.loads((fed.directory / "revoked.json").read_text()) == []


def test_every_leaf_verifies_against_its_ca(fed):
    for party in PARTIES:
        pki.verify_chain(fed.directory, party)


def test_ca_is_a_constrained_self_signed_ca(fed):
    ca = cert(fed.directory, "ca")
    ca.verify_directly_issued_by(ca)
    assert common_names(ca) == ["fedsecmem CA"]
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    for party in PARTIES:
        aki = cert(fed.directory, party).extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ski.digest


def test_cert_from_independent_provisioning_does_not_verify(copy, other):
    for suffix in (".pem", ".key"):
        shutil.copy(other.directory / f"client-1{suffix}", copy / f"client-1{suffix}")
    pki.verify_chain(other.directory, "client-1")  # fine under its own CA
    with pytest.raises(ProvisioningError, match="not issued by the CA"):
        pki.verify_chain(copy, "client-1")
    shutil.copy(other.directory / "ca.pem", copy / "ca.pem")  # now every other leaf fails instead
    pki.verify_chain(copy, "client-1")
    with pytest.raises(ProvisioningError, match="not issued by the CA"):
        pki.verify_chain(copy, pki.SERVER)


def test_key_not_matching_cert_fails(copy):
    shutil.copy(copy / "client-2.key", copy / "client-0.key")
    with pytest.raises(ProvisioningError, match="does not match"):
        pki.verify_chain(copy, "client-0")


def test_cert_of_another_party_fails(copy):
    for suffix in (".pem", ".key"):
        shutil.copy(copy / f"client-2{suffix}", copy / f"client-0{suffix}")
    with pytest.raises(ProvisioningError, match="names"):
        pki.verify_chain(copy, "client-0")


def test_expired_cert_signed_by_the_ca_fails(copy):
    ca_key = serialization.load_pem_private_key((copy / "ca.key").read_bytes(), password=None)
    key = serialization.load_pem_private_key((copy / "client-0.key").read_bytes(), password=None)
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-0")]))
               .issuer_name(cert(copy, "ca").subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=10))
               .not_valid_after(now - datetime.timedelta(days=1))
               .sign(ca_key, hashes.SHA256()))
    (copy / "client-0.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ProvisioningError, match="not valid now"):
        pki.verify_chain(copy, "client-0")


def test_server_sans_usage_and_validity(fed):
    server = cert(fed.directory, pki.SERVER)
    assert common_names(server) == ["server"]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "node.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365, minutes=5)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert now - datetime.timedelta(minutes=6) < server.not_valid_before_utc < now


def test_client_names_and_usages(fed):
    serials = {cert(fed.directory, p).serial_number for p in ("ca",) + PARTIES}
    assert len(serials) == 5
    for i in range(3):
        c = cert(fed.directory, f"client-{i}")
        assert common_names(c) == [pki.client_name(i)] == [f"client-{i}"]
        assert pki.client_id_of(common_names(c)[0]) == i
        eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"client-{i}"]
        bc = c.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and not bc.value.ca


def test_private_keys_are_0600_even_with_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "client-0.key").write_bytes(b"old")
        os.chmod(tmp_path / "p" / "client-0.key", 0o644)
        pki.provision(tmp_path / "p", clients=2)
    finally:
        os.umask(old)
    keys = sorted(p.name for p in (tmp_path / "p").glob("*.key"))
    assert keys == sorted(["ca.key", "server.key", "client-0.key", "client-1.key",
                           "server.sign.key", "client-0.sign.key", "client-1.sign.key"])
    for name in keys:
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((tmp_path / "p" / "ca.pem").stat().st_mode) == 0o644


def test_ledger_keys_round_trip_and_match_identities(fed):
    identities = json.loads((fed.directory / "identities.json").read_text())
    assert identities["clients"] == 3 and identities["hosts"] == list(HOSTS)
    assert sorted(identities["parties"]) == sorted(PARTIES)
    for party in PARTIES:
        sk, vk = pki.signing_key(fed.directory, party), pki.verify_key(fed.directory, party)
        message = f"ledger entry from {party}".encode()
        vk.verify(sk.sign(message), message)
        entry = identities["parties"][party]
        assert vk.public_bytes_raw().hex() == entry["sign_public"]
        assert sk.public_key().public_bytes_raw().hex() == entry["sign_public"]
        der = cert(fed.directory, party).public_bytes(serialization.Encoding.DER)
        assert entry["cert_sha256"] == _sha256(der)
    assert len({e["sign_public"] for e in identities["parties"].values()}) == 4


def _sha256(data):
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize().hex()


def test_tampered_or_foreign_signature_fails(fed):
    sk = pki.signing_key(fed.directory, "client-0")
    signature = bytearray(sk.sign(b"round 7 digest"))
    pki.verify_key(fed.directory, "client-0").verify(bytes(signature), b"round 7 digest")
    with pytest.raises(InvalidSignature):
        pki.verify_key(fed.directory, "client-0").verify(bytes(signature), b"round 8 digest")
    signature[5] ^= 1
    with pytest.raises(InvalidSignature):
        pki.verify_key(fed.directory, "client-0").verify(bytes(signature), b"round 7 digest")
    with pytest.raises(InvalidSignature):
        pki.verify_key(fed.directory, "client-1").verify(sk.sign(b"x"), b"x")


def test_reprovisioning_refused_unless_forced(copy):
    before = (copy / "ca.pem").read_bytes()
    with pytest.raises(ProvisioningError, match="already provisioned"):
        pki.provision(copy, clients=3)
    assert (copy / "ca.pem").read_bytes() == before
    pki.revoke(copy, 1)
    result = pki.provision(copy, clients=2, hosts=["localhost"], force=True)
    assert result.clients == 2 and result.hosts == ("localhost",)
    assert (copy / "ca.pem").read_bytes() != before
    assert not any(copy.glob("client-2*"))  # stale client files removed
    assert pki.revoked(copy) == frozenset()
    for party in (pki.SERVER, "client-0", "client-1"):
        pki.verify_chain(copy, party)


def test_revoke_round_trip(copy):
    assert pki.revoked(copy) == frozenset()
    for cid in (2, 0, 2, 7):
        pki.revoke(copy, cid)
    assert pki.revoked(copy) == frozenset({0, 2, 7})
    assert json.loads((copy / "revoked.json").read_text()) == [0, 2, 7]
    assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]
    for bad in (-1, 2**31, True, "3"):
        with pytest.raises(ProvisioningError, match="bad client id"):
            pki.revoke(copy, bad)


@pytest.mark.parametrize("content", ["not json", '{"0": true}', "[true]", "[-1]", '["1"]', "[1.0]",
                                     f"[{2**31}]", "null", "\xff"])
def test_malformed_revoked_raises(copy, content):
    (copy / "revoked.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ProvisioningError, match="malformed"):
        pki.revoked(copy)
    with pytest.raises(ProvisioningError):
        pki.revoke(copy, 1)


def test_missing_revoked_raises(copy):
    (copy / "revoked.json").unlink()
    with pytest.raises(ProvisioningError, match="missing file .*revoked.json"):
        pki.revoked(copy)


@pytest.mark.parametrize("name, expected", [
    ("client-0", 0), ("client-3", 3), ("client-2147483647", 2**31 - 1),
    ("client-2147483648", None), ("client-03", None), ("client--1", None), ("client-x", None),
    ("client-", None), ("server", None), ("Client-3", None), ("client-3 ", None), ("client-3\n", None),
    (" client-3", None), ("client-+3", None), ("client-\u0663", None), ("client-3.0", None), ("", None),
])
def test_client_id_of(name, expected):
    assert pki.client_id_of(name) == expected


def test_peer_client_id():
    assert pki.peer_client_id([b"client-4"]) == 4
    assert pki.peer_client_id(["client-4"]) == 4
    assert pki.peer_client_id(iter([b"client-0"])) == 0
    assert pki.peer_client_id([]) is None
    assert pki.peer_client_id([b"server"]) is None
    assert pki.peer_client_id([b"client-04"]) is None
    assert pki.peer_client_id([b"client-1", b"client-2"]) is None
    assert pki.peer_client_id([b"client-1", b"client-1"]) is None
    assert pki.peer_client_id([b"server", b"client-1"]) is None
    assert pki.peer_client_id([b"client-\xff"]) is None


@pytest.mark.parametrize("clients", [0, -1, True, 1.5, "3", None])
def test_bad_client_count_raises(tmp_path, clients):
    with pytest.raises(ProvisioningError, match="clients"):
        pki.provision(tmp_path / "p", clients=clients)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("hosts", [[], "localhost", [""], ["bad host"], ["-x.example"], ["a..b"],
                                   ["1.2.3.999"], [None], ["localhost", "under_score.example"]])
def test_bad_hosts_raise(tmp_path, hosts):
    with pytest.raises(ProvisioningError, match="host"):
        pki.provision(tmp_path / "p", clients=1, hosts=hosts)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("days", [0, -5, True, 10**7])
def test_bad_days_raise(tmp_path, days):
    with pytest.raises(ProvisioningError, match="days"):
        pki.provision(tmp_path / "p", clients=1, days=days)


def test_ipv6_host_and_duplicates(tmp_path):
    result = pki.provision(tmp_path, clients=1, hosts=["::1", "localhost", "::1"])
    assert result.hosts == ("::1", "localhost")
    san = cert(tmp_path, pki.SERVER).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]


def test_tls_material(fed):
    material = pki.tls_material(fed.directory, "client-1")
    assert material.ca == (fed.directory / "ca.pem").read_bytes()
    assert common_names(x509.load_pem_x509_certificate(material.cert)) == ["client-1"]
    key = serialization.load_pem_private_key(material.key, password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(material.cert).public_key()


def test_tls_material_names_missing_file(copy):
    (copy / "client-1.key").unlink()
    with pytest.raises(ProvisioningError, match="missing file .*client-1.key"):
        pki.tls_material(copy, "client-1")
    with pytest.raises(ProvisioningError, match="missing file .*client-1.key"):
        pki.verify_chain(copy, "client-1")
    (copy / "ca.pem").unlink()
    with pytest.raises(ProvisioningError, match="missing file .*ca.pem"):
        pki.tls_material(copy, pki.SERVER)


@pytest.mark.parametrize("party", ["ca", "../ca", "client-01", "client-x", "", "Server"])
def test_unknown_party_rejected(fed, party):
    for load in (pki.tls_material, pki.signing_key, pki.verify_key, pki.verify_chain):
        with pytest.raises(ProvisioningError, match="unknown party"):
            load(fed.directory, party)


def test_provision_into_a_file_raises(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ProvisioningError, match="not a directory"):
        pki.provision(tmp_path / "f", clients=1)
