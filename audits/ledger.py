"""Signed, hash-chained ledgers: each party's own record of what it did, sent and received.

Every party (``server``, ``client-0``, ...) appends one JSON line per event to
``RUN_DIR/ledger/<party>.jsonl``. A line holds ``seq`` (0, 1, ...), the
event's fields, ``prev`` (SHA-256 of the previous line's exact text; 64 zeros
for the first) and ``sig``: an Ed25519 signature by the party's key over the
line without ``sig`` (canonical JSON: sorted keys, no spaces). Messages are
recorded by the SHA-256 of their exact bytes and their size, never their
content.

Threat model. What ``verify`` proves: given the parties' public keys from a
source the auditor trusts (``fedsecmem provision``'s ``*.sign.pub``), nobody
without a party's private key can edit, insert, delete or reorder lines of its
ledger or cut its end (the last line must be ``run_end``) without it being
reported with the line number; and the cross-check reports every message one
side recorded and the other did not (a party that lies about a message it
sent or received is caught unless both ends lie the same way, i.e. collude).
Given the run folder's ``results.json``, ``verify`` also binds the ledgers to
that run: every ledger must end with the ``run_end`` of the run id it records,
and a ledger whose head (line count and last line's digest) ``results.json``
records must end exactly there, so ledgers that continue across runs cannot be
cut back to an earlier run's end unnoticed; the server's ``run_end`` must name
the digest of the run's ``global_memory.npz``. Without ``results.json`` the
ledgers are bound to nothing: that is a problem ("unbound") unless the server's
last ``run_end`` itself records a failed run (which writes no results), and the
verdict (``Verification.binding``) says which. The run's privacy state files
(``privacy_state.json``, ``privacy_state-client-<i>.json``) must read strictly:
a NaN or an infinity in them is a problem naming the file.
What it does not prove: that a party recorded everything it did (a party may
omit events it controls alone), or anything once a private key has leaked.
In simulation the simulator makes one key per party per run and writes the
public keys to ``ledger/keys.json`` in the same folder, so whoever can
rewrite the folder can re-sign it: simulated ledgers show consistency, not
provenance; compare ``keys.json``'s fingerprint with one recorded elsewhere.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedsecmem.audits.accountant import PrivacyAccountant, StrictJSONError, read_json_strict, step_of

LEDGER_DIR = "ledger"
KEYS_FILE = "keys.json"
GENESIS = "0" * 64
SERVER = "server"


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def key_fingerprint(keys: dict[str, str]) -> str:
    """SHA-256 over the parties' public keys: one value to record outside the run folder."""
    return sha256(canonical(keys))


class Ledger:
    """One party's append-only ledger. Opening an existing file continues its chain (a party that
    restarts keeps one ledger)."""

    def __init__(self, path: Path, party: str, key: Ed25519PrivateKey):
        self.path, self.party, self.key = Path(path), party, key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seq, self.prev = 0, GENESIS
        self.last: dict | None = None  # the last record already in the file
        if self.path.exists():
            lines = self.path.read_bytes().splitlines()
            if lines:
                self.seq = len(lines)
                self.prev = sha256(lines[-1])
                try:
                    self.last = json.loads(lines[-1])
                except ValueError:
                    self.last = None
        self._fh = open(self.path, "ab")
        self._lock = threading.Lock()  # transport threads and the round's hooks may write at once

    def append(self, event: str, **fields) -> dict:
        with self._lock:
            return self._append(event, fields)

    def _append(self, event: str, fields: dict) -> dict:
        record = {"seq": self.seq, "party": self.party, "event": event,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
                  **fields, "prev": self.prev}
        record["sig"] = base64.b64encode(self.key.sign(canonical(record))).decode()
        line = canonical(record)
        self._fh.write(line + b"\n")
        self._fh.flush()
        self.seq += 1
        self.prev = sha256(line)
        self.last = record
        return record

    def message(self, direction: str, peer: str, stage: str, data: bytes, **fields) -> dict:
        """A message this party sent (``direction="sent"``) to or received from ``peer``."""
        return self.append("message", dir=direction, peer=peer, stage=stage, sha256=sha256(data),
                           bytes=len(data), **fields)

    def position(self) -> dict:
        """The next line's sequence number and the hash it will chain to, read together."""
        with self._lock:
            return {"seq": self.seq, "prev": self.prev}

    def sync(self) -> None:
        with self._lock:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            with self._lock:
                self._fh.close()


