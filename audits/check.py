"""``fedsecmem audit check REPORT``: a report's numbers against the signed records, recomputed.

The checker trusts nothing the report says. From the run folder the report sits in it verifies the
ledgers, reads each client's signed mechanism history (the server's last ``dp`` event), and:

- recomputes every client's epsilon with the accountant the run used (must agree to 1e-6) and with an
  independent implementation from another library (for PLD, dp_accounting's, Opacus' PRV: agree
  within ``INDEPENDENT_TOLERANCE``; and Opacus' RDP, a looser sound bound, must not be below it);
- rebuilds the whole report from the signed records (and the comparison runs it names, verified in
  turn) and requires report.json to equal it field by field and report.html to be the page
  rendered from it (so no figure, sentence or plot in either can be edited);
- reports each check as a line; any failure makes the exit code 1.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from pydantic import ValidationError

from fedsecmem.audits.accountant import epsilon_of, step_of
from fedsecmem.audits.report import REPORT_HTML, ReportError, build_report, render_html, signed_privacy, verified_run
from fedsecmem.audits.report_schema import Report

__all__ = ["INDEPENDENT_TOLERANCE", "check_report"]

# PLD (pessimistic) and PRV estimate the same optimal curve by different numerics: 3% apart at most
INDEPENDENT_TOLERANCE = 0.03
_INDEPENDENT = {"pld": "prv", "prv": "pld", "rdp": "pld"}


def _close(a: float | None, b: float | None, rel: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rel * max(1.0, abs(b))


def _diff(a, b, path: str = "") -> list[str]:
    """The paths where two JSON documents differ (numbers compared to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            out += [where] if (key in a) != (key in b) else _diff(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [path]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if _close(float(a), float(b), 1e-9) else [path]
    return [] if a == b else [path]


def check_report(path: Path, keys=None) -> list[tuple[bool, str]]:
    """Every check of ``path`` (report.json, with report.html beside it) as (passed, line)."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"no report at {path}")
    try:
        report = Report.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ReportError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    run_dir = path.parent
    verified = verified_run(run_dir, keys)
    results, _, parties = verified
    out: list[tuple[bool, str]] = [(True, f"ledgers of run {results['run_id']} verified")]
    if report.run.run_id != results["run_id"]:
        out.append((False, f"the report is of run {report.run.run_id}, the folder holds run {results['run_id']}"))
        return out
    signed = signed_privacy(results, parties["server"])
    if signed is not None:  # every client's epsilon, recomputed from its signed history, twice
        plan = signed["plan"]
        kind, other = signed["accountant"], _INDEPENDENT[signed["accountant"]]
        for c, hist in sorted(signed["history"].items()):
            steps = [step_of(entry) for entry in hist]
            with warnings.catch_warnings():  # Opacus' PRV warns on log(0) at its grid's edge: harmless
                warnings.simplefilter("ignore", RuntimeWarning)
                same = epsilon_of(steps, plan["delta"], kind)
                indep = epsilon_of(steps, plan["delta"], other)
                loose = epsilon_of(steps, plan["delta"], "rdp")
            said = report.dp.epsilon_per_client[c] if c < len(report.dp.epsilon_per_client) else None
            said = math.inf if said is None else said
            out.append((_close(said, same), f"client {c}: epsilon {said:.4f} in the report, {same:.4f} recomputed "
                        f"from the signed history with {kind}"))
            out.append((abs(indep - same) <= INDEPENDENT_TOLERANCE * same and loose >= same * (1 - 1e-6),
                        f"client {c}: independent {other} gives {indep:.4f} (within {INDEPENDENT_TOLERANCE:.0%}), "
                        f"RDP's looser bound {loose:.4f} >= {same:.4f}"))
    # every other figure: the report rebuilt from the signed records must be this one, field by field
    rebuilt = build_report(run_dir, keys, [Path(c.folder) for c in report.utility.compared_with], verified)
    diffs = _diff(rebuilt, json.loads(path.read_text()))
    out.append((not diffs, "report.json is the report rebuilt from the signed records" if not diffs else
                f"report.json differs from the report rebuilt from the signed records at {len(diffs)} fields: "
                + ", ".join(diffs[:8])))
    html = run_dir / REPORT_HTML
    if html.is_file():
        same_html = html.read_text() == render_html(rebuilt, run_dir)
        out.append((same_html, f"{REPORT_HTML} {'is' if same_html else 'is not'} the page rendered from them"))
    else:
        out.append((False, f"no {REPORT_HTML} beside the report"))
    return out
