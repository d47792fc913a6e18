"""The privacy report of a run folder: ``report.json`` (for machines) and ``report.html`` (one
self-contained file, plots embedded as PNG data URIs, no network needed to view it).

It reads only what the run wrote (``results.json``, the ledgers, ``config.yaml`` and the run's
PNGs) and verifies the ledgers itself, so an auditor can regenerate it. A plot from the folder is
shown only if the server's ``run_end`` signed that very file (its SHA-256): one copied in or
changed after the run is left out, and the page says so in one line. It refuses a run whose
ledgers do not verify: the server's last ledger line signs results.json, the config, the privacy
state and the global memory, so an edited results.json is refused, and every DP figure is read from
the server's signed ``dp_plan`` and ``dp`` events (results.json is checked against them, field by
field). ``report.json`` carries ``schema`` and ``schema_version`` (docs/schemas/report.schema.json);
``fedsecmem audit check`` recomputes its figures independently.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from fedsecmem.audits.ledger import LEDGER_DIR, SERVER, check_privacy_states, events, sha256, verify_run
from fedsecmem.audits.mia import dp_auc_bound
from fedsecmem.audits.report_schema import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, Report

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


# A count below this is not printed (statistical disclosure control: a category with one image names it)
SMALL_CELL = 5
NOISE_STATEMENT = ("DP noise is drawn from the operating system's randomness, never from the seed: by design no "
                   "one, the operator included, can reproduce it, so a re-run gives other noise and other figures "
                   "within the stated guarantee.")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from None


def _this_run(records: list[dict], run_id: str) -> list[dict]:
    """The records of run ``run_id`` in a ledger that may hold earlier runs (from its last run_start)."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "run_start" and r.get("run_id") == run_id]
    return records[starts[-1]:] if starts else []


def verified_run(run_dir: Path, keys=None) -> tuple[dict, dict, dict[str, list[dict]]]:
    """results.json, the verification summary and every party's records of this run, or a
    ReportError naming why the run's figures cannot be backed by its signed ledgers."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise ReportError(f"no results.json in {run_dir}")
    results = _read_json(path)
    if not isinstance(results, dict) or "run_id" not in results or "privacy" not in results:
        raise ReportError(f"{path} is not a fedsecmem results file")
    states = check_privacy_states(run_dir)
    if states:  # named first: a state that does not read would be counted as less spent
        raise ReportError(f"{states[0]}; `fedsecmem audit verify {run_dir}` lists every problem")
    if not (run_dir / LEDGER_DIR).is_dir():
        raise ReportError(f"no ledgers in {run_dir}: the report takes its figures from the signed ledgers "
                          "(run with audit.ledger: true; a deployment's clients' ledgers are gathered with "
                          "`fedsecmem audit collect`)")
    v = verify_run(run_dir, keys)
    if not v.ok:
        raise ReportError(f"the ledgers do not verify ({len(v.problems)} problems; first: {v.problems[0]}); "
                          f"`fedsecmem audit verify {run_dir}` lists them")
    parties = {f.stem: _this_run(events(run_dir, f.stem), results["run_id"])
               for f in sorted((run_dir / LEDGER_DIR).glob("*.jsonl"))}
    return results, v.summary(), parties


def signed_privacy(results: dict, server: list[dict]) -> dict | None:
    """The run's DP figures from the server's signed events, checked against results.json (a
    mismatch is a ReportError naming the field)."""
    start = next(r for r in server if r["event"] == "run_start")
    if not (start.get("privacy") or {}).get("dp"):
        return None
    plan = next((r for r in server if r["event"] == "dp_plan"), None)
    dps = [r for r in server if r["event"] == "dp"]
    if plan is None:
        raise ReportError("the server's ledger has no dp_plan event: the noise used is not signed")
    last = dps[-1] if dps else {"epsilon": {}, "history": {}}
    eps = {int(c): e for c, e in last["epsilon"].items()}
    pv = results["privacy"]
    claimed = {"privacy.noise_multiplier": (pv.get("noise_multiplier"), plan["noise_multiplier"]),
               "privacy.delta": (pv.get("delta"), plan["delta"])}
    for c, e in eps.items():
        got = (pv.get("per_client") or [None] * (c + 1))
        claimed[f"privacy.per_client[{c}]"] = (got[c] if c < len(got) else None, e)
    finite = [e for e in eps.values() if e is not None]
    claimed["privacy.epsilon"] = (pv.get("epsilon"), max(finite) if finite and len(finite) == len(eps) else None)
    for field, (said, signed) in claimed.items():
        if not _same(said, signed):
            raise ReportError(f"results.json {field} = {said} but the server's signed ledger says {signed}")
    return {"plan": plan, "epsilon": eps, "history": {int(c): h for c, h in last.get("history", {}).items()},
            "per_round": [[r["epsilon"].get(str(c)) for c in sorted(eps)] for r in dps],
            "accountant": last.get("accountant", plan.get("accountant")), "rounds_charged": len(dps)}


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def _client_signed(parties: dict[str, list[dict]], n: int) -> list[float | None]:
    """Each client's own last signed epsilon (its own accountant), None where it kept none here."""
    out = []
    for c in range(n):
        dps = [r for r in parties.get(f"client-{c}", []) if r["event"] == "dp"]
        out.append(dps[-1].get("epsilon") if dps else None)
    return out


