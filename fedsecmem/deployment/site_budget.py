"""A site's privacy budget across runs: what it has spent on its data, and the operator's reset.

A deployed client keeps one state file (``privacy_state-client-<i>.json`` in its folder) with
every run its data took part in; its limit holds for all of them composed, so a server that starts
a new run id starts no new budget. Only ``fedsecmem budget reset`` starts one: it keeps the old
file (renamed, never deleted) and signs the reset in the site's ledger (``budget_reset``, closed
by a ``run_end`` of status ``budget reset`` so the ledger still verifies), naming who asked, why,
what had been spent and the kept file's SHA-256.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from fedsecmem.audits.accountant import PrivacyAccountant, epsilon_of
from fedsecmem.crypto.pki import client_name
from fedsecmem.errors import UserError
from fedsecmem.privacy.budget import CLIENT_STATE_FILE, epsilon_limit, read_client_state
from fedsecmem.privacy.ledgers import party_ledger
from fedsecmem.provenance import hash_file

__all__ = ["budget_status", "reset_budget"]

RESET_STATUS = "budget reset"


def _state(folder: Path, cid: int) -> tuple[Path, list[tuple[dict, PrivacyAccountant]]]:
    path = Path(folder) / CLIENT_STATE_FILE.format(cid=cid)
    if not path.is_file():
        return path, []
    try:
        return path, read_client_state(path, cid)
    except ValueError as exc:
        raise UserError(f"budget: {exc}") from None


def budget_status(cfg, cid: int, folder: Path) -> dict:
    """What client ``cid`` has spent in ``folder``: per run and all runs composed."""
    path, runs = _state(folder, cid)
    steps, per_run = [], []
    for entry, acc in runs:
        steps += acc.history.get(cid, [])
        per_run.append({"run_id": entry.get("run_id"), "data_sha256": entry.get("data_sha256"),
                        "epsilon": acc.epsilon(cid)})
    pv = cfg.privacy
    return {"client": cid, "file": str(path), "runs": per_run, "delta": pv.delta,
            "epsilon": epsilon_of(steps, pv.delta, pv.accountant),
            "limit": epsilon_limit(cfg)}


def reset_budget(cfg, cid: int, folder: Path, reason: str, operator: str) -> dict:
    """Start a new budget for client ``cid`` in ``folder``: the old state file is kept beside it
    under a dated name and the reset is signed in the client's ledger. Returns what was recorded."""
    if not reason.strip() or not operator.strip():
        raise UserError("budget reset: --reason and --operator are required (they are signed in the ledger)")
    status = budget_status(cfg, cid, folder)
    path = Path(status["file"])
    if not path.is_file():
        raise UserError(f"budget reset: {path} does not exist: client {cid} has spent nothing here")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    kept = path.with_name(f"{path.stem}.reset-{stamp}.json")
    digest = hash_file(path)
    path.rename(kept)
    ledger = party_ledger(Path(folder), client_name(cid), Path(cfg.deploy.certs))
    try:
        last_run = (ledger.last or {}).get("run_id")
        fields = {"client": cid, "operator": operator.strip()[:200], "reason": reason.strip()[:900],
                  "epsilon_spent": status["epsilon"], "delta": status["delta"], "runs": len(status["runs"]),
                  "kept_file": kept.name, "kept_sha256": digest}
        ledger.append("budget_reset", **fields)
        ledger.append("run_end", status=RESET_STATUS, run_id=last_run)
    finally:
        ledger.close()
    return fields