def write_keys(run_dir: Path, keys: dict[str, Ed25519PublicKey]) -> dict[str, str]:
    """``RUN_DIR/ledger/keys.json``: party -> raw public key (hex)."""
    out = {p: public_hex(k) for p, k in sorted(keys.items())}
    d = Path(run_dir) / LEDGER_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (KEYS_FILE + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, d / KEYS_FILE)
    return out


def read_keys(path: Path) -> dict[str, Ed25519PublicKey]:
    raw = json.loads(Path(path).read_text())
    return {p: Ed25519PublicKey.from_public_bytes(bytes.fromhex(h)) for p, h in raw.items()}


# ---- verification -------------------------------------------------------------------------------

@dataclass
class Problem:
    file: str
    line: int | None  # 1-based; None for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class Entry:
    """A verified line, kept for the cross-check."""

    line: int
    record: dict


@dataclass
class Verification:
    problems: list[Problem] = field(default_factory=list)
    parties: dict[str, int] = field(default_factory=dict)  # party -> lines
    messages_matched: int = 0
    key_fingerprint: str | None = None
    # what the ledgers are bound to: "bound: ..." (results.json of their run), "failed: ..." (the
    # server's run_end records a failed run, which writes no results) or "unbound: ..." (a problem)
    binding: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict:
        return {"ok": self.ok, "parties": self.parties, "messages_matched": self.messages_matched,
                "problems": [str(p) for p in self.problems], "key_fingerprint": self.key_fingerprint,
                "binding": self.binding}


def verify_ledger(path: Path, party: str, key: Ed25519PublicKey | None) -> tuple[list[Entry], list[Problem]]:
    """Check one ledger's lines, chain, sequence, party, signatures and end; return its entries."""
    name = Path(path).name
    problems: list[Problem] = []
    entries: list[Entry] = []
    if key is None:
        return entries, [Problem(name, None, f"no public key for party {party!r}")]
    prev = GENESIS
    lines = Path(path).read_bytes().splitlines()
    if not lines:
        return entries, [Problem(name, None, "empty ledger")]
    for i, line in enumerate(lines):
        n = i + 1
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            problems.append(Problem(name, n, "not a JSON record (edited or corrupted)"))
            prev = sha256(line)
            continue
        sig = rec.pop("sig", None)
        try:
            key.verify(base64.b64decode(sig or "", validate=True), canonical(rec))
        except (InvalidSignature, ValueError, TypeError):
            problems.append(Problem(name, n, f"signature does not verify under {party}'s key (line edited)"))
        if rec.get("prev") != prev:
            problems.append(Problem(name, n, "hash chain broken: 'prev' is not the hash of the line before "
                                             "(a line was deleted, inserted or reordered here)"))
        if rec.get("seq") != i:
            problems.append(Problem(name, n, f"sequence number {rec.get('seq')!r}, expected {i} "
                                             "(lines deleted or reordered)"))
        if rec.get("party") != party:
            problems.append(Problem(name, n, f"party {rec.get('party')!r} in {party}'s ledger"))
        entries.append(Entry(n, rec))
        prev = sha256(line)
    if entries and entries[0].record.get("event") != "run_start":
        problems.append(Problem(name, 1, "does not start with run_start"))
    if entries and entries[-1].record.get("event") != "run_end":
        problems.append(Problem(name, len(lines), "does not end with run_end (lines cut from the end, or the "
                                                   "party stopped mid-run)"))
    return entries, problems


def _message_index(entries: list[Entry], direction: str) -> dict[tuple[str, str], list[Entry]]:
    """(peer, sha256) -> lines recording a message in ``direction``."""
    out: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        r = e.record
        if r.get("event") == "message" and r.get("dir") == direction:
            out[(r.get("peer"), r.get("sha256"))].append(e)
    return out


