"""Provisioning of a federation's identities: an X.509 CA, TLS leaves and ledger signing keys.

Why: the server and every client authenticate each other with mutual TLS over
gRPC (ECDSA P-256 certificates issued by one federation CA, the client id
carried in the certificate's common name ``client-{i}``), and each party signs
its audit-ledger entries with its own Ed25519 key, whose public half is
recorded in ``identities.json`` next to the certificate fingerprints.

Trust assumption: whoever holds ``ca.key`` can mint any identity, including
the server's, so keep it offline once provisioning is done. Every private key
is written with mode 0600 from the moment it is created. Distribute to each
party only its own ``{party}.pem``, ``{party}.key``, ``{party}.sign.key`` and
``ca.pem`` (plus the public ``identities.json`` / ``*.sign.pub``), never another
party's keys and never ``ca.key``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER = "server"
CA_NAME = "fedsecmem CA"
MAX_CLIENT_ID = 2**31  # exclusive bound on client ids
MAX_DAYS = 100 * 366
CLOCK_SKEW = datetime.timedelta(minutes=5)

_CLIENT_RE = re.compile(r"client-(0|[1-9][0-9]*)")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PARTY_SUFFIXES = (".sign.key", ".sign.pub", ".pem", ".key")


class ProvisioningError(ValueError):
    """Identities cannot be provisioned or loaded: missing file, bad argument, failed check."""


@dataclass(frozen=True)
class Provisioned:
    """What ``provision`` wrote: the directory, the number of clients and the server's hosts."""

    directory: Path
    clients: int
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes a party hands to gRPC: the CA to trust, its own certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes


# ---------------------------------------------------------------- party names

def client_name(cid: int) -> str:
    return f"client-{cid}"


def client_id_of(common_name: str) -> int | None:
    """``"client-3"`` -> 3; None for anything that is not a canonical client name."""
    if not isinstance(common_name, str):
        return None
    match = _CLIENT_RE.fullmatch(common_name)
    if match is None:
        return None
    cid = int(match.group(1))
    return cid if cid < MAX_CLIENT_ID else None


def peer_client_id(common_names: Iterable[bytes | str]) -> int | None:
    """The client id of a TLS peer, given the common names its auth context reports.

    Only a peer reporting exactly one name, a canonical client name, is a
    client: no name, several names (ambiguous) or undecodable bytes give None.
    """
    names = list(common_names)
    if len(names) != 1:
        return None
    name = names[0]
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    return client_id_of(name)


def _check_party(party: str) -> str:
    if party != SERVER and client_id_of(party) is None:
        raise ProvisioningError(f"unknown party {party!r}: expected {SERVER!r} or 'client-<id>'")
    return party


# ---------------------------------------------------------------- file helpers

def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never readable by others, whatever the umask or old file)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same directory and ``os.replace`` it in place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ProvisioningError(f"missing file {path}") from None


