"""``fedsecmem audit check REPORT``: a report's numbers against the signed records, recomputed.

The checker trusts nothing the report says. From the run folder the report sits in it verifies the
ledgers, reads each client's signed mechanism history (the server's last ``dp`` event), and:

- recomputes every client's epsilon with the accountant the run used (must agree to 1e-6) and with an
  independent implementation from another library (for PLD, dp_accounting's, Opacus' PRV: agree
  within ``INDEPENDENT_TOLERANCE``; and Opacus' RDP, a looser sound bound, must not be below it);
- checks the report's epsilon per client, noise multiplier and delta against the signed events, each
  adversary's epsilon against a recomputation, the utility figures against results.json (itself
  signed), and the file digests against the files;
- reports each check as a line; any failure makes the exit code 1.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import ValidationError

from fedsecmem.audits.accountant import Step, epsilon_of
from fedsecmem.audits.adversaries import adversaries
from fedsecmem.audits.ledger import sha256
from fedsecmem.audits.report import ReportError, signed_privacy, verified_run
from fedsecmem.audits.report_schema import Report

__all__ = ["INDEPENDENT_TOLERANCE", "check_report"]

# PLD (pessimistic) and PRV estimate the same optimal curve by different numerics: 3% apart at most
INDEPENDENT_TOLERANCE = 0.03
_INDEPENDENT = {"pld": "prv", "prv": "pld", "rdp": "pld"}


def _close(a: float | None, b: float | None, rel: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rel * max(1.0, abs(b))


def check_report(path: Path, keys=None) -> list[tuple[bool, str]]:
    """Every check of ``path`` (report.json) as (passed, line)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no report at {path}")
    try:
        report = Report.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ReportError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    run_dir = path.parent
    results, _, parties = verified_run(run_dir, keys)
    out: list[tuple[bool, str]] = [(True, f"ledgers of run {results['run_id']} verified")]
    if report.run.run_id != results["run_id"]:
        out.append((False, f"the report is of run {report.run.run_id}, the folder holds run {results['run_id']}"))
        return out
    for name, f in report.files.items():
        p = run_dir / name
        ok = p.is_file() and sha256(p.read_bytes()) == f.sha256
        out.append((ok, f"{name}: {'matches' if ok else 'differs from'} the digest the report and the ledger state"))
    signed = signed_privacy(results, parties["server"])
    dp = report.dp
    if signed is None:
        out.append((not dp.enabled, "DP off in the signed run_start" + ("" if not dp.enabled else ", on in the report")))
    else:
        plan = signed["plan"]
        out.append((_close(dp.noise_multiplier, plan["noise_multiplier"]) and _close(dp.delta, plan["delta"]),
                    f"noise multiplier {dp.noise_multiplier} and delta {dp.delta} as signed in dp_plan"))
        kind, other = signed["accountant"], _INDEPENDENT[signed["accountant"]]
        for c, hist in sorted(signed["history"].items()):
            steps = [Step(float(z), float(q), int(n)) for z, q, n in hist]
            same = epsilon_of(steps, plan["delta"], kind)
            indep = epsilon_of(steps, plan["delta"], other)
            loose = epsilon_of(steps, plan["delta"], "rdp")
            said = dp.epsilon_per_client[c] if c < len(dp.epsilon_per_client) else None
            said = math.inf if said is None else said
            out.append((_close(said, same), f"client {c}: epsilon {said:.4f} in the report, {same:.4f} recomputed "
                        f"from the signed history with {kind}"))
            out.append((abs(indep - same) <= INDEPENDENT_TOLERANCE * same and loose >= same * (1 - 1e-6),
                        f"client {c}: independent {other} gives {indep:.4f} (within {INDEPENDENT_TOLERANCE:.0%}), "
                        f"RDP's looser bound {loose:.4f} >= {same:.4f}"))
        rows = adversaries({str(c): h for c, h in signed["history"].items()}, protocol=results["protocol"],
                           noise=plan.get("noise", "distributed"), min_survivors=plan.get("min_survivors") or 2,
                           threshold=(report.threat_model or {}).get("threshold"), clients=report.clients,
                           delta=plan["delta"], kind=kind,
                           neighbours=None)
        for mine, theirs in zip(rows, report.adversaries):
            out.append((_close(mine["epsilon"], theirs.epsilon, 1e-6),
                        f"{theirs.adversary}: epsilon {theirs.epsilon} in the report, {mine['epsilon']} recomputed"))
    auroc = results["auroc"].get("image")
    out.append((_close(report.utility.auroc_image, auroc), f"image AUROC {report.utility.auroc_image} as in the "
                f"signed results.json ({auroc})"))
    for row in report.utility.per_site:
        mine = next((c.get("auroc_image") for c in results["per_client"] if c["client"] == row["client"]), None)
        out.append((_close(row.get("this_run"), mine), f"site {row['client']}: AUROC {row.get('this_run')} as signed"))
    return out