def cross_check(ledgers: dict[str, list[Entry]]) -> tuple[list[Problem], int]:
    """Every message a client recorded sending the server recorded receiving (same digest), and
    every task the server recorded sending its client recorded receiving; and the other way round.
    A message delivered twice (a retried download) counts once."""
    problems: list[Problem] = []
    matched = 0
    server = ledgers.get(SERVER)
    if server is None:
        return [Problem(f"{SERVER}.jsonl", None, "server ledger missing: messages cannot be cross-checked")], 0
    s_sent, s_recv = _message_index(server, "sent"), _message_index(server, "received")
    peers = {peer for peer, _ in list(s_sent) + list(s_recv)}
    for peer in sorted(peers - set(ledgers)):
        problems.append(Problem(f"{peer}.jsonl", None, "missing: the server exchanged messages with this party"))
    for party, entries in sorted(ledgers.items()):
        if party == SERVER:
            continue
        c_sent, c_recv = _message_index(entries, "sent"), _message_index(entries, "received")
        for mine, theirs, what in ((c_sent, s_recv, "sent to the server, which has no record of receiving it"),
                                   (c_recv, s_sent, "received from the server, which has no record of sending it")):
            for (peer, digest), lines in mine.items():
                if (party, digest) in theirs:
                    matched += 1
                else:
                    problems.append(Problem(f"{party}.jsonl", lines[0].line, f"message {digest[:16]}... {what}"))
        for mine, theirs, what in ((s_recv, c_sent, f"received from {party}, which has no record of sending it"),
                                   (s_sent, c_recv, f"sent to {party}, which has no record of receiving it")):
            for (peer, digest), lines in mine.items():
                if peer == party and (SERVER, digest) not in theirs:
                    problems.append(Problem(f"{SERVER}.jsonl", lines[0].line, f"message {digest[:16]}... {what}"))
    return problems, matched


def cross_check_privacy(ledgers: dict[str, list[Entry]]) -> list[Problem]:
    """Every epsilon a client's own accountant recorded, the server recorded at least as high for
    that client and round: the server's figure is the one reported, and it must not under-count."""
    server = ledgers.get(SERVER)
    if server is None:
        return []
    by_round: dict[int, dict[str, float | None]] = {}
    for e in server:
        r = e.record
        if r.get("event") == "dp" and isinstance(r.get("epsilon"), dict):
            by_round[r.get("round")] = r["epsilon"]
    problems = []
    for party, entries in sorted(ledgers.items()):
        if party == SERVER or not party.startswith("client-"):
            continue
        cid = party.removeprefix("client-")
        for e in entries:
            r = e.record
            if r.get("event") != "dp":
                continue
            mine = r.get("epsilon")
            theirs = by_round.get(r.get("round"), {}).get(cid, "absent")
            if theirs == "absent":
                problems.append(Problem(f"{party}.jsonl", e.line, f"round {r.get('round')}: the client counted "
                                        f"epsilon {mine}, the server recorded none for it"))
            elif mine is None or theirs is None:  # infinite on either side
                if theirs is not None:
                    problems.append(Problem(f"{party}.jsonl", e.line, f"round {r.get('round')}: the client counted "
                                            f"an infinite epsilon, the server recorded {theirs}"))
            elif mine > theirs * (1 + 1e-9) + 1e-12:
                problems.append(Problem(f"{party}.jsonl", e.line, f"round {r.get('round')}: the client counted "
                                        f"epsilon {mine:.6g}, the server recorded only {theirs:.6g} (under-counted)"))
    return problems


def check_dp_histories(ledgers: dict[str, list[Entry]]) -> list[Problem]:
    """Every mechanism history a ``dp`` event signs (the server's: per client; a client's: its own)
    is one the accountant accepts (``step_of``: noise multiplier, rate and count in range): a
    history the accountant would refuse cannot back an epsilon."""
    problems = []
    for party, entries in sorted(ledgers.items()):
        for e in entries:
            r = e.record
            if r.get("event") != "dp" or r.get("history") is None:
                continue
            hist = r["history"]
            for c, h in (hist.items() if isinstance(hist, dict) else [(None, hist)]):
                try:
                    if not isinstance(h, list):
                        raise ValueError(f"{h!r} is not a list of steps")
                    for entry in h:
                        step_of(entry)
                except ValueError as exc:
                    who = "" if c is None else f"client {c}'s "
                    problems.append(Problem(f"{party}.jsonl", e.line, f"round {r.get('round')}: {who}signed history "
                                            f"refused by the accountant: {exc}"))
    return problems


