"""The detector where it matters: central, local, FedDyMem over SecAgg+ and FedDyMem + DP
(epsilon 8) on textures (the main job's config) and ELPV (real solar-cell defects), 3 seeds,
with the per-category (MVTec protocol) and per-client figures. Writes the "Detector fidelity"
section of docs/benchmarks.md; finished runs under runs/bench are reused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, mean_std, run_config, run_configs  # noqa: E402
from markdown import write_section  # noqa: E402

SEEDS = (0, 1, 2)
NEAR = "FedDyMem, SecAgg+, near items only"  # feddymem.global_near = 1 (docs/feddymem.md)
SETS = {  # benchmark -> (config, {label: (run tag, overrides)})
    "textures": ("quickstart", {
        "central": ("central", ["method=central"]),
        "local": ("local", ["method=local"]),
        "FedDyMem, SecAgg+": ("feddymem", ["privacy.dp=false", "feddymem.global_k=512",
                                            "feddymem.global_k_images=64"]),
        NEAR: ("feddymem_near1", ["privacy.dp=false", "feddymem.global_k=512", "feddymem.global_k_images=64",
                                  "feddymem.global_near=1"]),
        "FedDyMem + DP (eps 8), SecAgg+": ("feddymem_dp", []),
    }),
    "elpv": ("feddymem_elpv", {
        "central": ("central", ["method=central"]),
        "local": ("local", ["method=local"]),
        "FedDyMem, SecAgg+, global_k 512": ("feddymem", ["feddymem.global_k=512"]),
        NEAR: ("feddymem_near1", ["feddymem.global_k=512", "feddymem.global_near=1"]),
        "FedDyMem, SecAgg+ (global_k 2048, the config's)": ("feddymem_k2048", []),
        "FedDyMem + DP (eps 8), SecAgg+": ("feddymem_dp", ["privacy.dp=true", "privacy.epsilon=8",
                                                            "feddymem.global_k=16", "feddymem.global_k_images=8"]),
    }),
}


def runs(bench: str, label: str) -> list[dict]:
    config, methods = SETS[bench]
    tag, overrides = methods[label]
    cache = f"output.embedding_cache={OUT / 'cache'}"
    return [run_config(config, f"fidelity_{bench}_{tag}_s{s}", overrides + [f"seed={s}", cache]) for s in SEEDS]


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def main() -> None:
    rows, clients, cats = [], [], []
    cache = f"output.embedding_cache={OUT / 'cache'}"
    run_configs([(config, f"fidelity_{bench}_{tag}_s{s}", overrides + [f"seed={s}", cache])  # all at once
                 for bench, (config, methods) in SETS.items() for tag, overrides in methods.values() for s in SEEDS])
    for bench, (_, methods) in SETS.items():
        for label in methods:
            res = runs(bench, label)
            a = [r["auroc"] for r in res]
            up = np.mean([np.mean([np.mean(b) for b in r["comm"]["bytes_up"]]) for r in res])
            used = [r["per_round"][-1].get("global_items_used") for r in res if r.get("per_round")]
            if used and used[0] is not None:
                label_shown = f"{label} ({np.mean(used):.0f} of 512 items used)"
            else:
                label_shown = label
            eps = [r["privacy"]["epsilon"] for r in res if r["privacy"].get("epsilon") is not None]
            unc = [" / ".join(_f(x["per_kind"].get(k, {}).get("auroc_image")) for k in ("uncertain_p33", "uncertain_p67"))
                   for x in a[:1]] if bench == "elpv" else ["-"]
            rows.append(f"| {bench} | {label_shown} | {mean_std([x['image'] for x in a])} | "
                        f"{mean_std([x['category_mean_image'] for x in a])} | {mean_std([x['pixel'] for x in a])} | "
                        f"{unc[0]} | {up / 1e3:.0f} | {f'{max(eps):.2f}' if eps else '-'} |")
            clients.append(f"| {bench} | {label} | " + " ".join(_f(c["auroc_image"]) for c in res[0]["per_client"]) + " |")
            cats.append(f"| {bench} | {label} | " + " ".join(
                f"{n} {_f(v['auroc_image'])}" for n, v in res[0]["auroc"]["per_category"].items()) + " |")
    body = ("5 clients, Dirichlet alpha 0.5, 3 rounds; mean ± std over seeds "
            f"{', '.join(map(str, SEEDS))}. Textures: `configs/quickstart.yaml` (the main job: 160 px, coreset 10%, "
            "25% of each client's training images withheld as the membership-inference non-members); ELPV: "
            "`configs/feddymem_elpv.yaml` (224 px, 300 normal training cells per wafer type, coreset 1%). "
            "*image AUROC*: mean over clients of each client's test set; *per category*: each product scored on "
            "its own (MVTec AD's protocol), then the mean over products; ELPV's uncertain cells (defect "
            "probability 1/3, 2/3) are scored apart against the same normals (seed 0). *near items only*: "
            "`feddymem.global_near: 1`, each client scores with the global items within its own bank's "
            "covering radius of that bank.\n\n"
            "| benchmark | method | image AUROC | per category | pixel AUROC | uncertain 1/3 / 2/3 | kB up per client per round | epsilon |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nPer client (seed 0, image AUROC, clients 0-4):\n\n| benchmark | method | clients |\n|---|---|---|\n"
            + "\n".join(clients)
            + "\n\nPer category (seed 0):\n\n| benchmark | method | categories |\n|---|---|---|\n" + "\n".join(cats))
    print(body)
    write_section("fidelity", "Detector fidelity: central, local, FedDyMem and FedDyMem + DP",
                  "python bench/bench_fidelity.py", body)


if __name__ == "__main__":
    main()
