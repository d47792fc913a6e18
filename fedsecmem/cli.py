"""Command line: ``fedsecmem run CONFIG [--out DIR] [--set key=value ...]``, ``fedsecmem table DIR ...``,
the deployment commands ``provision``, ``serve`` and ``join``, ``audit verify|report RUN_DIR``,
``sweep CONFIG``, and a site's own model: ``predict MODEL INPUT...``, ``export MODEL``.

Bad input ends with a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedsecmem.errors import UserError

__all__ = ["build_parser", "main", "print_comparison", "print_run_summary"]


TABLE_FIGURES_WIDTH = 150  # characters the comparison table's figure columns take beside the run names


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _mb(v: float) -> str:
    return f"{v / 1e6:.2f}"


def _epsilon(privacy: dict) -> str:
    """Epsilon spent as shown to people: '-' without DP, 'inf' with DP but no noise."""
    if not privacy.get("dp"):
        return "-"
    eps = privacy.get("epsilon")
    return "inf" if eps is None else f"{eps:.2f}"


def _leak(leakage: dict | None) -> str:
    """Strongest attack's AUC on the server's view and on the global memory, e.g. '0.53/0.52'."""
    if not leakage or leakage.get("measured") is False:
        return "-"
    views = leakage["views"]

    def best(names):
        aucs = [r["auc"] for n in names if n in views for r in views[n].values()]
        return f"{max(aucs):.2f}" if aucs else "-"

    return f"{best(('plain_server', 'plain_server_images', 'secagg_server'))}/{best(('global_memory',))}"


def print_run_summary(results: dict, out: Path) -> None:
    from rich.table import Table

    from fedsecmem.progress import console

    t = Table(title=f"{results['name']}: {results['method']} on {results['benchmark']} "
                    f"({results['clients']} clients, seed {results['seed']})")
    for col in ("client", "train imgs", "products", "test (anom)", "img AUROC (patch)",
                "img AUROC (kNN)", "pixel AUROC", "PRO"):
        t.add_column(col, justify="right" if col != "products" else "left")
    for r in results["per_client"]:
        top = sorted(r["products"].items(), key=lambda kv: -kv[1])
        prods = " ".join(f"{k[:6]}:{v}" for k, v in top[:3]) + (f" +{len(top) - 3}" if len(top) > 3 else "")
        if r.get("withheld"):  # a private deployment: the client kept its figures
            n_train = "kept" if r["n_train"] is None else str(r["n_train"])
            t.add_row(str(r["client"]), n_train, prods or "kept", str(r["n_test"]), "kept by the client", "", "", "")
            continue
        t.add_row(str(r["client"]), str(r["n_train"]), prods, f"{r['n_test']} ({r['n_test_anomalous']})",
                  _fmt(r["auroc_patch"]), _fmt(r["auroc_knn"]), _fmt(r["auroc_pixel"]), _fmt(r["pro"]))
    a = results["auroc"]
    t.add_row("mean", "", "", "", _fmt(a["image_patch_max"]), _fmt(a["image_knn"]), _fmt(a["pixel"]),
              _fmt(a["pro"]), style="bold")
    console.print(t)
    cats = a.get("per_category") or {}
    if any(row.get("auroc_image") is not None for row in cats.values()):  # each category scored on its own (MVTec AD's protocol), beside the per-client figures
        c = Table(title=f"per category ({a['primary_score']} score; kinds of doubtful label apart)")
        for col in ("category", "test imgs", "clients", "img AUROC", "pixel AUROC"):
            c.add_column(col, justify="left" if col == "category" else "right")
        for name, row in cats.items():
            c.add_row(name, str(row["n_test"]), str(row["clients"]), _fmt(row["auroc_image"]), _fmt(row.get("auroc_pixel")))
        c.add_row("mean", "", "", _fmt(a.get("category_mean_image")), _fmt(a.get("category_mean_pixel")), style="bold")
        uncertain = {k: v for k, v in (a.get("per_kind") or {}).items() if v.get("apart")}
        for kind, row in uncertain.items():
            c.add_row(f"{kind} vs normal", str(row["n_test"]), str(row["clients"]), _fmt(row["auroc_image"]), "-",
                      style="dim")
        console.print(c)
    agg = results.get("aggregation")
    if agg:
        from fedsecmem.privacy.threat_model import server_view

        console.print(f"protocol = {agg['protocol']}: {server_view(agg)}")
    pv = results["privacy"]
    eps = _epsilon(pv)
    if pv.get("dp"):
        eps += f" (delta {pv['delta']:g}, max over clients)"
        if pv.get("stopped"):
            console.print(f"[bold yellow]stopped by the privacy budget before round {pv['stopped']['round']}")
    lk = results.get("leakage")
    if lk and lk.get("measured") is False:
        console.print(f"membership inference not measured: {lk.get('reason')}", highlight=False)
    elif lk:
        best = ", ".join(f"{v} {max(r['auc'] for r in atks.values()):.3f}" for v, atks in lk["views"].items())
        console.print(f"membership inference AUC (strongest attack; 0.5 = nothing learned): {best}", highlight=False)
    dec = results.get("decisions") or {}
    if dec.get("sites_calibrated"):
        console.print(f"decisions at each site's own threshold (target FPR {dec['target_fpr']:g}, "
                      f"{dec['sites_calibrated']} sites): FPR {_fmt(dec['fpr'])}, TPR {_fmt(dec['tpr'])}, "
                      f"F1 {_fmt(dec['f1'])}; models in {out / 'models'}", highlight=False)
        if dec.get("caveat"):
            console.print(f"[yellow]thresholds on {results['benchmark']}: {dec['caveat']}", highlight=False)
    console.print(f"auroc.image ({a['primary_score']} score) = {_fmt(a['image'])}   "
                  f"epsilon = {'n/a (DP off)' if eps == '-' else eps}   "
                  f"wall = {results['wall_seconds']:.1f} s   results: {out / 'results.json'}")


def print_comparison(dirs: list[Path]) -> None:
    from rich.table import Table

    from fedsecmem.progress import console

    from fedsecmem.run.results import load_results

    t = Table(title="comparison")
    # a run's name is never cut (two runs of one method differ only by their folder): where the names do not
    # fit beside the figures, the table numbers the runs and the names are listed whole above it
    names = [str(d) for d in dirs]
    numbered = console.width < max(map(len, names)) + TABLE_FIGURES_WIDTH
    if numbered:
        for i, name in enumerate(names, 1):
            console.print(f"run {i}: {name}", highlight=False, markup=False, soft_wrap=True)
    t.add_column("run", justify="left", no_wrap=True, min_width=len(str(len(names))) if numbered else
                 max(map(len, names)))
    runs = [load_results(d if d.is_dir() else d.parent) for d in dirs]  # typed: a malformed file is one line
    for col, values in (("method", [r.method for r in runs]), ("protocol", [r.protocol for r in runs])):
        t.add_column(col, justify="left", no_wrap=True, min_width=max(map(len, values)))
    for col in ("img AUROC", "per category", "img AUROC (patch)", "img AUROC (kNN)",
                "pixel AUROC", "PRO", "MB up/client", "epsilon", "MIA AUC server/global", "wall s"):
        t.add_column(col, justify="right")
    for i, (d, r) in enumerate(zip(dirs, runs), 1):
        a = r.auroc
        mean_up = sum(sum(x) for x in r.comm.bytes_up) / max(1, len(r.comm.bytes_up))
        t.add_row(str(i) if numbered else str(d), r.method, r.protocol, _fmt(a.image), _fmt(a.category_mean_image), _fmt(a.image_patch_max),
                  _fmt(a.image_knn), _fmt(a.pixel), _fmt(a.pro), _mb(mean_up), _epsilon(r.privacy.model_dump()),
                  _leak(r.leakage), f"{r.wall_seconds:.0f}")
    console.print(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsecmem", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a configuration and write results.json")
    r.add_argument("config", help="YAML configuration file")
    r.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set clients.n=3 (repeatable)")
    tb = sub.add_parser("table", help="compare finished runs side by side")
    tb.add_argument("runs", nargs="+", help="run folders (or results.json files)")
    pv = sub.add_parser("provision", help="make a CA, server and client certificates and signing keys")
    pv.add_argument("--clients", type=int, required=True, help="number of clients")
    pv.add_argument("--out", required=True, help="folder to write (each party gets its own files and ca.pem)")
    pv.add_argument("--host", dest="hosts", action="append", default=[], metavar="NAME_OR_IP",
                    help="server host name or address for its certificate (repeatable; default localhost, 127.0.0.1)")
    pv.add_argument("--days", type=int, default=365, help="certificate validity")
    pv.add_argument("--force", action="store_true", help="replace an existing provisioning")
    pv.add_argument("--revoke", type=int, default=None, metavar="CLIENT_ID",
                    help="only add a client to the folder's revocation list")
    for name, helptext in (("serve", "serve a run to clients over gRPC with mutual TLS"),
                           ("join", "take part in a served run as one client")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", help="YAML configuration file (the same for server and clients)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (repeatable)")
        if name == "serve":
            s.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
            s.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
        else:
            s.add_argument("--client-id", type=int, required=True, help="this client's id (0..clients.n-1)")
            s.add_argument("--out", default=None, help="this client's folder for its ledger (default: runs/<name>)")
    bu = sub.add_parser("budget", help="a site's privacy budget over all its runs: show it, or reset it")
    busub = bu.add_subparsers(dest="budget_command", required=True)
    for name, helptext in (("show", "what this site's data has spent, per run and all runs composed"),
                           ("reset", "start a new budget (the old state is kept; the reset is signed in the ledger)")):
        b = busub.add_parser(name, help=helptext)
        b.add_argument("config", help="the YAML configuration the site joins with")
        b.add_argument("--client-id", type=int, required=True, help="this site's client id")
        b.add_argument("--out", default=None, help="the site's folder (its join --out; default: runs/<name>)")
        b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (repeatable)")
        if name == "reset":
            b.add_argument("--reason", required=True, help="why (signed in the site's ledger)")
            b.add_argument("--operator", required=True, help="who resets (signed in the site's ledger)")
    au = sub.add_parser("audit", help="verify a run's ledgers, write or check its privacy report")
    asub = au.add_subparsers(dest="audit_command", required=True)
    for name, helptext in (("verify", "check every ledger's chain and signatures and cross-check messages"),
                           ("report", "write report.html and report.json into the run folder"),
                           ("check", "recompute a report's figures from the signed ledgers, independently"),
                           ("collect", "copy a deployment's client ledgers into the server's run folder")):
        a = asub.add_parser(name, help=helptext)
        a.add_argument("run_dir", help="report.json (check) or run folder (with results.json and ledger/)")
        if name == "collect":
            a.add_argument("sources", nargs="+", help="each client's --out folder (or its ledger folder)")
            continue
        a.add_argument("--keys", default=None, metavar="PROVISION_DIR",
                       help="take the parties' public keys from this `fedsecmem provision` folder "
                            "(default: the run's ledger/keys.json)")
        if name == "report":
            a.add_argument("--compare", action="append", default=[], metavar="RUN_DIR",
                           help="a run of the same data and split to set beside this one (e.g. method local: "
                                "each site alone; the run without DP); repeatable")
    pr = sub.add_parser("predict", help="score new images with a site's model (decisions, overlays)")
    pr.add_argument("model", help="a site's model folder (e.g. runs/NAME/models/client-0)")
    pr.add_argument("inputs", nargs="+", help="image files or folders (recursive): PNG, JPEG, TIFF, BMP, DICOM, NIfTI")
    pr.add_argument("--out", default="predictions", help="output folder (default ./predictions; never an input folder)")
    pr.add_argument("--window", default=None, metavar="C,W",
                    help="VOI window center,width for DICOM and 16-bit images (default: the training data's "
                         "data.window, else each file's own)")
    pr.add_argument("--axis", type=int, default=None, help="NIfTI axis to slice along (0, 1 or 2; default: the "
                                                           "training data's data.slice_axis, 2)")
    pr.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    pr.add_argument("--no-overlays", action="store_true", help="write predictions only, no overlay PNGs")
    pr.add_argument("--weights", default=None, help="the backbone weights file, if moved since training "
                                                    "(its SHA-256 must match the model's)")
    ex = sub.add_parser("export", help="write a site's model as one ONNX graph for onnxruntime")
    ex.add_argument("model", help="a site's model folder")
    ex.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    ex.add_argument("--out", default=None, help="output file (default MODEL/model.onnx)")
    ex.add_argument("--chunk", type=int, default=None, help="memory items per distance block (default: automatic)")
    sa = sub.add_parser("samples", help="write some test images of a config's data as PNGs, to try predict on")
    sa.add_argument("config", help="YAML configuration file")
    sa.add_argument("--client", type=int, default=0, help="whose test images (default 0)")
    sa.add_argument("--n", type=int, default=6, help="how many (half normal, half anomalous; default 6)")
    sa.add_argument("--out", required=True, help="folder to write")
    sa.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    sc = sub.add_parser("schema", help="write the JSON Schemas of results.json and report.json")
    sc.add_argument("--out", default="docs/schemas", help="folder (default docs/schemas)")
    cl = sub.add_parser("clean", help="delete a config's embedding cache (image embeddings kept on disk)")
    cl.add_argument("config", help="YAML configuration file (its output.embedding_cache is emptied)")
    cl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (repeatable)")
    sw = sub.add_parser("sweep", help="leakage against utility over epsilons and protocols")
    sw.add_argument("config", help="YAML configuration file (method feddymem)")
    sw.add_argument("--epsilons", default="1,2,4,8,inf", help="comma-separated; inf = DP off")
    sw.add_argument("--protocols", default="plain,secagg", help="comma-separated, of plain, secagg, ckks")
    sw.add_argument("--out", default=None, help="output folder (default: runs/sweep-<name>)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value in every run (repeatable)")
    sw.add_argument("--inf-set", dest="inf_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value in the runs without DP only, e.g. a larger global memory")
    sw.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess",
                    help="run the sweep's runs one after another here, or as Ray tasks")
    sw.add_argument("--address", default="", help="with --backend ray: an existing cluster (default: a local Ray)")
    return p


def _keys_from(provision_dir: str | None, run_dir: Path):
    """Public keys of the run's parties from a provisioning folder, or None (use keys.json)."""
    if provision_dir is None:
        return None
    from fedsecmem.audits.ledger import LEDGER_DIR
    from fedsecmem.crypto.pki import ProvisioningError, verify_key

    try:
        return {f.stem: verify_key(Path(provision_dir), f.stem) for f in sorted((run_dir / LEDGER_DIR).glob("*.jsonl"))}
    except ProvisioningError as exc:
        raise UserError(f"--keys: {exc}") from None