def verify_run(run_dir: Path, keys: dict[str, Ed25519PublicKey] | None = None) -> Verification:
    """Verify every ledger in ``RUN_DIR/ledger`` (keys from ``keys`` or the folder's keys.json),
    cross-check clients against the server, and bind the ledgers to the run ``results.json`` records."""
    d = Path(run_dir) / LEDGER_DIR
    result = Verification()
    if not d.is_dir():
        result.problems.append(Problem(str(d), None, "no ledger folder"))
        return result
    if keys is None:
        kf = d / KEYS_FILE
        if not kf.is_file():
            result.problems.append(Problem(KEYS_FILE, None, "missing: give the parties' public keys (--keys)"))
            return result
        try:
            keys = read_keys(kf)
        except (ValueError, TypeError, KeyError) as exc:
            result.problems.append(Problem(KEYS_FILE, None, f"unreadable: {exc}"))
            return result
    result.key_fingerprint = key_fingerprint({p: public_hex(k) for p, k in sorted(keys.items())})
    ledgers: dict[str, list[Entry]] = {}
    files = sorted(d.glob("*.jsonl"))
    if not files:
        result.problems.append(Problem(str(d), None, "no ledgers"))
        return result
    for f in files:
        party = f.stem
        entries, problems = verify_ledger(f, party, keys.get(party))
        result.problems.extend(problems)
        result.parties[party] = len(entries)
        ledgers[party] = entries
    problems, result.messages_matched = cross_check(ledgers)
    result.problems.extend(problems)
    result.problems.extend(cross_check_privacy(ledgers))
    result.problems.extend(check_dp_histories(ledgers))
    result.problems.extend(check_privacy_states(run_dir))
    result.binding, problems = run_binding(run_dir, ledgers)
    result.problems.extend(problems)
    return result


RESULTS_FILE = "results.json"
GLOBAL_MEMORY_FILE = "global_memory.npz"
# the run's files the server signs in its ``run_end`` (``signed_files``), in the order a report lists them
RUN_PLOTS = ("auroc_per_round.png", "leakage_roc.png", "anomaly_maps.png")  # written only by some runs
SIGNED_FILES = ("results.json", "config.yaml", "privacy_state.json", GLOBAL_MEMORY_FILE, *RUN_PLOTS)


def remove_stale_plots(run_dir: Path) -> None:
    """A new run in an old folder: the plots an earlier run left go first, so the new run's
    ``run_end`` never signs a plot it did not draw (a 1-round run draws no curve)."""
    for name in RUN_PLOTS:
        (Path(run_dir) / name).unlink(missing_ok=True)


def ledger_head(path: Path) -> dict:
    """A ledger's head: its line count and the SHA-256 of its last line. results.json records every
    ledger's head as it was just before the run's ``run_end`` (which then signs results.json)."""
    lines = Path(path).read_bytes().splitlines()
    return {"lines": len(lines), "sha256": sha256(lines[-1]) if lines else GENESIS}


def signed_files(run_dir: Path) -> dict[str, str]:
    """The SHA-256 of each of the run's ``SIGNED_FILES`` present in ``run_dir`` (for ``run_end``)."""
    out = {}
    for name in SIGNED_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            out[name] = sha256(path.read_bytes())
    return out


PRIVACY_STATE_FILE = "privacy_state.json"
CLIENT_PRIVACY_STATES = "privacy_state-client-*.json"  # each client's own accountant (simulation, or its --out)


