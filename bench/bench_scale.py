"""Scaling: FedDyMem over SecAgg+ with 10, 100 and 1,000 small clients (3 training images each), in
process and on Ray, on the complete graph and on the k-regular graph whose degree Bell et al.'s
bounds give for that n (``protocols.graph.smallest_graph``: dropout and collusion fractions 0.1,
2^-40 security, 2^-20 correctness). Per configuration: the mean round time, the server's share of
the secure aggregation, peak memory per process (driver; each Ray client actor), and bytes per
client per round. A plot of round time against n.

    python bench/bench_scale.py                  # the table and plot (docs/benchmarks.md, docs/scaling.md)
    python bench/bench_scale.py --only 10        # one n
    python bench/bench_scale.py --per-sum        # one secure sum, protocol only: the server's cost per n
    python bench/bench_scale.py --table          # the section and plot again from runs/bench/scale.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import OUT, ROOT  # noqa: E402
from markdown import write_section  # noqa: E402

from fedsecmem.config import config_from_dict  # noqa: E402
from fedsecmem.protocols.graph import smallest_graph  # noqa: E402

SIZES = (10, 100, 1000)
IMAGES_PER_CLIENT = 3
PLOT = ROOT / "docs" / "scaling.png"
# the complete graph's pairwise work grows as n^2: measured up to this n
COMPLETE_UP_TO = 100
# Ray runs with execution.clients_per_actor: auto (one actor process per CPU, the clients dealt among
# them); at 10 clients also one actor per client, the process-per-site layout a cluster would use
ONE_PER_ACTOR_AT = 10
# small runs are a few seconds and noisy on a shared machine: measured this many times, the median kept
REPEATS_UP_TO, REPEATS = 10, 3


def config(n: int, neighbours: int | None, threshold: int | None, backend: str, per: int | str = "auto") -> dict:
    per_product = math.ceil(IMAGES_PER_CLIENT * n / 6)
    return {
        "name": f"scale-{n}", "seed": 0, "method": "feddymem", "protocol": "secagg",
        "data": {"benchmark": "textures", "train_per_product": per_product, "test_normal_per_product": 5,
                 "test_defect_per_product": 5, "image_size": 64, "crop_size": 64},
        "clients": {"n": n, "alpha": 100.0, "min_train": 2},
        "privacy": {"dp": False},
        "feddymem": {"rounds": 2, "global_k": 32, "global_k_images": 8, "kmeans_init": "pca-partition"},
        "secure": {"secagg": {"neighbours": neighbours, "threshold": threshold}},
        # ledgers on: a served (and Ray) run always keeps them, so both sides sign every message
        "audit": {"ledger": True, "leakage": False},
        "output": {"embedding_cache": str(OUT / "cache"), "map_examples_per_product": 0},
        "deploy": {"stage_timeout_s": 600, "round_timeout_s": 1800, "register_timeout_s": 1800},
        "execution": {"backend": backend, "threads_per_client": 1, "clients_per_actor": per},
    }


def _rss_mb(pid: str) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class Memory:
    """Peak resident memory during one run, sampled twice a second (Linux /proc): this process (the
    driver; its lifetime peak would carry over from an earlier, bigger run) and each Ray client actor."""

    def __init__(self):
        self.peak, self.driver, self.stop, self.pids = 0.0, 0.0, threading.Event(), set()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _actor_rss_mb(self) -> list[float]:
        out = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if b"ClientActor" not in cmd:
                    continue
                rss = _rss_mb(pid)
                if rss is not None:
                    out.append(rss)
                    self.pids.add(pid)
            except OSError:
                continue
        return out

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.peak = max([self.peak, *self._actor_rss_mb()])
            self.driver = max(self.driver, _rss_mb("self") or 0.0)
            time.sleep(0.5)

    def done(self) -> tuple[float, float | None]:
        """(driver's peak MB, the largest actor's peak MB or None without actors)."""
        self.stop.set()
        self.thread.join()
        return self.driver, self.peak if self.pids else None


def measure(n: int, graph: str, backend: str, per: int | str = "auto") -> dict:
    from fedsecmem.deployment.ray_backend import run_on_ray
    from fedsecmem.run.runner import run

    k, t = (None, None) if graph == "complete" else smallest_graph(n, 0.1, 0.1, 40, 20)
    cfg = config_from_dict(config(n, k, t, backend, per))
    out = OUT / f"scale_{n}_{graph}_{backend}{'' if per == 'auto' else f'_{per}'}"
    watch = Memory()
    t0 = time.perf_counter()
    res = run_on_ray(cfg, out) if backend == "ray" else run(cfg, out)
    wall = time.perf_counter() - t0
    driver_mb, actor_mb = watch.done()
    rounds = res["per_round"]
    tm = res["timing"]
    # in process: the whole method (train, aggregate, score); on Ray: the same three parts as the server times them
    spent = tm["method_s"] if backend == "inprocess" else (tm["client_round_s"] + tm["aggregation_s"]
                                                           + tm["client_score_s"])
    round_s = spent / len(rounds)
    agg = tm.get("aggregation_s")
    server = tm.get("aggregation_server_s")
    up = np.mean([np.mean(b) for b in res["comm"]["bytes_up"]])
    down = np.mean([np.mean(b) for b in res["comm"]["bytes_down"]])
    return {"n": n, "graph": "complete" if k is None else f"k = {k}, t = {t}", "backend": backend,
            "actors": len(watch.pids) if backend == "ray" else None, "clients_per_actor": per if backend == "ray" else None,
            # the k-means runs to convergence: bigger federations may take more sums a round; the
            # server's cost per sum is the protocol's
            "sums": float(np.mean([r["secure_sums"] for r in rounds])),
            "round_s": round_s, "aggregation_s": None if agg is None else agg / len(rounds),
            "server_s": None if server is None else server / len(rounds), "wall_s": wall,
            "driver_mb": driver_mb, "actor_mb": actor_mb, "up_kb": float(up) / 1e3, "down_kb": float(down) / 1e3,
            "auroc": res["auroc"]["image"]}


ROWS = OUT / "scale.json"  # every measured row, so `--only N` re-measures one n and keeps the others


def main(only: int | None = None) -> None:
    kept = json.loads(ROWS.read_text()) if ROWS.is_file() and only is not None else []
    rows = [r for r in kept if r["n"] != only]
    for n in SIZES if only is None else (only,):
        for graph in ("complete", "sparse"):
            if graph == "complete" and n > COMPLETE_UP_TO:
                continue
            if graph == "sparse" and smallest_graph(n, 0.1, 0.1, 40, 20)[0] >= n - 1:
                continue  # Bell et al.'s bounds allow no sparse graph this small
            runs = [("inprocess", "auto"), ("ray", "auto")]
            if n == ONE_PER_ACTOR_AT and graph == "complete":
                runs.append(("ray", 1))
            tries = REPEATS if n <= REPEATS_UP_TO else 1
            measured = {run: [] for run in runs}
            for _ in range(tries):  # interleaved, so a slow spell of the machine touches every backend
                for backend, per in runs:
                    measured[(backend, per)].append(measure(n, graph, backend, per))
            for got in measured.values():
                row = sorted(got, key=lambda r: r["round_s"])[len(got) // 2]
                row["round_s_all"] = [r["round_s"] for r in got]
                rows.append(row)
                print(row, flush=True)
                ROWS.write_text(json.dumps(rows, indent=1, default=float))  # kept as it goes (--table)
    rows.sort(key=lambda r: (r["n"], r["graph"] != "complete", r["backend"] != "inprocess", r.get("actors") or 0))
    ROWS.write_text(json.dumps(rows, indent=1, default=float))
    write_table(rows)


def write_table(rows: list[dict]) -> None:
    """The docs/benchmarks.md section and the plot, from measured rows."""

    def f(v, fmt=".1f"):
        return "-" if v is None else format(v, fmt)

    def backend(r):
        return r["backend"] if r["backend"] == "inprocess" else f"ray, {r.get('actors')} actors"

    lines = [f"| {r['n']} | {r['graph']} | {backend(r)} | {f(r['round_s'], '.2f')} | {r['sums']:.1f} | {f(r['aggregation_s'], '.2f')} | "
             f"{f(r['server_s'], '.2f')} | {f(None if r['server_s'] is None else r['server_s'] / r['sums'], '.3f')} | "
             f"{f(r['driver_mb'], '.0f')} | {f(r['actor_mb'], '.0f')} | "
             f"{f(r['up_kb'])} | {f(r['down_kb'])} |" for r in rows]
    at10 = [r for r in rows if r["n"] == 10 and r["graph"] == "complete"]
    verdict = ""
    if len(at10) >= 2 and at10[0]["backend"] == "inprocess":
        parts = [f"{ray['round_s'] / at10[0]['round_s']:.2f}x with {ray.get('actors')} actor processes"
                 for ray in at10[1:]]
        best = min(ray["round_s"] for ray in at10[1:]) / at10[0]["round_s"]
        verdict = (f"\nRay against in process at 10 clients (complete graph), round time: {'; '.join(parts)} "
                   f"(target 1.5x: {'met' if best <= 1.5 else 'not met'}).\n")
    sparse = [r for r in rows if r["graph"] != "complete" and r["backend"] == "inprocess" and r["server_s"]]
    if len(sparse) >= 2:
        lo, hi = sparse[0], sparse[-1]
        grow = (hi["server_s"] / hi["sums"]) / (lo["server_s"] / lo["sums"])
        nlogn = hi["n"] * math.log(hi["n"]) / (lo["n"] * math.log(lo["n"]))
        verdict += (f"\nServer work, sparse graph, in process, {lo['n']} -> {hi['n']} clients: {grow:.1f}x per secure sum "
                    f"(n log n: {nlogn:.1f}x; target: no faster, {'met' if grow <= nlogn else 'not met'}); per round "
                    f"{hi['server_s'] / lo['server_s']:.1f}x, the k-means taking {hi['sums']:.0f} sums a round "
                    f"instead of {lo['sums']:.0f}.\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (graph, backend), style in ((("complete", "inprocess"), "-o"), (("sparse", "inprocess"), "-s"),
                                    (("complete", "ray"), "^--"), (("sparse", "ray"), "v--")):
        pts = [(r["n"], r["round_s"]) for r in rows if r["backend"] == backend
               and (r["graph"] == "complete") == (graph == "complete") and r.get("clients_per_actor") in (None, "auto")]
        if pts:
            ax.plot(*zip(*pts), style, label=f"{graph} graph, {backend}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients")
    ax.set_ylabel("seconds per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    body = (f"FedDyMem over SecAgg+, no DP, {IMAGES_PER_CLIENT} training images per client (textures, 64 px), "
            "2 rounds, `global_k: 32`, ledgers on (a served run always signs every message; so does the simulator "
            "with `audit.ledger`); the sparse graph is the smallest k-regular graph within Bell et al.'s "
            "bounds for that n (dropout and collusion fractions 0.1). Round: a client round (train, rebuild, "
            "reduce), the secure k-means (aggregation; server: the server's share of it) and scoring. Peak "
            "memory per process: the driver (in process: every client), and the largest Ray client actor. Ray: "
            "`execution.clients_per_actor: auto` (one actor process per CPU, here 2, the clients dealt among "
            f"them), and at 10 clients also one actor per client. Up to {REPEATS_UP_TO} clients each row is the median "
            f"of {REPEATS} runs taken in turn (all in `runs/bench/scale.json`). "
            "Plot: [scaling.png](scaling.png).\n\n"
            "| clients | graph | backend | round s | secure sums / round | aggregation s / round | server s / round | "
            "server s / sum | driver MB | actor MB | KB up / client / round | KB down / client / round |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines) + "\n" + verdict)
    write_section("scaling", "Scaling: 10 to 1,000 clients", "python bench/bench_scale.py", body)


def per_sum() -> None:
    """The server's seconds for one SecAgg+ sum of a round's k-means vector (32 x 153 values) on the
    Bell-bounded sparse graph, all clients simulated in one process: the protocol's own growth."""
    from fedsecmem.protocols.secure_sum import SecAggSum

    length, rows = 32 * 153 + 1, []
    for n in (100, 200, 400, 800):
        k, t = smallest_graph(n, 0.1, 0.1, 40, 20)
        rng = np.random.default_rng(n)
        out = SecAggSum(bits=64, neighbours=k, threshold=t).sum({c: rng.normal(0, 1, length) for c in range(n)})
        rows.append(f"| {n} | {k} | {t} | {out.server_seconds:.3f} | {out.client_seconds / n * 1e3:.1f} |")
    body = ("One SecAgg+ sum of a round's k-means vector (4,897 values), sparse graph within Bell et al.'s bounds, "
            "all clients in one process.\n\n| clients | k | t | server s per sum | client ms per sum (each) |\n"
            "|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    write_section("scaling_per_sum", "Scaling: one secure sum's server cost", "python bench/bench_scale.py --per-sum",
                  body)


if __name__ == "__main__":
    if "--per-sum" in sys.argv:
        per_sum()
        sys.exit(0)
    if "--table" in sys.argv:  # the section and plot again from the kept rows, measuring nothing
        write_table(json.loads(ROWS.read_text()))
        sys.exit(0)
    main(int(sys.argv[sys.argv.index("--only") + 1]) if "--only" in sys.argv else None)