def _budget(args) -> None:
    from fedsecmem.config import load_config
    from fedsecmem.deployment.site_budget import budget_status, reset_budget
    from fedsecmem.progress import console

    cfg = load_config(args.config, args.overrides)
    if not 0 <= args.client_id < cfg.clients.n:
        raise UserError(f"--client-id: {args.client_id} is not one of the config's clients 0..{cfg.clients.n - 1}")
    folder = Path(args.out) if args.out else Path("runs") / cfg.name
    if args.budget_command == "reset":
        done = reset_budget(cfg, args.client_id, folder, args.reason, args.operator)
        console.print(f"client {args.client_id}: budget reset after epsilon {done['epsilon_spent']:.3f} over "
                      f"{done['runs']} runs; the old state is kept as {done['kept_file']}; signed in its ledger",
                      highlight=False)
        return
    st = budget_status(cfg, args.client_id, folder)
    for r in st["runs"]:
        console.print(f"run {r['run_id']}: epsilon {r['epsilon']:.3f} (data {str(r['data_sha256'])[:12]})",
                      highlight=False)
    limit = "none" if st["limit"] is None else f"{st['limit']:g}"
    console.print(f"client {args.client_id}: epsilon {st['epsilon']:.3f} at delta {st['delta']:g} over "
                  f"{len(st['runs'])} runs; limit {limit}", highlight=False)