def _accountant_states(doc):
    """Every privacy accountant's state (``PrivacyAccountant.to_json``) in a state file's document,
    whatever wraps it (the server's file is one; a client's holds one per run)."""
    if isinstance(doc, dict):
        if "history" in doc and "kind" in doc:
            yield doc
            return
        for value in doc.values():
            yield from _accountant_states(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _accountant_states(value)


def check_privacy_states(run_dir: Path) -> list[Problem]:
    """The run folder's privacy state files, read as a resumed run reads them: strictly (no NaN or
    infinity, ``read_json_strict``) and every history in range (``PrivacyAccountant.from_json``). A
    state that does not read would be counted as less spent; each is a problem naming the file."""
    run_dir = Path(run_dir)
    paths = [run_dir / PRIVACY_STATE_FILE] + sorted(run_dir.glob(CLIENT_PRIVACY_STATES))
    problems = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            doc = read_json_strict(path)
            for state in _accountant_states(doc):
                PrivacyAccountant.from_json(state)
        except StrictJSONError as exc:
            problems.append(Problem(path.name, None, exc.reason))
        except (ValueError, TypeError, KeyError) as exc:
            problems.append(Problem(path.name, None, f"not a privacy state a run can resume from ({exc})"))
        except OSError as exc:
            problems.append(Problem(path.name, None, f"unreadable ({exc})"))
    return problems


def _failed(status) -> bool:
    """A ``run_end`` status of a run that stopped before its results (``failed`` or ``failed: why``)."""
    return isinstance(status, str) and (status == "failed" or status.startswith("failed:"))


def _last_run_end(entries: list[Entry]) -> Entry | None:
    for e in reversed(entries):
        if e.record.get("event") == "run_end":
            return e
    return None


def check_run_binding(run_dir: Path, ledgers: dict[str, list[Entry]]) -> list[Problem]:
    """``run_binding``'s problems."""
    return run_binding(run_dir, ledgers)[1]


def _same_run(ledgers: dict[str, list[Entry]], run_id, source: str) -> list[Problem]:
    """Every ledger's last ``run_end`` is of run ``run_id`` (``source`` says who records that run)."""
    problems = []
    for party, entries in sorted(ledgers.items()):
        end = _last_run_end(entries)
        if end is None or end.record.get("run_id") != run_id:
            ended = "no run" if end is None else f"run {end.record.get('run_id')!r}"
            problems.append(Problem(f"{party}.jsonl", end.line if end else None,
                                    f"ends with {ended}, not run {run_id!r} that {source} records "
                                    "(cut back to an earlier run, or from another run)"))
    return problems


def _unbound(ledgers: dict[str, list[Entry]]) -> tuple[str, list[Problem]]:
    """The verdict on a folder without results.json: fine only where the server's last ``run_end``
    (signed) records a failed run, which writes no results; otherwise the ledgers are unbound."""
    server = ledgers.get(SERVER)
    end = _last_run_end(server) if server else None
    if end is None:
        return ("unbound: results.json missing, and no server run_end says how the run ended",
                [Problem(RESULTS_FILE, None, "missing, and no server run_end says how the run ended: the ledgers "
                                             "are bound to no results (unbound)")])
    run_id, status = end.record.get("run_id"), end.record.get("status")
    problems = _same_run(ledgers, run_id, "the server's run_end")
    if _failed(status):
        return (f"failed: run {run_id!r} failed before writing results (the server's run_end: {status!r}); "
                "no results to bind", problems)
    signs = RESULTS_FILE in (end.record.get("files") or {})
    problems.insert(0, Problem(RESULTS_FILE, None, f"missing: the server's run_end records run {run_id!r} as "
                               f"{status!r}{' and signs its results.json' if signs else ''}; without it the ledgers "
                               "are bound to no results (unbound: the results deleted, or the ledgers cut back to "
                               "an earlier run's end)"))
    return f"unbound: results.json missing (the server's run_end: run {run_id!r}, {status!r})", problems


def _signed_files_differ(run_dir: Path, end: Entry, skip=()) -> list[Problem]:
    """The files the server's ``run_end`` signs that are missing from ``run_dir`` or differ."""
    problems = []
    for name, digest in sorted((end.record.get("files") or {}).items()):
        if name in skip:
            continue
        f = Path(run_dir) / name
        if not f.is_file():
            problems.append(Problem(name, None, "signed in the server's run_end but missing from the folder"))
        elif sha256(f.read_bytes()) != digest:
            problems.append(Problem(name, None, "differs from the file the server signed at the run's end "
                                    "(changed after the run)"))
    return problems


def run_binding(run_dir: Path, ledgers: dict[str, list[Entry]]) -> tuple[str, list[Problem]]:
    """The verdict on what the ledgers are bound to, and its problems. With ``results.json``: they
    end with the run it records (each one's last ``run_end`` names its run id and comes right after
    the head results.json records), and the files the server's ``run_end`` signs (results.json
    itself, the config, the privacy state, the global memory, the plots) are the ones in the folder,
    byte for byte. Without it: ``_unbound``."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        binding, problems = _unbound(ledgers)
        server = ledgers.get(SERVER)
        end = _last_run_end(server) if server else None
        if end is not None and not _failed(end.record.get("status")):
            problems.extend(_signed_files_differ(run_dir, end, skip=(RESULTS_FILE,)))
        return binding, problems
    try:
        results = json.loads(path.read_text())
        run_id = results["run_id"]
        heads = (results.get("ledger") or {}).get("heads") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        return ("unbound: results.json unreadable",
                [Problem(RESULTS_FILE, None, "unreadable: cannot bind the ledgers to a run")])
    problems = _same_run(ledgers, run_id, RESULTS_FILE)
    for party, entries in sorted(ledgers.items()):
        name = f"{party}.jsonl"
        head = heads.get(party)
        if head is not None:
            lines = (Path(run_dir) / LEDGER_DIR / name).read_bytes().splitlines()
            at = int(head.get("lines", -1))
            before = (sha256(lines[at - 1]) if 0 < at <= len(lines) else GENESIS if at == 0 else None)
            if len(lines) != at + 1 or before != head.get("sha256"):
                problems.append(Problem(name, len(lines), f"has {len(lines)} lines; {RESULTS_FILE} recorded line "
                                        f"{at} ({str(head.get('sha256'))[:16]}...) followed by the run's end: cut or "
                                        "extended after the run"))
    server = ledgers.get(SERVER)
    end = _last_run_end(server) if server else None
    if end is not None and end.record.get("run_id") == run_id:
        signed = end.record.get("files") or {}
        if RESULTS_FILE not in signed:  # e.g. a failed run's end, and a results file written afterwards
            problems.append(Problem(RESULTS_FILE, None, f"not signed by the server's run_end (status "
                                                        f"{end.record.get('status')!r}): not this run's results"))
        problems.extend(_signed_files_differ(run_dir, end))
    binding = (f"bound: results.json of run {run_id!r}, signed by the server's run_end" if not problems else
               f"unbound: results.json of run {run_id!r} is not bound to the ledgers")
    return binding, problems


def events(run_dir: Path, party: str, event: str | None = None) -> list[dict]:
    """The records of one party's ledger (optionally one kind of event), unverified."""
    path = Path(run_dir) / LEDGER_DIR / f"{party}.jsonl"
    if not path.is_file():
        return []
    out = [json.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    return [r for r in out if event is None or r.get("event") == event]


def collect(run_dir: Path, sources: list[Path]) -> list[str]:
    """Copy the client ledgers of a deployment (each client's ``--out`` folder, or its ledger folder)
    into ``run_dir/ledger`` so the run verifies as one folder. A ledger already there is replaced
    only by one that continues it (the same lines first); anything else is refused, nothing copied."""
    dest = Path(run_dir) / LEDGER_DIR
    if not dest.is_dir():
        raise ValueError(f"{run_dir}: no {LEDGER_DIR}/ folder (not a served run folder?)")
    plan: list[tuple[Path, Path]] = []
    for src in map(Path, sources):
        folder = src / LEDGER_DIR if (src / LEDGER_DIR).is_dir() else src
        found = sorted(p for p in folder.glob("client-*.jsonl") if p.is_file())
        if not found:
            raise ValueError(f"{src}: no client ledger (client-<id>.jsonl) in it or its {LEDGER_DIR}/ folder")
        for path in found:
            target = dest / path.name
            if target.exists() and not path.read_bytes().startswith(target.read_bytes()):
                raise ValueError(f"{target} exists and {path} does not continue it: refusing to replace a ledger")
            plan.append((path, target))
    done = []
    for path, target in plan:
        if target.exists() and target.read_bytes() == path.read_bytes():
            continue
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(path.read_bytes())
        tmp.replace(target)
        done.append(target.name)
    return done
