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
RUN_WITHOUT_REDUCE = ("textures",)  # FMNIST without reduce: k-means over 235k points per round, hours of CPU


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def extras(bench: str) -> tuple[list[str], list[str], list[str]]:
    """Seed 0: scoring with local / global / both, memory-reduce off, and the round-time split."""
    cache = f"output.embedding_cache={OUT / 'cache'}"
    score_rows, bytes_rows = [], []
    runs = {}
    for score_with in ("local", "global", "local+global"):
        tag = score_with.replace("+", "_")
        runs[score_with] = run_config(bench, f"fed_{bench}_score_{tag}_s0",
                                      ["method=feddymem", "seed=0", f"feddymem.score_with={score_with}", cache])
        a = runs[score_with]["auroc"]
        score_rows.append(f"| {bench} | {score_with} | {_fmt(a['image_patch_max'])} | {_fmt(a['image_knn'])} | "
                          f"{_fmt(a['pixel'])} |")
    reduced = runs["local+global"]
    up = np.mean([np.mean(b) for b in reduced["comm"]["bytes_up"]])
    bytes_rows.append(f"| {bench} | FedDyMem, reduce_ratio 16 | {up / 1e3:.1f} | {reduced['auroc']['image']:.3f} |")
    if bench in RUN_WITHOUT_REDUCE:
        r = run_config(bench, f"fed_{bench}_noreduce_s0", ["method=feddymem", "seed=0", "feddymem.reduce_ratio=1", cache])
        up = np.mean([np.mean(b) for b in r["comm"]["bytes_up"]])
        bytes_rows.append(f"| {bench} | FedDyMem, no reduce | {up / 1e3:.1f} | {r['auroc']['image']:.3f} |")
    else:  # every patch of every image, with its weight, plus the image embeddings
        emb_dim = 320  # tf_efficientnet_lite0 stage 4
        n_img = np.mean([c["n_train"] for c in reduced["per_client"]])
        grid = 28 * 28  # 224 px at stride 8
        up = n_img * (grid * (152 + 1) + emb_dim) * 4
        bytes_rows.append(f"| {bench} | FedDyMem, no reduce (computed: every patch, not run) | {up / 1e3:.1f} | - |")
    r = runs["local+global"]
    t, rounds = r["timing"], r["rounds"]
    embed_once = t["embed_train_s"] + t["embed_test_s"]
    time_row = (f"| {bench} | {embed_once:.1f} (once) | " + " | ".join(
        f"{t.get(k, 0.0) / rounds:.2f}" for k in ("generator_embed_s", "coreset_s", "reduce_s", "aggregation_s",
                                                  "generator_train_s", "score_s")) + " |")
    return score_rows, bytes_rows, [time_row]


def main() -> None:
    rows, bytes_rows = [], []
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
    score_rows, reduce_rows, time_rows = [], [], []
    for bench in ("textures", "fmnist"):
        a, b, c = extras(bench)
        score_rows += a
        reduce_rows += b
        time_rows += c
    body = ("| benchmark | method | auroc.image | image AUROC (patch max) | image AUROC (image kNN) | pixel AUROC |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nMean ± std over seeds 0, 1, 2 of the mean over clients; 3 rounds for the federated methods. "
            "auroc.image is the configured primary score (textures: patch max; FMNIST: image kNN).\n\n"
            "### What FedDyMem scores with (seed 0)\n\n"
            "| benchmark | score_with | image AUROC (patch max) | image AUROC (image kNN) | pixel AUROC |\n"
            "|---|---|---|---|---|\n" + "\n".join(score_rows) +
            "\n\n### Bytes per client per round\n\n| benchmark | method | up kB | down kB |\n|---|---|---|---|\n"
            + "\n".join(bytes_rows) +
            "\n\nMemory-reduce (seed 0):\n\n| benchmark | run | up kB per client per round | auroc.image |\n"
            "|---|---|---|---|\n" + "\n".join(reduce_rows) +
            f"\n\nFor scale: FedAvg of a whole wide_resnet50_2 ({WRN50_PARAMS / 1e6:.1f} M parameters) would move "
            f"{WRN50_PARAMS * 4 / 1e6:.0f} MB each way per client per round.\n\n"
            "### FedDyMem seconds per round (seed 0, all 5 clients together, 2 CPU cores)\n\n"
            "| benchmark | backbone embedding | generator embedding | coreset (bank rebuild) | reduce | "
            "aggregation (k-means) | generator training | scoring |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(time_rows) +
            "\n\nThe backbone is frozen, so its embeddings are computed once per run, not per round.")
    write_section("feddymem", "FedDyMem and the federated baselines", "python bench/bench_feddymem.py", body)
    print(body)


if __name__ == "__main__":
    main()