def _audit(args) -> int:
    from fedsecmem.audits.report import ReportError
    from fedsecmem.progress import console

    if args.audit_command == "check":
        from fedsecmem.audits.check import check_report

        report = Path(args.run_dir)
        report = report / "report.json" if report.is_dir() else report
        try:
            lines = check_report(report, _keys_from(args.keys, report.parent))
        except ReportError as exc:
            raise UserError(f"audit check: {exc}") from None
        for ok, line in lines:
            console.print(("ok   " if ok else "FAIL ") + line, style=None if ok else "bold red", markup=False,
                          highlight=False)
        failed = sum(not ok for ok, _ in lines)
        console.print(f"{len(lines) - failed} checks passed, {failed} failed", highlight=False)
        return 0 if failed == 0 else 1
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"audit: no run folder {run_dir}")
    if args.audit_command == "collect":
        from fedsecmem.audits.ledger import collect

        try:
            done = collect(run_dir, [Path(s) for s in args.sources])
        except ValueError as exc:
            raise UserError(f"audit collect: {exc}") from None
        console.print(f"collected {len(done)} ledgers into {run_dir / 'ledger'}: {', '.join(done) or 'none new'}",
                      highlight=False)
        return 0
    keys = _keys_from(args.keys, run_dir)
    if args.audit_command == "verify":
        from fedsecmem.audits.ledger import verify_run

        v = verify_run(run_dir, keys)
        for p in v.problems:
            console.print(str(p), style="bold red", markup=False, highlight=False)
        if v.binding:
            console.print(v.binding, markup=False, highlight=False)
        lines = sum(v.parties.values())
        if v.ok:
            console.print(f"ledgers verified: {len(v.parties)} parties, {lines} lines, {v.messages_matched} "
                          f"messages matched; key fingerprint {v.key_fingerprint}", highlight=False)
            return 0
        console.print(f"[bold red]ledger verification FAILED: {len(v.problems)} problems", highlight=False)
        return 1
    from fedsecmem.audits.report import write_report
    from fedsecmem.run.results import load_results

    load_results(run_dir)  # the report reads a results file of this schema (a one-line error otherwise)
    for other in args.compare:
        load_results(other)
    try:
        j, h, report = write_report(run_dir, keys, [Path(c) for c in args.compare])
    except ReportError as exc:
        raise UserError(f"audit report: {exc}") from None
    eps = report["dp"].get("epsilon_max")
    console.print(f"privacy report: {h} (ledgers verified; epsilon {'-' if eps is None else f'{eps:.2f}'} "
                  f"from the signed records); data: {j}", highlight=False)
    return 0


