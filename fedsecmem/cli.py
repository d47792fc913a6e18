"""Command line: ``fedsecmem run CONFIG [--out DIR] [--set key=value ...]``, ``fedsecmem table DIR ...``,
and the deployment commands ``provision``, ``serve`` and ``join``.

Bad input ends with a one-line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedsecmem.errors import UserError


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
        t.add_row(str(r["client"]), str(r["n_train"]), prods, f"{r['n_test']} ({r['n_test_anomalous']})",
                  _fmt(r["auroc_patch"]), _fmt(r["auroc_knn"]), _fmt(r["auroc_pixel"]), _fmt(r["pro"]))
    a = results["auroc"]
    t.add_row("mean", "", "", "", _fmt(a["image_patch_max"]), _fmt(a["image_knn"]), _fmt(a["pixel"]),
              _fmt(a["pro"]), style="bold")
    console.print(t)
    agg = results.get("aggregation")
    if agg:
        from fedsecmem.aggregation import server_view

        console.print(f"protocol = {agg['protocol']}: {server_view(agg)}")
    pv = results["privacy"]
    eps = _epsilon(pv)
    if pv.get("dp"):
        eps += f" (delta {pv['delta']:g}, max over clients)"
        if pv.get("stopped"):
            console.print(f"[bold yellow]stopped by the privacy budget before round {pv['stopped']['round']}")
    console.print(f"auroc.image ({a['primary_score']} score) = {_fmt(a['image'])}   "
                  f"epsilon = {'n/a (DP off)' if eps == '-' else eps}   "
                  f"wall = {results['wall_seconds']:.1f} s   results: {out / 'results.json'}")


def print_comparison(dirs: list[Path]) -> None:
    from rich.table import Table

    from fedsecmem.progress import console

    t = Table(title="comparison")
    for col in ("run", "method", "protocol", "img AUROC", "img AUROC (patch)", "img AUROC (kNN)",
                "pixel AUROC", "PRO", "MB up/client", "epsilon", "wall s"):
        t.add_column(col, justify="left" if col in ("run", "method", "protocol") else "right")
    for d in dirs:
        path = d / "results.json" if d.is_dir() else d
        if not path.is_file():
            raise UserError(f"table: no results.json at {path}")
        try:
            r = json.loads(path.read_text())
            a = r["auroc"]
            up = r["comm"]["bytes_up"]
            mean_up = sum(sum(x) for x in up) / max(1, len(up))
            t.add_row(str(d), r["method"], r["protocol"], _fmt(a["image"]), _fmt(a.get("image_patch_max")),
                      _fmt(a.get("image_knn")), _fmt(a["pixel"]), _fmt(a.get("pro")), _mb(mean_up),
                      _epsilon(r["privacy"]), f"{r['wall_seconds']:.0f}")
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"table: {path} is not a fedsecmem results file ({exc})") from None
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
    return p


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
            from fedsecmem.runner import run

            cfg = load_config(args.config, args.overrides)
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            results = run(cfg, out)
            print_run_summary(results, out)
        elif args.command == "table":
            print_comparison([Path(d) for d in args.runs])
        elif args.command == "provision":
            _provision(args)
        elif args.command == "serve":
            from fedsecmem.config import load_config
            from fedsecmem.serve import serve

            cfg = load_config(args.config, args.overrides)
            out = Path(args.out) if args.out else Path("runs") / cfg.name
            results = serve(cfg, out, args.resume)
            print_run_summary(results, out)
        elif args.command == "join":
            from fedsecmem.config import load_config
            from fedsecmem.join import join

            join(load_config(args.config, args.overrides), args.client_id)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
