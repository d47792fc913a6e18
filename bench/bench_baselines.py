"""When does memory sharing win? FedAvg, FedProx, FedAvg+WSA, FedProx+WSA, FedSM, FedDyMem,
local and central on textures and FMNIST-6/4, Dirichlet alpha 0.1 / 0.5 / 10 (strong to weak
product skew), 3 seeds each (5 clients, 3 rounds). Image AUROC (pixel AUROC on textures) and
bytes per client per round.

Runs are kept under runs/bench and reused (the alpha 0.5 runs of bench_feddymem.py are the same
runs), so the grid can be filled over several sittings:
    python bench/bench_baselines.py textures                 # run one benchmark's grid (no table)
    python bench/bench_baselines.py                          # run what is missing, write the table
    python bench/bench_baselines.py --table textures         # the table of the benchmarks named
    python bench/bench_baselines.py --sensitivity textures   # SoftPull and WSA weight, alpha 0.5
    FEDSECMEM_BACKEND=ray python bench/bench_baselines.py    # the grid's runs as Ray tasks (a local Ray,
                                                             # or FEDSECMEM_RAY_ADDRESS=host:port)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, mean_std, run_config, run_configs  # noqa: E402
from markdown import write_section  # noqa: E402

SEEDS = (0, 1, 2)
ALPHAS = (0.1, 0.5, 10.0)
WSA = 10.0  # fl.wsa_weight of the +WSA rows
PARAMETER_SHARING = ("FedAvg", "FedProx", "FedAvg+WSA", "FedProx+WSA", "FedSM")
SOFTPULLS = (0.1, 1.0, 10.0, 100.0)  # fl.softpull values of the sensitivity table (1 is the grid's)
WSA_WEIGHTS = (0.0, 1.0, 10.0, 100.0)  # fl.wsa_weight values of the sensitivity table (0 is FedAvg)
METHODS = {  # label -> (run-name tag, overrides)
    "FedAvg": ("fedavg", ["method=fedavg"]),
    "FedProx": ("fedprox", ["method=fedprox"]),
    "FedAvg+WSA": ("fedavg_wsa", ["method=fedavg", f"fl.wsa_weight={WSA}"]),
    "FedProx+WSA": ("fedprox_wsa", ["method=fedprox", f"fl.wsa_weight={WSA}"]),
    "FedSM": ("fedsm", ["method=fedsm"]),
    "FedDyMem": ("feddymem", ["method=feddymem"]),
    "local": ("local", ["method=local"]),
    "central": ("central", ["method=central"]),
}


def jobs(bench: str, tag: str, overrides: list[str], alpha: float) -> list[tuple[str, str, list[str]]]:
    name = f"fed_{bench}_{tag}" + ("" if alpha == 0.5 else f"_a{alpha:g}")  # alpha 0.5: bench_feddymem's runs
    return [(bench, f"{name}_s{s}", [*overrides, f"clients.alpha={alpha}", f"seed={s}",
                                     f"output.embedding_cache={OUT / 'cache'}"]) for s in SEEDS]


def runs(bench: str, tag: str, overrides: list[str], alpha: float) -> list[dict]:
    return [run_config(*job) for job in jobs(bench, tag, overrides, alpha)]


def grid(bench: str) -> dict:
    """Every (method, alpha) cell's runs, all started at once (as Ray tasks with FEDSECMEM_BACKEND=ray)."""
    keys = [(label, alpha) for alpha in (0.5, 0.1, 10.0) for label in METHODS]
    planned = [job for label, alpha in keys for job in jobs(bench, *METHODS[label], alpha)]
    results = run_configs(planned)
    return {key: results[i * len(SEEDS):(i + 1) * len(SEEDS)] for i, key in enumerate(keys)}


def per_client_round_mb(res: list[dict], key: str) -> float:
    return float(np.mean([np.mean([np.mean(b) for b in r["comm"][key]]) for r in res])) / 1e6


def auroc_cell(bench: str, aurocs: list[dict]) -> str:
    """Image AUROC, with the second score in brackets: pixel AUROC on textures, and on FMNIST-6/4
    (whose image score is kNN on backbone embeddings, which no generator touches) patch max."""
    second = "pixel" if bench == "textures" else "image_patch_max"
    return f"{mean_std([x['image'] for x in aurocs])} ({mean_std([x[second] for x in aurocs])})"