def _schema(out: Path) -> None:
    """docs/schemas/{results,report}.schema.json from the typed models."""
    from fedsecmem.audits.report_schema import Report
    from fedsecmem.run.results import Results

    out.mkdir(parents=True, exist_ok=True)
    for name, model in (("results", Results), ("report", Report)):
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}/results.schema.json and {out}/report.schema.json")


def _clean(args) -> None:
    from fedsecmem.config import load_config
    from fedsecmem.detector.embedding_cache import clean_cache

    cfg = load_config(args.config, args.overrides)
    folder = cfg.output.embedding_cache
    if folder is None:
        print("output.embedding_cache is null: nothing is kept on disk")
        return
    files, size = clean_cache(folder)
    print(f"removed {files} cache files ({size / 1e6:.1f} MB) from {folder}")


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        center, width = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--window: expected CENTER,WIDTH (e.g. 40,400), got {text!r}") from None
    if width <= 0:
        raise UserError(f"--window: width must be positive, got {width:g}")
    return center, width


def _predict(args) -> int:
    from fedsecmem.model.predict import predict_files
    from fedsecmem.progress import console

    done = predict_files(Path(args.model), [Path(p) for p in args.inputs], Path(args.out), args.batch_size,
                         _window(args.window), args.axis, not args.no_overlays, weights=args.weights)
    for row in done.rows:
        if row["error"] is not None:
            continue
        where = row["path"] + ("" if row["frame"] is None else f" [{row['frame']}]")
        verdict = row["decision"] or "-"
        norm = "" if row["normalized"] is None else f"  normalized {row['normalized']:.2f}"
        console.print(f"{verdict:>9}  score {row['score']:.3f}{norm}  {where}", highlight=False, markup=False)
    console.print(f"model signed in {done.signed}" if done.signed else
                  "model outside its run folder: checked against its own manifest's digests only", highlight=False)
    scored = len(done.rows) - len(done.failed)
    flagged = sum(r["decision"] == "anomalous" for r in done.rows)
    console.print(f"{scored} images scored, {flagged} anomalous, {len(done.failed)} unreadable; "
                  f"{done.out / 'predictions.csv'}", highlight=False)
    return 1 if done.failed else 0


