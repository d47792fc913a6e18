"""``fedsecmem sweep``: the same run at several epsilons and protocols, with membership
inference on, and what privacy researchers come for: leakage (attack AUC) against utility
(image AUROC), as a table (``sweep.md``, ``sweep.json``) and a plot (``sweep.png``).

``inf`` is the run without DP (``--inf-set`` overrides apply to it only, e.g.
the full-size global memory DP does not allow). With DP, ``plain`` uses local
noise (a plain server sees each client's vector, so each must carry the whole
noise) and ``secagg``/``ckks`` distributed noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedsecmem.errors import UserError
from fedsecmem.methods import METHODS, supporting

__all__ = [
    "MIN_SPAN", "PROTOCOLS", "SERVER_VIEW", "SWEEP_PNG", "best_auc", "parse_epsilons", "parse_protocols",
    "plot", "run_overrides", "summarize", "sweep", "sweep_command", "table_markdown",
]

PROTOCOLS = ("plain", "secagg", "ckks")
SERVER_VIEW = {"plain": "plain_server", "secagg": "secagg_server", "ckks": None}
SWEEP_PNG = "sweep.png"
MIN_SPAN = 0.05  # of image AUROC shown on the plot's vertical axis


def parse_epsilons(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in text.split(","):
        p = part.strip().lower()
        if p in ("inf", "infinity", "none"):
            out.append(None)
            continue
        try:
            v = float(p)
        except ValueError:
            raise UserError(f"--epsilons: {part.strip()!r} is not a number or inf") from None
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--epsilons: {part.strip()!r} must be a positive number (or inf for no DP)")
        out.append(v)
    if not out:
        raise UserError("--epsilons: give at least one value, e.g. 1,2,4,8,inf")
    return out


def parse_protocols(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PROTOCOLS]
    if bad or not out:
        raise UserError(f"--protocols: unknown {bad or text!r}, expected some of {', '.join(PROTOCOLS)}")
    return out


def run_overrides(protocol: str, epsilon: float | None, base: list[str], inf: list[str]) -> list[str]:
    ov = [*base, f"protocol={protocol}", "audit.leakage=true"]
    if epsilon is None:
        return [*ov, "privacy.dp=false", *inf]
    noise = "local" if protocol == "plain" else "distributed"
    return [*ov, "privacy.dp=true", f"privacy.epsilon={epsilon:g}",
            f"privacy.noise={noise}"]


def best_auc(leakage: dict | None, view: str | None) -> float | None:
    """The strongest attack's AUC on ``view`` (None if not measured)."""
    if not leakage or view is None or view not in leakage["views"]:
        return None
    return max(r["auc"] for r in leakage["views"][view].values())


def summarize(protocol: str, epsilon: float | None, results: dict) -> dict:
    lk = results.get("leakage")
    return {"protocol": protocol, "epsilon_target": epsilon, "epsilon_spent": results["privacy"].get("epsilon"),
            "auroc_image": results["auroc"]["image"], "server_view": SERVER_VIEW[protocol],
            "mia_auc_server": best_auc(lk, SERVER_VIEW[protocol]),
            "mia_auc_global": best_auc(lk, "global_memory"),
            "leakage": lk}