def group_privacy(epsilon: float | None, delta: float, k: int) -> dict:
    """What an (epsilon, delta) guarantee for one image gives a person with ``k`` images (group
    privacy): (k epsilon, k e^((k-1) epsilon) delta)."""
    if epsilon is None:
        return {"images": k, "epsilon": None, "delta": None}
    d = k * math.exp(min((k - 1) * epsilon, 700)) * delta
    return {"images": k, "epsilon": k * epsilon, "delta": min(d, 1.0)}


def _participant(row: dict, dp: bool = False) -> dict:
    """A site's counts for print: a count under ``SMALL_CELL`` is hidden, and then the row's other
    counts (the total too) are rounded to a multiple of it, so no hidden count can be recovered by
    subtracting the others from the total. Under DP every count is rounded (an exact count would tell
    whether one image was added; rounding coarsens, it is not DP), and a deployed site that kept its
    counts is shown as such."""
    if row.get("n_train") is None:
        return {"client": row["client"], "n_train": "kept by the site", "products": {}}
    products = {k: int(v) for k, v in (row.get("products") or {}).items()}
    total = int(row.get("n_train") or 0)
    if not dp and all(v >= SMALL_CELL for v in products.values()) and total >= SMALL_CELL:
        return {"client": row["client"], "n_train": total, "products": products}

    def rounded(v: int) -> int | str:
        return f"~{SMALL_CELL * round(v / SMALL_CELL)}" if v >= SMALL_CELL else f"<{SMALL_CELL}"

    return {"client": row["client"], "n_train": rounded(total), "products": {k: rounded(v) for k, v in products.items()}}


