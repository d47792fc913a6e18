"""FedDyMem against local / central PatchCore, FedAvg and FedProx of the generator, and the
no-generator ablation, on textures and FMNIST-6/4 (5 clients, Dirichlet alpha 0.5, 3 seeds).
Embeddings are cached per (data, seed) so all methods see the same features."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, mean_std, run_config  # noqa: E402
from markdown import write_section  # noqa: E402

SEEDS = (0, 1, 2)
METHODS = {  # label -> overrides
    "central": ["method=central"],
    "local": ["method=local"],
    "FedAvg": ["method=fedavg"],
    "FedProx": ["method=fedprox"],
    "FedDyMem (no generator)": ["method=feddymem", "feddymem.use_generator=false"],
    "FedDyMem": ["method=feddymem"],
}
WRN50_PARAMS = 68_883_240  # torchvision wide_resnet50_2


def main() -> None:
    rows, bytes_rows, time_rows = [], [], []
    for bench in ("textures", "fmnist"):
        for label, ov in METHODS.items():
            tag = label.lower().replace(" ", "_").replace("(", "").replace(")", "")
            res = [run_config(bench, f"fed_{bench}_{tag}_s{s}", ov + [f"seed={s}",
                              f"output.embedding_cache={OUT / 'cache'}"]) for s in SEEDS]
            a = [r["auroc"] for r in res]
            rows.append(f"| {bench} | {label} | {mean_std([x['image'] for x in a])} | "
                        f"{mean_std([x['image_patch_max'] for x in a])} | {mean_std([x['image_knn'] for x in a])} | "
                        f"{mean_std([x['pixel'] for x in a])} |")
            up = np.mean([np.mean([np.mean(b) for b in r["comm"]["bytes_up"]]) for r in res])
            down = np.mean([np.mean([np.mean(b) for b in r["comm"]["bytes_down"]]) for r in res])
            bytes_rows.append(f"| {bench} | {label} | {up / 1e3:.1f} | {down / 1e3:.1f} |")
            t = res[0]["timing"]
            rounds = max(1, res[0]["rounds"])
            time_rows.append(f"| {bench} | {label} | " + " | ".join(
                f"{t.get(k, 0.0) / rounds:.2f}" for k in ("memory_rebuild_s", "generator_train_s", "aggregation_s",
                                                          "score_s")) + " |")
    body = ("| benchmark | method | auroc.image | image AUROC (patch max) | image AUROC (image kNN) | pixel AUROC |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nMean ± std over seeds 0, 1, 2 of the mean over clients. auroc.image is the configured primary "
            "score (textures: patch max; FMNIST: image kNN).\n\n"
            "### Bytes per client per round\n\n| benchmark | method | up kB | down kB |\n|---|---|---|---|\n"
            + "\n".join(bytes_rows) +
            f"\n\nFor scale: FedAvg of a whole wide_resnet50_2 would move {WRN50_PARAMS * 4 / 1e6:.0f} MB each way "
            "per client per round.\n\n### Seconds per round (seed 0, all clients together, 2 CPU cores)\n\n"
            "| benchmark | method | memory rebuild | generator training | aggregation | scoring |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(time_rows))
    write_section("feddymem", "FedDyMem and the federated baselines", "python bench/bench_feddymem.py", body)
    print(body)


if __name__ == "__main__":
    main()