def table_markdown(rows: list[dict]) -> str:
    def f(v, fmt=".3f"):
        return "-" if v is None else format(v, fmt)

    out = ["| protocol | epsilon (target) | epsilon spent | image AUROC | MIA AUC, server's view | "
           "MIA AUC, global memory | TPR@1%FPR, server's view | DP bound: AUC / TPR@1%FPR |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tpr = None
        lk, view = r["leakage"], r["server_view"]
        if lk and view in lk["views"]:
            tpr = max(v[f"tpr_at_{lk['fpr']:g}_fpr"] for v in lk["views"][view].values())
        bound = (lk or {}).get("dp_bound")
        b = f"{bound['auc']:.3f} / {bound['tpr']:.3f}" if bound else "none"
        out.append(f"| {r['protocol']} | {'inf (no DP)' if r['epsilon_target'] is None else f(r['epsilon_target'], 'g')} "
                   f"| {f(r['epsilon_spent'], '.2f')} | {f(r['auroc_image'])} | {f(r['mia_auc_server'])} | "
                   f"{f(r['mia_auc_global'])} | {f(tpr)} | {b} |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    colours = {"plain": "tab:red", "secagg": "tab:blue", "ckks": "tab:green"}
    for proto in dict.fromkeys(r["protocol"] for r in rows):
        mine = sorted((r for r in rows if r["protocol"] == proto),
                      key=lambda r: math.inf if r["epsilon_target"] is None else r["epsilon_target"])
        for key, style, what in (("mia_auc_server", "-o", "server's view"), ("mia_auc_global", "--s", "global memory")):
            pts = [(r[key], r["auroc_image"], r["epsilon_target"]) for r in mine if r[key] is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colours[proto], label=f"{proto}: {what}",
                    alpha=0.9 if key == "mia_auc_server" else 0.6)
            for x, y, e in pts:
                ax.annotate("inf" if e is None else f"{e:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=colours[proto])
    ys = [r["auroc_image"] for r in rows if r["auroc_image"] is not None]
    if ys:  # at least MIN_SPAN of AUROC on the axis: a flat curve should look flat
        mid, half = (max(ys) + min(ys)) / 2, max((max(ys) - min(ys)) / 2 * 1.15, MIN_SPAN / 2)
        ax.set_ylim(mid - half, mid + half)
    ax.axvline(0.5, color="k", ls=":", lw=1)
    ax.set_xlabel("membership inference AUC (strongest attack; 0.5 = nothing learned)")
    ax.set_ylabel("image AUROC (utility)")
    ax.set_title("leakage against utility (labels: epsilon)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep(config: str, epsilons: list[float | None], protocols: list[str], out: Path, overrides: list[str],
          inf_overrides: list[str], backend: str = "inprocess", address: str = "") -> list[dict]:
    """Every (protocol, epsilon) run, in sequence or as Ray tasks (``backend``); a run already
    finished with the same config is reused."""
    from fedsecmem.config import load_config
    from fedsecmem.progress import console
    from fedsecmem.run.grid import run_grid

    plans = []
    for proto in protocols:
        for eps in epsilons:
            cfg = load_config(config, run_overrides(proto, eps, overrides, inf_overrides))
            if not METHODS[cfg.method].dp:
                raise UserError(f"sweep: method must be one with DP ({', '.join(supporting('dp'))}), got {cfg.method}")
            plans.append((proto, eps, cfg))  # every config validated before the first run starts
    out.mkdir(parents=True, exist_ok=True)
    tags = [f"{proto}_eps{'inf' if eps is None else f'{eps:g}'}" for proto, eps, _ in plans]
    done: dict[int, dict] = {}

    def on_done(i: int, results: dict) -> None:
        proto, eps, _ = plans[i]
        done[i] = {**summarize(proto, eps, results), "run": tags[i]}
        console.print(f"[bold]sweep {len(done)}/{len(plans)}: {tags[i]} done")
        _write([done[j] for j in sorted(done)], out)

    run_grid([(cfg, out / tag) for (_, _, cfg), tag in zip(plans, tags)], backend, address, on_done)
    return [done[i] for i in range(len(plans))]


def _write(rows: list[dict], out: Path) -> None:
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    (out / "sweep.md").write_text(table_markdown(rows))
    plot(rows, out / SWEEP_PNG)


def sweep_command(args) -> None:
    from fedsecmem.progress import console

    epsilons, protocols = parse_epsilons(args.epsilons), parse_protocols(args.protocols)
    name = Path(args.config).stem
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{name}"
    rows = sweep(args.config, epsilons, protocols, out, args.overrides, args.inf_overrides, args.backend,
                 args.address)
    console.print(table_markdown(rows), highlight=False)
    console.print(f"sweep: {out / 'sweep.md'}, {out / 'sweep.json'}, plot {out / SWEEP_PNG}", highlight=False)