def _pem_private(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


# ---------------------------------------------------------------- argument checks

def _check_clients(clients: int) -> int:
    if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= MAX_CLIENT_ID:
        raise ProvisioningError(f"clients must be an int in [1, 2**31], got {clients!r}")
    return clients


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ProvisioningError(f"days must be an int in [1, {MAX_DAYS}], got {days!r}")
    return days


def _parse_host(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IP literal, a DNSName for a valid host name, else ProvisioningError."""
    if not isinstance(host, str) or not host:
        raise ProvisioningError(f"bad host {host!r}: expected a non-empty string")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if (len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels)
                or labels[-1].isdigit()):
            raise ProvisioningError(f"bad host {host!r}: neither an IP address nor a DNS name") from None
        return x509.DNSName(host)
    if getattr(ip, "scope_id", None):
        raise ProvisioningError(f"bad host {host!r}: scoped IPv6 addresses cannot go in a certificate")
    return x509.IPAddress(ip)


def _check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(hosts, (str, bytes)):
        raise ProvisioningError(f"bad hosts {hosts!r}: expected a sequence of host names, not one string")
    unique = tuple(dict.fromkeys(hosts))
    if not unique:
        raise ProvisioningError("bad hosts: at least one host is needed for the server certificate")
    for host in unique:
        _parse_host(host)
    return unique


# ---------------------------------------------------------------- certificates

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(now: datetime.datetime, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
               sans: list[x509.GeneralName], usage: x509.ObjectIdentifier, now: datetime.datetime,
               days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _remove_stale_clients(out: Path, clients: int) -> None:
    """On a forced re-provisioning, drop the files of clients that no longer exist."""
    for path in out.glob("client-*"):
        for suffix in _PARTY_SUFFIXES:
            if path.name.endswith(suffix):
                cid = client_id_of(path.name[: -len(suffix)])
                if cid is not None and cid >= clients:
                    path.unlink()
                break


def provision(out: Path, clients: int, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
              days: int = 365, force: bool = False) -> Provisioned:
    """Create a CA, the server's and ``clients`` clients' TLS identities and ledger signing keys.

    ``ca.pem`` is written last, so its presence means a complete provisioning;
    an existing one is only replaced with ``force=True``.
    """
    out = Path(out)
    clients = _check_clients(clients)
    hosts = _check_hosts(hosts)
    days = _check_days(days)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ProvisioningError(f"cannot provision into {out}: not a directory") from None
    if (out / "ca.pem").exists() and not force:
        raise ProvisioningError(f"{out} is already provisioned (ca.pem exists); pass force=True to replace it")
    if force:
        _remove_stale_clients(out, clients)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _make_ca(now, days)
    _write_private(out / "ca.key", _pem_private(ca_key))

    leaves = [(SERVER, [_parse_host(h) for h in hosts], ExtendedKeyUsageOID.SERVER_AUTH)]
    leaves += [(client_name(i), [x509.DNSName(client_name(i))], ExtendedKeyUsageOID.CLIENT_AUTH)
               for i in range(clients)]
    parties: dict[str, dict[str, str]] = {}
    for party, sans, usage in leaves:
        key, cert = _make_leaf(ca_key, ca_cert, party, sans, usage, now, days)
        _write_private(out / f"{party}.key", _pem_private(key))
        (out / f"{party}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        sign = Ed25519PrivateKey.generate()
        _write_private(out / f"{party}.sign.key", _pem_private(sign))
        (out / f"{party}.sign.pub").write_bytes(sign.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        parties[party] = {
            "cert_sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "sign_public": sign.public_key().public_bytes_raw().hex(),
        }

    identities = {"clients": clients, "hosts": list(hosts), "parties": parties}
    _write_atomic(out / "identities.json", json.dumps(identities, indent=2).encode() + b"\n")
    _write_atomic(out / "revoked.json", b"[]\n")
    _write_atomic(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    return Provisioned(directory=out, clients=clients, hosts=hosts)


# ---------------------------------------------------------------- loading

def tls_material(directory: Path, party: str) -> TlsMaterial:
    """The CA certificate, the party's certificate and its private key, as PEM bytes."""
    directory = Path(directory)
    party = _check_party(party)
    return TlsMaterial(ca=_read(directory / "ca.pem"), cert=_read(directory / f"{party}.pem"),
                       key=_read(directory / f"{party}.key"))


def signing_key(directory: Path, party: str) -> Ed25519PrivateKey:
    """The party's Ed25519 ledger signing key."""
    path = Path(directory) / f"{_check_party(party)}.sign.key"
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"unreadable signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvisioningError(f"{path} is not an Ed25519 private key")
    return key


def verify_key(directory: Path, party: str) -> Ed25519PublicKey:
    """The party's Ed25519 ledger verification key."""
    path = Path(directory) / f"{_check_party(party)}.sign.pub"
    try:
        key = serialization.load_pem_public_key(_read(path))
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"unreadable verification key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProvisioningError(f"{path} is not an Ed25519 public key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as exc:
        raise ProvisioningError(f"unreadable certificate {path}: {exc}") from None


# ---------------------------------------------------------------- revocation

def _check_cid(cid: object) -> int:
    if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < MAX_CLIENT_ID:
        raise ProvisioningError(f"bad client id {cid!r}: expected an int in [0, 2**31)")
    return cid


def revoked(directory: Path) -> frozenset[int]:
    """The revoked client ids listed in ``revoked.json`` (missing or malformed file: ProvisioningError)."""
    path = Path(directory) / "revoked.json"
    raw = _read(path)
    try:
        ids = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise ProvisioningError(f"malformed {path}: not JSON") from None
    if not isinstance(ids, list):
        raise ProvisioningError(f"malformed {path}: expected a list of client ids")
    try:
        return frozenset(_check_cid(cid) for cid in ids)
    except ProvisioningError as exc:
        raise ProvisioningError(f"malformed {path}: {exc}") from None


def revoke(directory: Path, cid: int) -> None:
    """Add ``cid`` to ``revoked.json`` (sorted, unique, replaced atomically)."""
    directory = Path(directory)
    ids = revoked(directory) | {_check_cid(cid)}
    _write_atomic(directory / "revoked.json", json.dumps(sorted(ids)).encode() + b"\n")


# ---------------------------------------------------------------- verification

def verify_chain(directory: Path, party: str) -> None:
    """Check the party's certificate: issued by this directory's CA, for this party, valid now, matching its key."""
    directory = Path(directory)
    party = _check_party(party)
    ca = _load_cert(directory / "ca.pem")
    cert = _load_cert(directory / f"{party}.pem")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisioningError(f"{party}.pem is not issued by the CA in {directory}") from None
    names = [attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [party]:
        raise ProvisioningError(f"{party}.pem names {names!r}, not {party!r}")
    now = datetime.datetime.now(datetime.timezone.utc)
    for label, c in (("ca.pem", ca), (f"{party}.pem", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise ProvisioningError(f"{label} is not valid now (valid from {c.not_valid_before_utc} "
                                    f"to {c.not_valid_after_utc})")
    key_path = directory / f"{party}.key"
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"unreadable private key {key_path}: {exc}") from None
    if _spki_der(key.public_key()) != _spki_der(cert.public_key()):
        raise ProvisioningError(f"{party}.key does not match the public key in {party}.pem")
