"""The ledgers of a run: which party records what, with whose key (``fedsecmem.audits.ledger``).

In simulation every party's ledger is kept by the simulator with a fresh
Ed25519 key per party per run (public keys in ``ledger/keys.json``); a
deployed server and each deployed client keep their own ledger with the
signing key ``fedsecmem provision`` gave them. Message events come from the
protocols' taps (simulation) or the coordinator and the client loop
(deployment), always over the exact bytes of the message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecmem import __version__
from fedsecmem.audits.ledger import LEDGER_DIR, SERVER, Ledger, ledger_head, sha256, write_keys
from fedsecmem.crypto.pki import ProvisioningError, client_name, signing_key, verify_key
from fedsecmem.errors import UserError
from fedsecmem.privacy.hooks import RoundHooks
from fedsecmem.privacy.threat_model import threat_model

__all__ = [
    "PartyLedgerHooks", "RunLedgers", "begin", "config_digest", "coordinator_observer",
    "last_task", "party_ledger", "record_client_dp", "record_dp", "run_start_fields", "write_party_keys",
]


def config_digest(cfg) -> str:
    """SHA-256 of the run's configuration as every party signs it: ``deploy.certs`` left out (each
    party keeps its keys in a folder of its own, a Ray actor in a temporary one), so the server and
    every client sign the same digest for the same configuration."""
    tree = json.loads(cfg.model_dump_json())
    (tree.get("deploy") or {}).pop("certs", None)
    return sha256(json.dumps(tree, sort_keys=True).encode())


def run_start_fields(cfg, run_id: str) -> dict:
    pv = cfg.privacy
    privacy = {"dp": pv.dp}
    if pv.dp:
        # a calibrated noise multiplier is not known yet: the ``dp_plan`` event signs it before round 1
        privacy.update(delta=pv.delta, epsilon_target=pv.epsilon,
                       noise_multiplier=pv.noise_multiplier if pv.epsilon is None else None,
                       noise=pv.noise, accountant=pv.accountant, clip_norm=pv.clip_norm,
                       image_clip_norm=pv.image_clip_norm, sgd_clip=pv.sgd_clip, epsilon_budget=pv.epsilon_budget)
    return {"run_id": run_id, "config_sha256": config_digest(cfg), "code_version": __version__,
            "method": cfg.method, "protocol": cfg.protocol, "clients": cfg.clients.n,
            "threat_model": threat_model(cfg), "privacy": privacy}


def record_dp(ledger: Ledger, r: int, privacy) -> dict[str, float | None]:
    """The ``dp`` event of round ``r``: every client's epsilon (infinite: null) and the whole history
    it was computed from (``PrivacyAccountant.compact``), so an auditor can recompute it."""
    per_client = privacy.per_round[-1]
    eps = {str(c): (e if e != float("inf") else None) for c, e in per_client.items()}
    acc = privacy.accountant
    ledger.append("dp", round=r, noise_multiplier=privacy.z, delta=acc.delta, accountant=acc.kind, epsilon=eps,
                  history={str(c): acc.compact(c) for c in per_client})
    return eps


def record_client_dp(ledger: Ledger, r: int, budget, z: float | None) -> None:
    """A client's own ``dp`` event: the epsilon it counted itself after round ``r`` and its history."""
    acc, eps = budget.accountant, budget.epsilon()
    ledger.append("dp", round=r, noise_multiplier=z, delta=acc.delta, accountant=acc.kind,
                  epsilon=eps if eps != float("inf") else None, history=acc.compact(budget.cid))


