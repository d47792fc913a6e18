"""The privacy report of a run folder: ``report.json`` (for machines) and ``report.html`` (one
self-contained file, plots embedded as PNG data URIs, no network needed to view it).

It reads only what the run wrote (``results.json``, the ledgers and the run's
PNGs) and verifies the ledgers itself, so an auditor can regenerate it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from fedsecmem.audits.ledger import events, verify_run

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


class ReportError(ValueError):
    """The folder is not a run folder the report can be made from."""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _epsilon_plot(per_client_per_round: list[list[float | None]], budget: float | None) -> bytes | None:
    if not per_client_per_round:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    rounds = list(range(1, len(per_client_per_round) + 1))
    for c in range(len(per_client_per_round[0])):
        ys = [row[c] if row[c] is not None else float("nan") for row in per_client_per_round]
        ax.plot(rounds, ys, marker="o", label=f"client {c}")
    if budget is not None:
        ax.axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (cumulative)")
    ax.set_xticks(rounds)
    ax.set_title("privacy spent per client")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def build_report(run_dir: Path, keys=None) -> dict:
    """``report.json``'s content for ``run_dir`` (ledgers verified with ``keys`` or keys.json)."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(f"no results.json in {run_dir}")
    try:
        r = json.loads(path.read_text())
        pv, comm = r["privacy"], r["comm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReportError(f"{path} is not a fedsecmem results file ({exc})") from None
    ledger = verify_run(run_dir, keys).summary() if (run_dir / "ledger").is_dir() else None
    start = events(run_dir, "server", "run_start")
    threat = r.get("threat_model") or (start[0].get("threat_model") if start else None)
    n = r.get("clients", len(r.get("per_client", [])))
    budget = pv.get("epsilon_budget")
    per_client_eps = pv.get("per_client") or []
    rounds = r.get("per_round", [])
    dropped = {x["round"]: x["dropped"] for x in rounds if x.get("dropped")}
    report = {
        "run": {"name": r.get("name"), "run_id": r.get("run_id") or (r.get("deployment") or {}).get("run_id"),
                "method": r.get("method"), "benchmark": r.get("benchmark"), "rounds": r.get("rounds"),
                "transport": (r.get("aggregation") or {}).get("transport", "in-process simulation"),
                "code_version": (r.get("environment") or {}).get("fedsecmem")},
        "participants": [{"client": c["client"], "n_train": c.get("n_train"), "products": c.get("products")}
                         for c in r.get("per_client", [])],
        "protocol": r.get("protocol"),
        "threat_model": threat,
        "dp": {"enabled": bool(pv.get("dp")), "delta": pv.get("delta"), "epsilon_max": pv.get("epsilon"),
               "epsilon_per_client": per_client_eps, "epsilon_per_client_per_round": pv.get("per_client_per_round"),
               "budget": budget,
               "budget_left": ([None if e is None else budget - e for e in per_client_eps]
                               if budget is not None else None),
               "mechanism": ("Gaussian: DP-SGD of the memory generator (Opacus, one image per sample) and "
                             "discrete-Gaussian noise on every k-means release" if pv.get("dp") else None),
               "sensitivity": pv.get("sensitivity"), "noise_multiplier": pv.get("noise_multiplier"),
               "noise": pv.get("noise"), "accountant": pv.get("accountant"), "stopped": pv.get("stopped"),
               "unit": "one training image"},
        "dropouts": dropped,
        "bytes": {"up_per_client": [sum(x) for x in comm["bytes_up"]],
                  "down_per_client": [sum(x) for x in comm["bytes_down"]]},
        "utility": {"auroc_image": r["auroc"].get("image"), "auroc_pixel": r["auroc"].get("pixel"),
                    "primary_score": r["auroc"].get("primary_score")},
        "ledger": ledger,
        "leakage": r.get("leakage"),
        "clients": n,
    }
    return report


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


# After load, the page marks whether every image decoded (a headless browser check reads it).
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', imgs.length + (ok ? ' ok' : ' broken'));
});
</script>"""

_STYLE = """<style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.ok{color:#16794c}.bad{color:#b00020}
figure{display:inline-block;margin:.5em}img{max-width:460px;border:1px solid #eee}code{background:#f5f5f5}
</style>"""


def render_html(report: dict, run_dir: Path) -> str:
    run_dir = Path(run_dir)
    rn, dp, tm = report["run"], report["dp"], report["threat_model"] or {}
    parts = [f"<h1>Privacy report: {html.escape(str(rn['name']))}</h1>",
             f"<p>{html.escape(str(rn['method']))} on {html.escape(str(rn['benchmark']))}, "
             f"{report['clients']} clients, {rn['rounds']} rounds, run <code>{html.escape(str(rn['run_id']))}</code>, "
             f"{html.escape(str(rn['transport']))}, fedsecmem {html.escape(str(rn['code_version']))}.</p>"]
    parts.append("<h2>Who took part</h2>" + _table(
        ["client", "training images", "products"],
        [[p["client"], p["n_train"], ", ".join(f"{k} {v}" for k, v in (p["products"] or {}).items())]
         for p in report["participants"]]))
    if report["dropouts"]:
        parts.append("<p>Dropouts: " + "; ".join(f"round {r}: clients {c}" for r, c in report["dropouts"].items())
                     + "</p>")
    else:
        parts.append("<p>No client dropped out.</p>")
    parts.append("<h2>Protocol and threat model</h2>" + _table(
        ["", ""], [["protocol", report["protocol"]], ["what the server could see", tm.get("server_sees", "-")],
                   ["what a coalition of the server and clients could see", tm.get("coalition_sees", "-")],
                   ["differential privacy", tm.get("dp", "-")]]))
    parts.append("<h2>Differential privacy</h2>")
    if dp["enabled"]:
        rows = [["privacy unit", dp["unit"]], ["mechanism", dp["mechanism"]],
                ["sensitivity of a release (L2, per image)", _f(dp["sensitivity"])],
                ["noise multiplier", _f(dp["noise_multiplier"])], ["noise placement", dp["noise"]],
                ["accountant", dp["accountant"]], ["delta", dp["delta"]],
                ["epsilon (max over clients)", _f(dp["epsilon_max"], ".2f")],
                ["budget", "-" if dp["budget"] is None else dp["budget"]]]
        if dp["stopped"]:
            rows.append(["stopped by the budget", f"before round {dp['stopped']['round']}"])
        parts.append(_table(["", ""], rows))
        parts.append(_table(["client", "epsilon spent", "budget left"],
                            [[c, _f(e, ".2f"), _f((dp["budget_left"] or [None] * (c + 1))[c], ".2f")]
                             for c, e in enumerate(dp["epsilon_per_client"])]))
        png = _epsilon_plot(dp["epsilon_per_client_per_round"] or [], dp["budget"])
        if png:
            parts.append(_img(_png_uri(png), "epsilon per client per round"))
    else:
        parts.append("<p>Off: no formal guarantee; see the leakage measurement below.</p>")
    b = report["bytes"]
    parts.append("<h2>Traffic</h2>" + _table(["client", "MB sent", "MB received"],
                                              [[c, f"{u / 1e6:.2f}", f"{d / 1e6:.2f}"] for c, (u, d) in
                                               enumerate(zip(b["up_per_client"], b["down_per_client"]))]))
    u = report["utility"]
    parts.append(f"<h2>Utility</h2><p>Image AUROC ({html.escape(str(u['primary_score']))} score): "
                 f"<b>{_f(u['auroc_image'])}</b>; pixel AUROC: {_f(u['auroc_pixel'])}.</p>")
    curve = run_dir / "auroc_per_round.png"
    if curve.is_file():
        parts.append(_img(_png_uri(curve.read_bytes()), "image AUROC per round"))
    lg = report["ledger"]
    parts.append("<h2>Ledgers</h2>")
    if lg is None:
        parts.append("<p class=bad>No ledgers in this run folder.</p>")
    else:
        verdict = ("<span class=ok>verified</span>" if lg["ok"] else
                   f"<span class=bad>FAILED: {len(lg['problems'])} problems</span>")
        parts.append(f"<p>{verdict}: {sum(lg['parties'].values())} lines from {len(lg['parties'])} parties, "
                     f"{lg['messages_matched']} messages matched between clients and server; "
                     f"key fingerprint <code>{html.escape(str(lg['key_fingerprint']))}</code>.</p>")
        if lg["problems"]:
            parts.append("<ul>" + "".join(f"<li>{html.escape(p)}</li>" for p in lg["problems"][:50]) + "</ul>")
    lk = report["leakage"]
    parts.append("<h2>Membership inference</h2>")
    if not lk:
        parts.append("<p>Not measured in this run (<code>audit.leakage: true</code> measures it).</p>")
    else:
        fpr = lk.get("fpr", 0.01)
        rows = []
        for view, atks in lk["views"].items():
            for atk, res in atks.items():
                rows.append([view, atk, f"{res['auc']:.3f} [{res['auc_ci'][0]:.3f}, {res['auc_ci'][1]:.3f}]",
                             f"{res[f'tpr_at_{fpr:g}_fpr']:.3f} [{res['tpr_ci'][0]:.3f}, {res['tpr_ci'][1]:.3f}]",
                             res["members"], res["nonmembers"]])
        parts.append(f"<p>Members: training images; non-members: "
                     f"{html.escape(lk.get('nonmembers', 'images of the same distribution not trained on'))}. "
                     f"The attacker {html.escape(lk.get('attacker', ''))}; LiRA uses {lk.get('shadows')} shadow "
                     f"releases per client. 95% bootstrap intervals; AUC 0.5 and TPR = FPR are chance.</p>")
        parts.append(_table(["view", "attack", "AUC", f"TPR at {fpr:g} FPR", "members", "non-members"], rows))
        bound = lk.get("dp_bound")
        if bound:
            parts.append(f"<p>What (epsilon {bound['epsilon']:.2f}, delta {bound['delta']:g})-DP alone promises "
                         f"against any attack: AUC at most {bound['auc']:.4f}, TPR at {fpr:g} FPR at most "
                         f"{bound['tpr']:.4f}.</p>")
        roc = run_dir / "leakage_roc.png"
        if roc.is_file():
            parts.append(_img(_png_uri(roc.read_bytes()), "membership inference ROC"))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>privacy report: {html.escape(str(rn['name']))}</title>{_STYLE}</head><body>"
            + "\n".join(parts) + _CHECK + "</body></html>")


def write_report(run_dir: Path, keys=None) -> tuple[Path, Path, dict]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; returns their paths and the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, keys)
    j, h = run_dir / REPORT_JSON, run_dir / REPORT_HTML
    j.write_text(json.dumps(report, indent=2))
    h.write_text(render_html(report, run_dir))
    return j, h, report