def _export(args) -> None:
    from fedsecmem.model.export import export_onnx

    out = Path(args.out) if args.out else Path(args.model) / "model.onnx"
    info = export_onnx(Path(args.model), out, chunk=args.chunk)
    print(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB; input {info['input']}, outputs {', '.join(info['outputs'])})")


def _samples(args) -> None:
    from fedsecmem.config import load_config
    from fedsecmem.run.samples import write_samples

    written = write_samples(load_config(args.config, args.overrides), args.client, args.n, Path(args.out))
    print(f"wrote {len(written)} test images of client {args.client} to {args.out}")


def _provision(args) -> None:
    from fedsecmem.crypto.pki import ProvisioningError, provision, revoke

    try:
        if args.revoke is not None:
            revoke(Path(args.out), args.revoke)
            print(f"client-{args.revoke} revoked in {args.out}/revoked.json")
            return
        done = provision(Path(args.out), args.clients, args.hosts or ("localhost", "127.0.0.1"), args.days,
                         args.force)
    except ProvisioningError as exc:
        raise UserError(f"provision: {exc}") from None
    print(f"provisioned {done.clients} clients for {', '.join(done.hosts)} in {done.directory} "
          f"(keep ca.key offline; give each party its own .key/.pem/.sign.key and ca.pem)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from fedsecmem.config import load_config
            from fedsecmem.run.runner import run

            cfg = load_config(args.config, args.overrides)
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            if cfg.execution.backend == "ray":
                from fedsecmem.deployment.ray_backend import run_on_ray

                results = run_on_ray(cfg, out)
            else:
                results = run(cfg, out)
            print_run_summary(results, out)
        elif args.command == "table":
            print_comparison([Path(d) for d in args.runs])
        elif args.command == "provision":
            _provision(args)
        elif args.command == "serve":
            from fedsecmem.config import load_config
            from fedsecmem.deployment.serve import serve

            cfg = load_config(args.config, args.overrides)
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            results = serve(cfg, out, args.resume)
            print_run_summary(results, out)
        elif args.command == "join":
            from fedsecmem.config import load_config
            from fedsecmem.deployment.join import join

            join(load_config(args.config, args.overrides), args.client_id, Path(args.out) if args.out else None)
        elif args.command == "budget":
            _budget(args)
        elif args.command == "audit":
            return _audit(args)
        elif args.command == "predict":
            return _predict(args)
        elif args.command == "export":
            _export(args)
        elif args.command == "samples":
            _samples(args)
        elif args.command == "schema":
            _schema(Path(args.out))
        elif args.command == "clean":
            _clean(args)
        elif args.command == "sweep":
            from fedsecmem.run.sweep import sweep_command

            sweep_command(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