def main(benches: tuple[str, ...]) -> None:
    rows, bytes_rows, leads, selector = [], [], [], []
    for bench in benches:
        g = grid(bench)
        lead = []
        for alpha in ALPHAS:
            mean = {label: np.mean([r["auroc"]["image"] for r in g[(label, alpha)]]) for label in METHODS}
            best = max(PARAMETER_SHARING, key=mean.get)
            lead.append(f"{mean['FedDyMem'] - mean[best]:+.3f} (vs {best})")
        leads.append(f"| {bench} | " + " | ".join(lead) + " |")
        selector.append(f"| {bench} | " + " | ".join(
            mean_std([r["per_round"][-1]["selector_accuracy"] for r in g[("FedSM", alpha)]]) for alpha in ALPHAS) + " |")
        for label in METHODS:
            cells = []
            for alpha in ALPHAS:
                a = [r["auroc"] for r in g[(label, alpha)]]
                cells.append(auroc_cell(bench, a))
            rows.append(f"| {bench} | {label} | " + " | ".join(cells) + " |")
            res = g[(label, 0.5)]
            bytes_rows.append(f"| {bench} | {label} | {per_client_round_mb(res, 'bytes_up'):.3f} | "
                              f"{per_client_round_mb(res, 'bytes_down'):.3f} |")
    body = ("| benchmark | method | alpha 0.1 | alpha 0.5 | alpha 10 |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nImage AUROC (textures: patch max, with pixel AUROC in brackets; FMNIST-6/4: image kNN on "
              "backbone embeddings, with the patch-max AUROC, the score the generator shapes, in brackets), "
              f"mean ± std over seeds {', '.join(map(str, SEEDS))} of the mean over 5 clients, 3 rounds; "
              f"+WSA: fl.wsa_weight = {WSA:g}; FedSM: fl.softpull = 1.\n\n"
              "| benchmark | method | MB up per client per round | MB down |\n|---|---|---|---|\n"
            + "\n".join(bytes_rows) + "\n\n(alpha 0.5; bytes do not depend on the skew.)\n\n"
            "FedDyMem's image AUROC minus the best parameter-sharing method's:\n\n"
            "| benchmark | alpha 0.1 | alpha 0.5 | alpha 10 |\n|---|---|---|---|\n" + "\n".join(leads)
            + "\n\nFedSM's selector: share of test images it gives to the client that owns them (last round; "
              "chance 0.2 with 5 clients):\n\n"
              "| benchmark | alpha 0.1 | alpha 0.5 | alpha 10 |\n|---|---|---|---|\n" + "\n".join(selector))
    command = "python bench/bench_baselines.py" + ("" if benches == ("textures", "fmnist")
                                                   else " --table " + " ".join(benches))
    write_section("baselines", "Memory sharing against parameter sharing, by product skew", command, body)
    print(body)


def sensitivity(bench: str) -> None:
    """How much the untuned coefficients matter: FedSM over SoftPull, FedAvg+WSA over its weight."""
    rows = []

    def row(label: str, res: list[dict]) -> None:
        rows.append(f"| {label} | {auroc_cell(bench, [r['auroc'] for r in res])} |")

    for lam in SOFTPULLS:
        tag = METHODS["FedSM"][0] if lam == 1.0 else f"fedsm_sp{lam:g}"  # 1: the grid's runs
        row(f"FedSM, fl.softpull = {lam:g}", runs(bench, tag, ["method=fedsm", f"fl.softpull={lam}"], 0.5))
    for w in WSA_WEIGHTS:
        tag = {0.0: METHODS["FedAvg"][0], WSA: METHODS["FedAvg+WSA"][0]}.get(w, f"fedavg_wsa{w:g}")
        row(f"FedAvg, fl.wsa_weight = {w:g}", runs(bench, tag, ["method=fedavg", f"fl.wsa_weight={w}"], 0.5))
    body = (f"| {bench}, alpha 0.5 | image AUROC |\n|---|---|\n" + "\n".join(rows)
            + f"\n\nMean ± std over seeds {', '.join(map(str, SEEDS))}"
            + (" (pixel AUROC in brackets)" if bench == "textures" else " (patch-max AUROC in brackets)")
            + "; softpull 1 and wsa_weight 0 / 10 are the grid's runs.")
    write_section(f"baselines_sensitivity_{bench}", f"FedSM and WSA coefficients on {bench}",
                  f"python bench/bench_baselines.py --sensitivity {bench}", body)
    print(body)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--sensitivity":
        for b in args[1:] or ("textures",):
            sensitivity(b)
    elif args and args[0] == "--table":
        main(tuple(args[1:]) or ("textures", "fmnist"))
    elif args:
        for b in args:
            grid(b)
    else:
        main(("textures", "fmnist"))
