"""Decisions at each site's calibrated threshold, and what the calibration split costs.

For textures (3 seeds) and ELPV, FedDyMem (plain, no DP) runs twice on the same data and split:
with each site keeping ``predict.calibration_fraction`` of its training normals out of its bank
(the default, 0.2) and without (0: no threshold). Reported: the image AUROC per client and per
category with and without the split (the split's cost), and, per site with at least
``MIN_NORMALS`` test normals, the false-positive rate its threshold gives on its test normals
against the 5% target (goal: within ``GOAL_POINTS`` points on every such site).

    python bench/bench_threshold.py            # markdown table on stdout, rows in runs/bench/threshold.json
"""

from __future__ import annotations

import json
import sys

import numpy as np

from common import OUT, run_configs

MIN_NORMALS = 30  # sites judged on the FPR goal (fewer test normals: a rate too coarse to judge)
GOAL_POINTS = 0.03
SETS = {  # name: (config, seeds, overrides); more textures test normals so most sites hold >= 30
    "textures": ("feddymem_textures", (0, 1, 2), ["protocol=plain", "data.test_normal_per_product=60",
                                                  "output.embedding_cache=runs/cache"]),
    "elpv": ("feddymem_elpv", (0,), ["protocol=plain", "output.embedding_cache=runs/cache"]),
}


def _normals(row: dict) -> int:
    return row["n_test"] - row["n_test_anomalous"]


def main() -> None:
    jobs, keys = [], []
    for name, (config, seeds, overrides) in SETS.items():
        for seed in seeds:
            for frac in (0.2, 0.0):
                jobs.append((config, f"threshold/{name}-s{seed}-cal{frac}",
                             [*overrides, f"seed={seed}", f"predict.calibration_fraction={frac}"]))
                keys.append((name, seed, frac))
    results = dict(zip(keys, run_configs(jobs)))
    rows, lines = [], []
    lines.append("| set | seed | AUROC per client, split / none | per category, split / none | sites judged "
                 "| FPR per site at a 5% target (test normals) | within 3 points | TPR | F1 |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, (_, seeds, _) in SETS.items():
        for seed in seeds:
            cal, none = results[(name, seed, 0.2)], results[(name, seed, 0.0)]
            sites = [r for r in cal["per_client"] if r.get("fpr") is not None and _normals(r) >= MIN_NORMALS]
            ok = sum(abs(r["fpr"] - 0.05) <= GOAL_POINTS for r in sites)
            row = {"set": name, "seed": seed, "auroc_split": cal["auroc"]["image"], "auroc_none": none["auroc"]["image"],
                   "category_split": cal["auroc"]["category_mean_image"],
                   "category_none": none["auroc"]["category_mean_image"],
                   "sites": [{"client": r["client"], "fpr": r["fpr"], "tpr": r["tpr"], "f1": r["f1"],
                              "normals": _normals(r), "n_calibration": r["n_calibration"],
                              "method": r["threshold_method"]} for r in cal["per_client"]],
                   "judged": len(sites), "within_goal": ok}
            rows.append(row)
            fprs = ", ".join(f"{r['fpr']:.3f} ({_normals(r)})" for r in cal["per_client"] if r.get("fpr") is not None)
            lines.append(f"| {name} | {seed} | {row['auroc_split']:.3f} / {row['auroc_none']:.3f} | "
                         f"{row['category_split']:.3f} / {row['category_none']:.3f} | {len(sites)} | {fprs} | "
                         f"{ok}/{len(sites)} | {cal['decisions']['tpr']:.3f} | {cal['decisions']['f1']:.3f} |")
    for name in SETS:
        mine = [r for r in rows if r["set"] == name]
        cost = np.mean([r["auroc_none"] - r["auroc_split"] for r in mine])
        cost_cat = np.mean([r["category_none"] - r["category_split"] for r in mine])
        fpr = [s["fpr"] for r in mine for s in r["sites"] if s["normals"] >= MIN_NORMALS]
        lines.append(f"\n{name}: the calibration split costs {cost:+.4f} AUROC per client ({cost_cat:+.4f} per "
                     f"category), mean of {len(mine)} seed(s); FPR at the 5% target on sites with >= {MIN_NORMALS} "
                     f"test normals: mean {np.mean(fpr):.3f}, range {min(fpr):.3f}-{max(fpr):.3f}" if fpr else "")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "threshold.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))
    print(f"\n`{' '.join(['python', *sys.argv])}`")


if __name__ == "__main__":
    main()