def _config_of(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ReportError(f"{path}: unreadable ({exc})") from None


# what decides the training split a site trains on: equal in a comparison run
_SAME_SPLIT = (("data",), ("clients",), ("seed",), ("audit", "leakage"), ("audit", "holdout_fraction"),
               ("privacy", "unit"))


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = (tree or {}).get(key) if isinstance(tree, dict) else None
    return tree


def _utility(results: dict, run_dir: Path, compare: list[Path], config: dict, keys=None) -> dict:
    """The run's AUROC per site beside each comparison run: each site alone (method local) and,
    where given, the run without DP. A comparison run must verify as this one does (its results
    signed) and train each site on the same images (same data, split, holdout, unit, sizes)."""
    rows = {c["client"]: {"client": c["client"], "this_run": c.get("auroc_image")} for c in results["per_client"]}
    sizes = {c["client"]: c.get("n_train") for c in results["per_client"]}
    runs = []
    for other in compare:
        try:
            r, _, _ = verified_run(Path(other), keys)
        except ReportError as exc:
            raise ReportError(f"--compare {other}: {exc}") from None
        oc = _config_of(Path(other))
        for key in _SAME_SPLIT:
            if _at(oc, key) != _at(config, key):
                raise ReportError(f"--compare {other}: its {'.'.join(key)} differs from this run's "
                                  "(not the same training images)")
        if {c["client"]: c.get("n_train") for c in r["per_client"]} != sizes:
            raise ReportError(f"--compare {other}: its sites hold other numbers of training images")
        label = "each site alone" if r.get("method") == "local" else (
            f"{r.get('method')} without DP" if not (r.get("privacy") or {}).get("dp") else f"{r.get('method')} with DP")
        runs.append({"label": label, "folder": str(other), "run_id": r.get("run_id"),
                     "auroc_image": r["auroc"].get("image")})
        for c in r["per_client"]:
            rows.setdefault(c["client"], {"client": c["client"]})[label] = c.get("auroc_image")
    alone = next((x["label"] for x in runs if x["label"] == "each site alone"), None)
    worse = []
    for row in rows.values():
        if alone and row.get("this_run") is not None and row.get(alone) is not None:
            row["gain_over_alone"] = row["this_run"] - row[alone]
            if row["gain_over_alone"] < 0:
                worse.append(row["client"])
    return {"auroc_image": results["auroc"].get("image"), "auroc_pixel": results["auroc"].get("pixel"),
            "primary_score": results["auroc"].get("primary_score"), "compared_with": runs,
            "per_site": [rows[c] for c in sorted(rows)], "sites_worse_by_joining": worse,
            "withheld": any(c.get("withheld") for c in results["per_client"])}


def _leakage_for(adversary: str | None, leakage: dict | None) -> dict | None:
    """The measured attack on the view that matches an adversary row (best attack's AUC)."""
    if not leakage or adversary is None:
        return None
    views = leakage.get("views", {})
    name = {"server": next((v for v in views if v.endswith("server")), None),
            "memory": "global_memory" if "global_memory" in views else None}[adversary]
    if name is None:
        return None
    best = max(views[name].items(), key=lambda kv: kv[1]["auc"])
    return {"view": name, "attack": best[0], "auc": best[1]["auc"], "auc_ci": best[1]["auc_ci"]}


def build_report(run_dir: Path, keys=None, compare: list[Path] = (), verified: tuple | None = None) -> dict:
    """``report.json``'s content for ``run_dir``: every privacy figure from the signed ledgers
    (verified with ``keys`` or keys.json); results.json must be the file the server signed.
    ``verified``: ``verified_run``'s answer when the caller already has it (not verified twice)."""
    from fedsecmem.audits.adversaries import adversaries
    from fedsecmem.audits.inventory import inventory

    run_dir = Path(run_dir)
    r, ledger, parties = verified if verified is not None else verified_run(run_dir, keys)
    ledger = {**ledger, "keys_source": ("the provisioned public keys given with --keys" if keys is not None else
                                        "the run folder's own ledger/keys.json: this shows the records are "
                                        "consistent, not who made them; compare its fingerprint with one kept "
                                        "elsewhere, or verify a deployment with --keys")}
    server = parties.get(SERVER) or []
    if not server:
        raise ReportError(f"the server's ledger holds no run {r['run_id']!r}")
    start = server[0]
    end = next((x for x in reversed(server) if x["event"] == "run_end"), {})
    config = _config_of(run_dir)
    n = r.get("clients", len(r.get("per_client", [])))
    signed = signed_privacy(r, server)
    pv = r["privacy"]
    threat = start.get("threat_model") or r.get("threat_model") or {}
    dropped = {x["round"]: x["dropped"] for x in r.get("per_round", []) if x.get("dropped")}
    unit = (signed["plan"].get("unit") if signed is not None else None) or "image"  # as signed before round 1
    dp: dict = {"enabled": signed is not None, "unit": unit}
    adv_rows: list[dict] = []
    if signed is not None:
        plan, eps = signed["plan"], signed["epsilon"]
        budget = plan.get("epsilon_budget")
        finite = [e for e in eps.values() if e is not None]
        worst = max(finite) if finite and len(finite) == len(eps) else None
        dp.update({
            "delta": plan["delta"], "noise_multiplier": plan["noise_multiplier"], "accountant": signed["accountant"],
            "epsilon_target": plan.get("epsilon_target"), "noise": plan.get("noise"), "sensitivity": plan.get("sensitivity"),
            "min_survivors": plan.get("min_survivors"), "releases_per_round": plan.get("releases_per_round"),
            "dp_sgd": plan.get("dp_sgd"), "epsilon_max": worst,
            "epsilon_per_client": [eps[c] for c in sorted(eps)],
            "epsilon_per_client_signed_by_client": _client_signed(parties, n),
            "epsilon_per_client_per_round": signed["per_round"], "history": {str(c): h for c, h in signed["history"].items()},
            "budget": budget, "budget_left": [None if e is None or budget is None else budget - e
                                              for e in (eps[c] for c in sorted(eps))],
            "stopped": pv.get("stopped"),
            "mechanism": f"Gaussian: DP-SGD of the memory generator (Opacus, one {unit} per sample) and "
                         "discrete-Gaussian noise on every k-means release",
            "source": "the server's signed dp_plan and dp events (and each client's own dp events)"})
        if unit == "image":
            dp["per_patient"] = [group_privacy(worst, plan["delta"], k) for k in (2, 5, 10)]
        secagg = ((config.get("secure") or {}).get("secagg") or {})
        if not signed["history"]:
            raise ReportError("the server's ledger has no dp event: no round's privacy was recorded")
        adv_rows = adversaries({str(c): h for c, h in signed["history"].items()}, protocol=r["protocol"],
                               noise=plan.get("noise", "distributed"), min_survivors=plan.get("min_survivors") or 2,
                               threshold=threat.get("threshold"), clients=n, delta=plan["delta"],
                               kind=signed["accountant"], neighbours=secagg.get("neighbours"), unit=unit)
        for row, view in zip(adv_rows, ("server", None, "memory")):  # no coalition view is measured
            row["measured_attack"] = _leakage_for(view, r.get("leakage"))
            row["dp_bound_auc"] = None if row["epsilon"] is None else dp_auc_bound(row["epsilon"], plan["delta"])
    files = {name: {"sha256": digest, "signed_in": "server run_end"} for name, digest in (end.get("files") or {}).items()}
    env = r.get("environment") or {}
    gov = config.get("governance") or {}
    cache = (config.get("output") or {}).get("embedding_cache")
    report = {
        "kind": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION,
        "run": {"name": r.get("name"), "run_id": r.get("run_id"), "method": r.get("method"),
                "benchmark": r.get("benchmark"), "rounds": r.get("rounds"), "folder": run_dir.resolve().name,
                "transport": (r.get("aggregation") or {}).get("transport", "in-process simulation"),
                "code_version": env.get("fedsecmem"), "commit": env.get("commit")},
        "participants": [_participant(c, signed is not None) for c in r.get("per_client", [])],
        "protocol": r.get("protocol"),
        "threat_model": threat,
        "dp": dp,
        "adversaries": adv_rows,
        "dropouts": dropped,
        "bytes": {"up_per_client": [sum(x) for x in r["comm"]["bytes_up"]],
                  "down_per_client": [sum(x) for x in r["comm"]["bytes_down"]]},
        "releases": inventory(server, signed is not None),
        "utility": _utility(r, run_dir, list(compare), config, keys),
        "ledger": ledger,
        "files": files,
        "leakage": r.get("leakage"),
        "reproducibility": {
            "code_version": env.get("fedsecmem"), "commit": env.get("commit"), "python": env.get("python"),
            "torch": env.get("torch"), "config_sha256": start.get("config_sha256"), "seed": r.get("seed"),
            "noise": NOISE_STATEMENT if signed is not None else None,
            "data_locations": [
                {"what": "the run folder: results, ledgers, global memory, privacy state, plots",
                 "where": f"the folder of this report ({run_dir.resolve().name})",
                 "delete": "remove the folder (keep the ledgers and this report if they are the audit record)"},
                {"what": "the embedding cache: backbone embeddings of every image (personal data where images are)",
                 "where": cache or "not kept (output.embedding_cache: null)",
                 "delete": "fedsecmem clean CONFIG" if cache else "nothing to delete"},
                {"what": "each site's model: its generator, its bank of training patches (its own; central: the "
                         "pooled bank), not covered by DP, the global memory and its threshold; the folder is never "
                         "sent (without DP a served site's evaluation row carries its threshold)",
                 "where": "models/client-<i>/ in this folder (in process); each client's own --out/models/client-<i> "
                          "when deployed",
                 "delete": "remove the site's model folder (its ledger keeps only the manifest's digest)"}]},
        "kept_at_sites": _kept_at_sites(parties, n),
        "governance": {k: gov.get(k) for k in ("controller", "processors", "legal_basis", "purpose", "contact",
                                                "retention")},
        "clients": n,
    }
    return Report.model_validate(report).model_dump(mode="json")


def _kept_html(kept: list[dict]) -> str:
    if not kept:
        return ""
    return ("<h3>Kept at each site, never sent</h3><p>Every site keeps its trained model (the detector it uses on "
            "new images). It holds the site's own training patches, which differential privacy does not cover, so it "
            "never leaves the site: it is not in the inventory above. Its manifest's digest is signed in the site's "
            "ledger; delete it by removing the folder.</p>"
            + _table(["site", "folder", "manifest SHA-256"],
                     [[k["site"], k["folder"], (k["manifest_sha256"] or "")[:16]] for k in kept]))


def _kept_at_sites(parties: dict[str, list[dict]], n: int) -> list[dict]:
    """Each site's model, from the ``model`` event its own ledger signs: kept at the site, never sent."""
    out = []
    for c in range(n):
        signed = [r for r in parties.get(f"client-{c}", []) if r.get("event") == "model"]
        if signed:
            out.append({"site": c, "manifest_sha256": signed[-1].get("manifest_sha256"),
                        "folder": signed[-1].get("folder"), "sent": False,
                        "holds": "training patches (the site's own; central: the pooled bank), not covered by DP, "
                                 "its generator, the global memory and its threshold"})
    return out


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _f(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _signed_plot(report: dict, run_dir: Path, name: str, alt: str) -> str:
    """The run folder's plot ``name``, embedded only if the server's run_end signed these very bytes
    (``report["files"]``, taken from the signed ledger); otherwise one line saying why it is not
    shown (nothing when there is no such file)."""
    path = Path(run_dir) / name
    if not path.is_file():
        return ""
    data = path.read_bytes()
    signed = (report.get("files") or {}).get(name)
    if signed is None:
        return (f"<p class=bad>Not shown: {html.escape(name)} is in the run folder but the server did not sign it "
                "when the run ended, so nothing shows it belongs to this run.</p>")
    if sha256(data) != signed.get("sha256"):
        return (f"<p class=bad>Not shown: {html.escape(name)} in the run folder is not the file the server signed "
                "when the run ended (it was changed afterwards).</p>")
    return _img(_png_uri(data), alt)


# After load, the page marks whether every image decoded and which sections have a rendered height
# (a headless browser check reads both).
_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', imgs.length + (ok ? ' ok' : ' broken'));
  var shown = Array.prototype.slice.call(document.querySelectorAll('section')).filter(function (s) {
    return s.getBoundingClientRect().height > 20; }).map(function (s) { return s.id; });
  document.body.setAttribute('data-sections', shown.join(' '));
});
</script>"""

_STYLE = """<style>
body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.ok{color:#16794c}.bad{color:#b00020}
figure{display:inline-block;margin:.5em}img{max-width:460px;border:1px solid #eee}code{background:#f5f5f5}
</style>"""


SECTIONS = (("summary", "Summary"), ("participants", "Who took part"), ("protocol", "Protocol and threat model"),
            ("dp", "Differential privacy"), ("adversaries", "Epsilon per adversary"),
            ("releases", "What crossed the wire"), ("utility", "Utility: joining against each site alone"),
            ("leakage", "Membership inference"), ("ledger", "Ledgers and signed files"),
            ("reproducibility", "Reproducibility and data"), ("governance", "Governance"))


def _section(key: str, body: str) -> str:
    title = dict(SECTIONS)[key]
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>'


def _eps(v) -> str:
    return "infinite (no guarantee)" if v is None else f"{v:.2f}"


def render_html(report: dict, run_dir: Path) -> str:
    run_dir = Path(run_dir)
    rn, dp, tm, u = report["run"], report["dp"], report["threat_model"] or {}, report["utility"]
    esc = html.escape
    out = {}
    head = (f"<h1>Privacy report: {esc(str(rn['name']))}</h1><p>{esc(str(rn['method']))} on "
            f"{esc(str(rn['benchmark']))}, {report['clients']} clients, {rn['rounds']} rounds, run "
            f"<code>{esc(str(rn['run_id']))}</code>, {esc(str(rn['transport']))}, fedsecmem "
            f"{esc(str(rn['code_version']))} (commit <code>{esc(str(rn['commit']))}</code>). Report schema "
            f"{esc(report['kind'])} v{report['schema_version']}.</p>")
    lg = report["ledger"]
    summary = [["ledgers", f"verified: {sum(lg['parties'].values())} lines from {len(lg['parties'])} parties"],
               ["privacy unit", f"one {dp['unit']}"]]
    if dp["enabled"]:
        summary.append(["epsilon (largest over clients, anyone who sees the global memory)",
                        f"{_eps(dp['epsilon_max'])} at delta {dp['delta']:g}"])
    else:
        summary.append(["differential privacy", "off: no formal guarantee"])
    if u["sites_worse_by_joining"]:
        summary.append(["sites that did worse by joining", ", ".join(map(str, u["sites_worse_by_joining"]))])
    out["summary"] = _table(["", ""], summary)
    parts = [_table(["client", "training images", "images per category"],
                    [[p["client"], p["n_train"], ", ".join(f"{k} {v}" for k, v in p["products"].items())]
                     for p in report["participants"]]),
             f"<p>Counts under {SMALL_CELL} are shown as &lt;{SMALL_CELL} (a small cell can single out a person), "
             f"and the other counts of such a site rounded to a multiple of {SMALL_CELL} (~) so the hidden one cannot "
             "be recovered by subtraction.</p>"]
    parts.append("<p>Dropouts: " + ("; ".join(f"round {r}: clients {c}" for r, c in report["dropouts"].items())
                                    if report["dropouts"] else "none") + ".</p>")
    out["participants"] = "".join(parts)
    out["protocol"] = _table(["", ""], [["protocol", report["protocol"]],
                                        ["what the server could see", tm.get("server_sees", "-")],
                                        ["what a coalition of the server and clients could see", tm.get("coalition_sees", "-")],
                                        ["differential privacy", tm.get("dp", "-")]])
    if dp["enabled"]:
        rows = [["privacy unit", f"one training {dp['unit']}"], ["mechanism", dp["mechanism"]],
                ["sensitivity of a release (L2, per unit)", _f(dp["sensitivity"])],
                ["noise multiplier (signed before round 1)", _f(dp["noise_multiplier"])],
                ["noise placement", dp["noise"]], ["accountant", dp["accountant"]], ["delta", dp["delta"]],
                ["target epsilon", dp["epsilon_target"]], ["budget", "-" if dp["budget"] is None else dp["budget"]],
                ["where these figures come from", dp["source"]]]
        if dp["stopped"]:
            rows.append(["stopped by the budget", f"before round {dp['stopped']['round']}"])
        parts = [_table(["", ""], rows)]
        parts.append(_table(["client", "epsilon (server's record)", "epsilon (client's own record)", "budget left"],
                            [[c, _eps(e), "-" if own is None else _f(own, ".2f"), _f(left, ".2f")]
                             for c, (e, own, left) in enumerate(zip(dp["epsilon_per_client"],
                                                                    dp["epsilon_per_client_signed_by_client"],
                                                                    dp["budget_left"]))]))
        if dp.get("per_patient"):
            parts.append("<p>The unit is one image. A patient with several images in a client's data is protected "
                         "as a group (group privacy), more weakly: " + "; ".join(
                             f"{g['images']} images: epsilon {_eps(g['epsilon'])}, delta {g['delta']:.2g}"
                             + (" (no guarantee left)" if g["delta"] is not None and g["delta"] >= 1 else "")
                             for g in dp["per_patient"] if g["epsilon"] is not None)
                         + ". Set <code>privacy.unit: patient</code> to protect each patient at the stated epsilon.</p>")
        png = _epsilon_plot(dp["epsilon_per_client_per_round"] or [], dp["budget"])
        if png:
            parts.append(_img(_png_uri(png), "epsilon per client per round"))
        out["dp"] = "".join(parts)
        rows = []
        for a in report["adversaries"]:
            m = a.get("measured_attack")
            rows.append([a["adversary"], f"{a['noise_share']:.2f}", _eps(a["epsilon"]), a["in_words"],
                         "-" if m is None else f"{m['auc']:.3f} ({m['attack']} on {m['view']})",
                         _f(a["dp_bound_auc"]), a["assumes"]])
        out["adversaries"] = ("<p>The same signed history, composed with the noise each adversary faces (share of "
                              "the calibrated release variance, worst case the protocol allows); DP-SGD noise stays "
                              "with the client and counts in full for everyone.</p>"
                              + _table(["adversary", "noise share", "epsilon", "what it allows",
                                        "measured attack AUC", "AUC the guarantee allows at most", "assumes"], rows))
    else:
        out["dp"] = "<p>Off: no formal guarantee; see the leakage measurement.</p>"
        out["adversaries"] = "<p>No differential privacy: no epsilon holds against any adversary.</p>"
    b = report["bytes"]
    out["releases"] = ("<p>Every message kind the server's signed ledger records, what it carries and who sees it."
                       "</p>" + _table(["stage", "direction", "messages", "MB", "carries", "from the images",
                                        "covered by DP", "seen by"],
                                       [[x["stage"], x["direction"], x["messages"], f"{x['bytes'] / 1e6:.3f}",
                                         x["carries"], {True: "yes", False: "no", None: "?"}[x["from_images"]],
                                         x["dp"], x["seen_by"]] for x in report["releases"]])
                       + _kept_html(report.get("kept_at_sites") or [])
                       + "<h3>Traffic per client</h3>"
                       + _table(["client", "MB sent", "MB received"],
                                [[c, f"{up / 1e6:.2f}", f"{down / 1e6:.2f}"]
                                 for c, (up, down) in enumerate(zip(b["up_per_client"], b["down_per_client"]))]))
    labels = [c["label"] for c in u["compared_with"]]
    parts = [f"<p>Image AUROC of this run ({esc(str(u['primary_score']))} score): <b>{_f(u['auroc_image'])}</b>; "
             f"pixel AUROC {_f(u['auroc_pixel'])}."
             + "".join(f" {esc(c['label'])}: {_f(c['auroc_image'])}." for c in u["compared_with"]) + "</p>"]
    if u["withheld"]:
        parts.append("<p>Under DP the clients kept their test scores to themselves (evaluation-client-*.json).</p>")
    head_row = ["site", "this run", *labels] + (["gain over alone"] if "each site alone" in labels else [])
    parts.append(_table(head_row, [[row["client"], _f(row.get("this_run")), *[_f(row.get(lab)) for lab in labels]]
                                   + ([f"{row['gain_over_alone']:+.3f}" if "gain_over_alone" in row else "-"]
                                      if "each site alone" in labels else []) for row in u["per_site"]]))
    if not labels:
        parts.append("<p>No comparison run was given (<code>audit report --compare LOCAL_RUN</code>): whether each "
                     "site gains by joining is not shown.</p>")
    elif u["sites_worse_by_joining"]:
        parts.append(f"<p class=bad>Sites {', '.join(map(str, u['sites_worse_by_joining']))} did worse by joining "
                     "than alone.</p>")
    else:
        parts.append("<p class=ok>No site did worse by joining than alone.</p>")
    parts.append(_signed_plot(report, run_dir, "auroc_per_round.png", "image AUROC per round"))
    out["utility"] = "".join(parts)
    lk = report["leakage"]
    if not lk:
        out["leakage"] = "<p>Not measured in this run (<code>audit.leakage: true</code> measures it).</p>"
    elif lk.get("measured") is False:
        out["leakage"] = f"<p>Not measured in this run: {esc(lk.get('reason', ''))}.</p>"
    else:
        fpr = lk.get("fpr", 0.01)
        rows = [[view, atk, f"{res['auc']:.3f} [{res['auc_ci'][0]:.3f}, {res['auc_ci'][1]:.3f}]",
                 f"{res[f'tpr_at_{fpr:g}_fpr']:.3f} [{res['tpr_ci'][0]:.3f}, {res['tpr_ci'][1]:.3f}]",
                 res["members"], res["nonmembers"]] for view, atks in lk["views"].items() for atk, res in atks.items()]
        parts = [f"<p>Members: training images; non-members: "
                 f"{esc(lk.get('nonmembers', 'images of the same distribution not trained on'))}. The attacker "
                 f"{esc(lk.get('attacker', ''))}; LiRA uses {lk.get('shadows')} shadow releases per client. 95% "
                 "bootstrap intervals; AUC 0.5 and TPR = FPR are chance.</p>",
                 _table(["view", "attack", "AUC", f"TPR at {fpr:g} FPR", "members", "non-members"], rows)]
        bound = lk.get("dp_bound")
        if bound:
            parts.append(f"<p>What (epsilon {bound['epsilon']:.2f}, delta {bound['delta']:g})-DP alone promises "
                         f"against any attack: AUC at most {bound['auc']:.4f}, TPR at {fpr:g} FPR at most "
                         f"{bound['tpr']:.4f}.</p>")
        parts.append(_signed_plot(report, run_dir, "leakage_roc.png", "membership inference ROC"))
        out["leakage"] = "".join(parts)
    out["ledger"] = (f"<p class=ok>verified: {sum(lg['parties'].values())} lines from {len(lg['parties'])} parties, "
                     f"{lg['messages_matched']} messages matched between clients and server; key fingerprint "
                     f"<code>{esc(str(lg['key_fingerprint']))}</code>. Every figure above is taken from, or checked "
                     "against, the signed records; the server's last line signs these files:</p>"
                     + _table(["file", "SHA-256"], [[k, v["sha256"]] for k, v in report["files"].items()]))
    rp = report["reproducibility"]
    out["reproducibility"] = (_table(["", ""], [["code", f"fedsecmem {rp['code_version']}, commit {rp['commit']}"],
                                                ["python / torch", f"{rp['python']} / {rp['torch']}"],
                                                ["config (SHA-256, signed)", rp["config_sha256"]], ["seed", rp["seed"]],
                                                ["noise", rp["noise"] or "-"]])
                              + _table(["data", "where", "how to delete"],
                                       [[d["what"], d["where"], d["delete"]] for d in rp["data_locations"]]))
    gov = report["governance"]
    out["governance"] = (_table(["", ""], [[k.replace("_", " "), v if v else "not stated"] for k, v in gov.items()])
                         + "<p>Filled in by the operator in the config's <code>governance</code> section.</p>")
    body = head + "".join(_section(key, out[key]) for key, _ in SECTIONS)
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>privacy report: {esc(str(rn['name']))}</title>{_STYLE}</head><body>"
            + body + _CHECK + "</body></html>")


def write_report(run_dir: Path, keys=None, compare: list[Path] = ()) -> tuple[Path, Path, dict]:
    """Write ``report.json`` and ``report.html`` into ``run_dir``; returns their paths and the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir, keys, compare)
    j, h = run_dir / REPORT_JSON, run_dir / REPORT_HTML
    j.write_text(json.dumps(report, indent=2))
    h.write_text(render_html(report, run_dir))
    return j, h, report