class RunLedgers(RoundHooks):
    """The simulator's ledgers: the server's and every client's, one key each for this run."""

    def __init__(self, out: Path, n_clients: int, delta: float | None = None):
        self.delta = delta  # of the run's DP guarantee (recorded with every epsilon)
        d = Path(out) / LEDGER_DIR
        if d.exists():  # a new run in an old folder: new keys, new ledgers
            shutil.rmtree(d)
        keys = {p: Ed25519PrivateKey.generate() for p in [SERVER] + [client_name(c) for c in range(n_clients)]}
        self.public = write_keys(out, {p: k.public_key() for p, k in keys.items()})
        self.server = Ledger(d / f"{SERVER}.jsonl", SERVER, keys[SERVER])
        self.clients = [Ledger(d / f"{client_name(c)}.jsonl", client_name(c), keys[client_name(c)])
                        for c in range(n_clients)]
        self.round = 0

    def all(self) -> list[Ledger]:
        return [self.server] + self.clients

    def start(self, cfg, run_id: str) -> None:
        fields = run_start_fields(cfg, run_id)
        for led in self.all():
            led.append("run_start", **fields)

    def begin_round(self, r: int) -> None:
        self.round = r
        for led in self.all():
            led.append("round_start", round=r)

    def tap(self, direction: str, cid: int, stage: str, data) -> None:
        """A protocol message between client ``cid`` and the server, recorded at both ends."""
        body = data()
        client = self.clients[cid]
        if direction == "up":
            client.message("sent", SERVER, stage, body, round=self.round)
            self.server.message("received", client.party, stage, body, round=self.round)
        else:
            self.server.message("sent", client.party, stage, body, round=self.round)
            client.message("received", SERVER, stage, body, round=self.round)

    def client_privacy(self, r: int, budget, z: float | None) -> None:
        """Epsilon a client counted itself after round ``r`` (its own accountant, ``ClientBudget``)."""
        record_client_dp(self.clients[budget.cid], r, budget, z)

    def privacy_plan(self, plan: dict) -> None:
        self.server.append("dp_plan", **plan)

    def dropouts(self, r: int, clients: list[int]) -> None:
        if clients:
            self.server.append("dropout", round=r, clients=sorted(clients))

    def end_round(self, r: int, record: dict, privacy) -> None:
        self.dropouts(r, record.get("dropped", []))
        if privacy is not None:
            record_dp(self.server, r, privacy)

    def end(self, status: str, **fields) -> None:
        for led in self.all():
            led.append("run_end", status=status, **fields)
            led.close()

    def heads(self) -> dict[str, dict]:
        """Every party's ledger head (results.json records it; ``audit verify`` checks it)."""
        return {led.party: ledger_head(led.path) for led in self.all()}


# ---- deployment: each party its own ledger, with its provisioned key ---------------------------

def party_ledger(out: Path, party: str, certs: Path) -> Ledger:
    """``party``'s ledger in ``OUT/ledger``, signed with its key from ``fedsecmem provision`` (an
    existing ledger is continued: a restarted party keeps one chain)."""
    try:
        key = signing_key(Path(certs), party)
    except ProvisioningError as exc:
        raise UserError(f"deploy.certs: {exc}") from None
    return Ledger(Path(out) / LEDGER_DIR / f"{party}.jsonl", party, key)


def write_party_keys(out: Path, certs: Path, n_clients: int) -> dict[str, str]:
    """``OUT/ledger/keys.json`` from the provisioned public keys of the server and the clients."""
    try:
        keys = {p: verify_key(Path(certs), p) for p in [SERVER] + [client_name(c) for c in range(n_clients)]}
    except ProvisioningError as exc:
        raise UserError(f"deploy.certs: {exc}") from None
    return write_keys(out, keys)


def begin(ledger: Ledger, cfg, run_id: str) -> None:
    """``run_start``, or ``resume`` when this ledger's last run (the same run id) did not end."""
    last = ledger.last
    if last is not None and last.get("event") != "run_end" and _run_of(ledger) == run_id:
        ledger.append("resume", run_id=run_id)
    else:
        ledger.append("run_start", **run_start_fields(cfg, run_id))


def _run_of(ledger: Ledger) -> str | None:
    """The run id of the last run_start in the ledger's file."""
    run = None
    for line in ledger.path.read_bytes().splitlines():
        if b'"run_start"' in line:
            try:
                run = json.loads(line).get("run_id", run)
            except ValueError:
                continue
    return run


class PartyLedgerHooks(RoundHooks):
    """A deployed server's own ledger around a round: round start, dropouts, every client's epsilon."""

    def __init__(self, ledger: Ledger, delta: float | None):
        self.ledger, self.delta = ledger, delta

    def begin_round(self, r: int) -> None:
        self.ledger.append("round_start", round=r)

    def privacy_plan(self, plan: dict) -> None:
        self.ledger.append("dp_plan", **plan)

    def end_round(self, r: int, record: dict, privacy) -> None:
        if record.get("dropped"):
            self.ledger.append("dropout", round=r, clients=record["dropped"])
        if privacy is not None:
            record_dp(self.ledger, r, privacy)
        self.ledger.sync()


def last_task(ledger: Ledger) -> tuple[int, int] | None:
    """The (round, step) of the last message this party's ledger records, or None."""
    last = None
    if not ledger.path.exists():
        return None
    for line in ledger.path.read_bytes().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "message" and isinstance(r.get("round"), int) and isinstance(r.get("step"), int):
            last = max(last or (0, 0), (r["round"], r["step"]))
    return last


def coordinator_observer(ledger: Ledger):
    """The server's record of every message its mailbox delivered or received."""

    def observe(direction: str, cid: int, rnd: int, step: int, kind: str, data: bytes, fields: dict) -> None:
        ledger.message(direction, client_name(cid), kind, data, round=rnd, step=step, **fields)

    return observe
