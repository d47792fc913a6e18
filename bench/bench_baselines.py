"""When does memory sharing win? FedAvg, FedProx, FedAvg+WSA, FedProx+WSA, FedSM, FedDyMem,
local and central on textures and FMNIST-6/4, Dirichlet alpha 0.1 / 0.5 / 10 (strong to weak
product skew), 3 seeds each (5 clients, 3 rounds). Image AUROC (pixel AUROC on textures) and
bytes per client per round.

Runs are kept under runs/bench and reused (the alpha 0.5 runs of bench_feddymem.py are the same
runs), so the grid can be filled over several sittings:
    python bench/bench_baselines.py textures                 # run one benchmark's grid (no table)
    python bench/bench_baselines.py                          # run what is missing, write the table
    python bench/bench_baselines.py --table textures         # the table of the benchmarks named
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, mean_std, run_config  # noqa: E402
from markdown import write_section  # noqa: E402

SEEDS = (0, 1, 2)
ALPHAS = (0.1, 0.5, 10.0)
WSA = 10.0  # fl.wsa_weight of the +WSA rows
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


def runs(bench: str, tag: str, overrides: list[str], alpha: float) -> list[dict]:
    name = f"fed_{bench}_{tag}" + ("" if alpha == 0.5 else f"_a{alpha:g}")  # alpha 0.5: bench_feddymem's runs
    return [run_config(bench, f"{name}_s{s}", [*overrides, f"clients.alpha={alpha}", f"seed={s}",
                                                f"output.embedding_cache={OUT / 'cache'}"]) for s in SEEDS]


def grid(bench: str) -> dict:
    return {(label, alpha): runs(bench, tag, ov, alpha) for alpha in (0.5, 0.1, 10.0)
            for label, (tag, ov) in METHODS.items()}


def per_client_round_mb(res: list[dict], key: str) -> float:
    return float(np.mean([np.mean([np.mean(b) for b in r["comm"][key]]) for r in res])) / 1e6


def main(benches: tuple[str, ...]) -> None:
    rows, bytes_rows = [], []
    for bench in benches:
        g = grid(bench)
        for label in METHODS:
            cells = []
            for alpha in ALPHAS:
                a = [r["auroc"] for r in g[(label, alpha)]]
                cell = mean_std([x["image"] for x in a])
                if bench == "textures":
                    cell += f" ({mean_std([x['pixel'] for x in a])})"
                cells.append(cell)
            rows.append(f"| {bench} | {label} | " + " | ".join(cells) + " |")
            res = g[(label, 0.5)]
            bytes_rows.append(f"| {bench} | {label} | {per_client_round_mb(res, 'bytes_up'):.3f} | "
                              f"{per_client_round_mb(res, 'bytes_down'):.3f} |")
    body = ("| benchmark | method | alpha 0.1 | alpha 0.5 | alpha 10 |\n|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nImage AUROC (textures: patch max, with pixel AUROC in brackets; FMNIST-6/4: image kNN), "
              f"mean ± std over seeds {', '.join(map(str, SEEDS))} of the mean over 5 clients, 3 rounds; "
              f"+WSA: fl.wsa_weight = {WSA:g}; FedSM: fl.softpull = 1.\n\n"
              "| benchmark | method | MB up per client per round | MB down |\n|---|---|---|---|\n"
            + "\n".join(bytes_rows) + "\n\n(alpha 0.5; bytes do not depend on the skew.)")
    command = "python bench/bench_baselines.py" + ("" if benches == ("textures", "fmnist")
                                                   else " --table " + " ".join(benches))
    write_section("baselines", "Memory sharing against parameter sharing, by product skew", command, body)
    print(body)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--table":
        main(tuple(args[1:]) or ("textures", "fmnist"))
    elif args:
        for b in args:
            grid(b)
    else:
        main(("textures", "fmnist"))
