"""Predict throughput of a saved site model, side by side in one process: fedsecmem's PyTorch path,
the same model exported to ONNX (``fedsecmem.model.export.export_onnx``) under onnxruntime, and
anomalib 2.7.0's PatchCore on the same backbone exported with anomalib's own ONNX export, also
under onnxruntime. Plus the model's load time and size on disk.

1. Site models at 224 px: ``feddymem_textures`` and ``feddymem_elpv`` runs (reused when a finished
   run of the same config is in runs/bench/predict_<set>; see ``SETS`` for the overrides, chosen
   so each run takes a few minutes on 2 cores). The site benchmarked is ``--site`` (default 0).
2. Images per second at batch 1 and 32 over the same ``--images`` test images (seeded draw from the
   benchmark's test split), median of ``--repeats`` timed passes after one warm-up batch:
   (a) ``Detector.predict`` on uint8 arrays: backbone, generator, nearest-neighbour search, image
       score and the smoothed anomaly maps;
   (b) ``export_onnx`` of the model folder, onnxruntime CPUExecutionProvider, intra-op threads =
       ``--threads``, fed float32 (N, 3, S, S) in [0, 1] (the uint8 -> float conversion is timed);
   (c) anomalib's ``PatchcoreModel`` with fedsecmem's builtin ``tf_efficientnet_lite0`` weights and
       normalisation (``anomalib_ref.AnomalibPatchCore``), fitted on the same site's training images
       (the run's own partition and calibration split) with anomalib's k-center-greedy coreset sized
       to the SAME number of items as the site model's patch banks together, wrapped in anomalib's
       Lightning ``Patchcore`` (pre-processor = Normalize(mean = std = 0.5), default post-processor)
       and exported with ``Engine.export(export_type="onnx")`` (= ``AnomalibModule.to_onnx``, torch's
       dynamo exporter), run as (b). One graph per batch size: anomalib's ``nearest_neighbors``
       branches in Python on the number of patches (chunks of 1,024), so torch.export specialises the
       batch axis, and the exporter, falling back, silently writes a graph fixed at the example batch
       (2) although anomalib asks for a dynamic one; the batch is therefore given as a static size.
3. ``Detector.load`` alone, and load + the first image scored (the backbone is built on first use),
   median of ``--repeats``; the model folder's bytes and the ONNX file's.

On 2 cores shared with other work the PyTorch path's figures swing widely (its OpenMP parallel
regions wait for a descheduled thread; onnxruntime's pool lets the caller run the work): the load
average at the start and end and every pass's wall and CPU seconds are kept in the JSON.

Prints the tables (markdown) on stdout, progress on stderr; writes runs/bench/predict.json. Never
touches the network.

    python bench/bench_predict.py                 # textures and ELPV, site 0
    python bench/bench_predict.py --sets textures --images 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, run_config  # noqa: E402

from fedsecmem.config import load_config  # noqa: E402
from fedsecmem.data.load import load_benchmark  # noqa: E402
from fedsecmem.data.partition import calibration_split, partition  # noqa: E402
from fedsecmem.model.detector import Detector  # noqa: E402
from fedsecmem.model.store import model_dir  # noqa: E402
from fedsecmem.run.leakage import hold_out  # noqa: E402

SIZE = 224
CACHE = "output.embedding_cache=runs/cache"
# config, run folder under runs/bench, overrides: each run a few minutes on 2 cores
SETS = {
    # crop 208: the retina source (422 px high, 40% kept for test crops) fits crops of at most 211 px
    "textures": ("feddymem_textures", "predict_textures",
                 [f"data.image_size={SIZE}", "data.crop_size=208", CACHE]),
    "elpv": ("feddymem_elpv", "predict_elpv",
             [f"data.image_size={SIZE}", "data.train_per_product=120", "data.test_normal_per_product=40",
              "data.test_defect_per_product=40", "data.uncertain_per_product=0", "feddymem.rounds=2", CACHE]),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mb(nbytes: int) -> float:
    return nbytes / 2 ** 20


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _onnx_bytes(path: Path) -> int:
    """The .onnx file and any external-data files written beside it."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.parent.iterdir()
               if f.is_file() and (f == path or f.name.startswith(path.name + ".") or f.suffix == ".data"))


# ----------------------------------------------------------------------------- data

def site_data(config: str, overrides: list[str], site: int, n_images: int, seed: int):
    """(the site's training images exactly as its bank saw them, ``n_images`` test images)."""
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    by_patient = cfg.privacy.unit == "patient"
    bench = load_benchmark(cfg.data, cfg.seed, patients=by_patient)
    clients = partition(bench, cfg.clients.n, cfg.clients.alpha, cfg.seed, cfg.clients.min_train)
    if cfg.audit.leakage:  # as the runner: the withheld non-members never build a bank
        clients, _held = hold_out(clients, cfg.audit.holdout_fraction, cfg.seed, by_patient=by_patient)
    clients, _calibration = calibration_split(clients, cfg.predict.calibration_fraction, cfg.seed,
                                              by_patient=by_patient)
    train = clients[site].train.images
    test = bench.test.images
    rng = np.random.default_rng([seed, 11])
    pick = rng.choice(len(test), n_images, replace=n_images > len(test))
    return train, np.ascontiguousarray(test[pick])


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) in [0, 1], what both ONNX graphs take."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


# ----------------------------------------------------------------------------- timing

def throughput(fn, images: np.ndarray, batch: int, repeats: int) -> dict:
    """Images/s of ``fn(batch_of_uint8_images)`` over ``images``: one warm-up batch, then the median
    of ``repeats`` timed passes over all of them (wall and process CPU seconds)."""
    fn(images[:batch])
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        for start in range(0, len(images), batch):
            fn(images[start:start + batch])
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    wall = float(np.median(walls))
    return {"img_s": len(images) / wall, "wall_s": walls, "cpu_s": cpus,
            "cpu_ms_per_img": 1000 * float(np.median(cpus)) / len(images)}


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), times


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_runner(session):
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: to_input(images)})


def ort_outputs(session, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: to_input(images)})))


# ----------------------------------------------------------------------------- anomalib

@contextlib.contextmanager
def reused_temporary():
    """anomalib's ``KCenterGreedy.update_distances`` with its per-step (N, d) temporary
    ``features - center`` written into one buffer reused across steps: the same operations in the
    same order (the same selection), only where the temporary lives differs. Left as it is, after
    the data loading above glibc served each 20+ MB temporary from the heap and could not reuse the
    hole (a small allocation split it), so the process grew by one temporary per step: 22 GB and
    the kernel's OOM killer on the textures site's 2,786-item coreset. Serving the temporaries by
    mmap instead (mallopt) stops the growth but pays a page fault per 4 KiB each step (150 s)."""
    from anomalib.models.components.sampling import k_center_greedy as kcg

    original = kcg.KCenterGreedy.update_distances

    def update_distances(self, cluster_center):
        if cluster_center is None:
            return
        center = self.features[cluster_center].squeeze()
        buf = getattr(self, "_bench_buffer", None)
        if buf is None or buf.shape != self.features.shape:
            buf = self._bench_buffer = torch.empty_like(self.features)
        distances = torch.linalg.norm(torch.sub(self.features, center, out=buf), ord=2, dim=1, keepdim=True)
        self.min_distances = distances if self.min_distances is None else torch.minimum(self.min_distances, distances)

    kcg.KCenterGreedy.update_distances = update_distances
    try:
        yield
    finally:
        kcg.KCenterGreedy.update_distances = original


def anomalib_onnx(det: Detector, train: np.ndarray, bank_items: int, out_dir: Path, batch_sizes: list[int],
                  fit_batch: int = 32) -> dict:
    """anomalib's PatchCore fitted on the site's training images with a coreset of ``bank_items``, then
    exported to ONNX by anomalib once per batch size (see the module docstring for why)."""
    from anomalib_ref import AnomalibPatchCore, anomalib_version

    from torchvision.transforms.v2 import Normalize

    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor

    version = anomalib_version()
    bb = det.saved.backbone
    ref = AnomalibPatchCore(det.embedder, bb.name, bb.weights)
    t = time.perf_counter()
    ref.collect(train, fit_batch)
    embed_s = time.perf_counter() - t
    n = ref.n_stored
    if bank_items >= n:
        raise SystemExit(f"anomalib: {bank_items} bank items asked for, only {n} patches stored")
    t = time.perf_counter()
    with reused_temporary():
        got = ref.subsample((bank_items + 0.5) / n)  # KCenterGreedy keeps int(n * ratio)
    coreset_s = time.perf_counter() - t
    if got != bank_items:
        raise RuntimeError(f"anomalib coreset kept {got} items, wanted {bank_items}")
    # anomalib_ref's hook collects patch scores for the parity benchmark; not wanted in the graph
    ref.model.anomaly_map_generator._forward_hooks.clear()
    module = Patchcore(backbone=bb.name, layers=ref.layers, pre_trained=False,
                       pre_processor=PreProcessor(transform=Normalize(mean=list(bb.mean), std=list(bb.std))),
                       evaluator=False, visualizer=False)
    module.model = ref.model  # the fitted PatchcoreModel (fedsecmem's weights, the coreset above)
    module.eval()
    paths, export_s = {}, {}
    for bs in batch_sizes:
        t = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # torch.onnx prints its steps; stdout is the table
            engine = Engine(default_root_dir=str(out_dir / f"b{bs}"), logger=False)
            # the batch axis fixed at bs: anomalib's nearest_neighbors branches on the number of patches
            # (chunks of 1,024), so a dynamic batch is specialised to the example's (2) anyway
            paths[bs] = Path(engine.export(model=module, export_type="onnx", export_root=str(out_dir / f"b{bs}"),
                                           input_size=(SIZE, SIZE),
                                           onnx_kwargs={"dynamic_shapes": ({0: bs},)}))
        export_s[bs] = time.perf_counter() - t
    with torch.no_grad():  # the plain-torch model's score, to check the graphs against
        ref_score = ref.model(ref.normalise(train[:1])).pred_score.numpy()
    how = ("anomalib.engine.Engine().export(model, export_type='onnx', input_size=(224, 224), "
           "onnx_kwargs={'dynamic_shapes': ({0: B},)}) -> AnomalibModule.to_onnx (torch.onnx dynamo exporter), "
           "one graph per batch size B")
    return {"paths": paths, "how": how, "anomalib": version, "stored_patches": n, "bank_items": got,
            "embed_s": embed_s, "coreset_s": coreset_s, "export_s": export_s, "check_image": train[:1],
            "check_score": ref_score}


# ----------------------------------------------------------------------------- one set

def bench_set(name: str, args, work: Path) -> dict:
    config, run_name, overrides = SETS[name]
    log(f"== {name}: run {config} ({' '.join(overrides)})")
    t = time.perf_counter()
    run_config(config, run_name, overrides)
    run_s = time.perf_counter() - t
    folder = model_dir(OUT / run_name, args.site)
    train, images = site_data(config, overrides, args.site, args.images, args.seed)

    det = Detector.load(folder)
    man = det.manifest
    if det.image_size != SIZE:
        raise SystemExit(f"{folder}: model input {det.image_size} px, this benchmark is at {SIZE}")
    if man.get("n_train") is not None and int(man["n_train"]) != len(train):
        raise SystemExit(f"{folder}: trained on {man['n_train']} images, the partition gives {len(train)}")
    banks = {b["name"]: int(b["items"]) for b in man["patch_banks"]}
    bank_items = sum(banks.values())
    row: dict = {"set": name, "config": config, "overrides": overrides, "model_dir": str(folder.relative_to(ROOT)),
                 "site": args.site, "method": man.get("method"), "n_train": len(train), "banks": banks,
                 "bank_items": bank_items, "image_bank_items": (man.get("image_bank") or {}).get("items"),
                 "generator": man.get("generator") is not None, "images": len(images), "run_s": run_s}

    # 3. load time and size
    log(f"  load: Detector.load x{args.repeats}, + first image x{args.repeats}")
    row["load_s"], row["load_s_all"] = median_time(lambda: Detector.load(folder), args.repeats)
    row["load_first_s"], row["load_first_s_all"] = median_time(
        lambda: Detector.load(folder).predict(images[:1], batch_size=1), args.repeats)
    row["model_bytes"] = _folder_bytes(folder)
    row["model_files"] = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}

    # (b) our ONNX export
    from fedsecmem.model.export import export_onnx

    ours_onnx = work / f"{name}-client{args.site}.onnx"
    t = time.perf_counter()
    info = export_onnx(folder, ours_onnx)
    row["onnx_export_s"] = time.perf_counter() - t
    row["onnx_export_info"] = {k: v for k, v in (info or {}).items() if isinstance(v, (str, int, float, bool, list))}
    row["onnx_bytes"] = _onnx_bytes(ours_onnx)
    t = time.perf_counter()
    ours_sess = ort_session(ours_onnx, args.threads)
    ours_sess.run(None, {ours_sess.get_inputs()[0].name: to_input(images[:1])})
    row["onnx_session_first_s"] = time.perf_counter() - t

    # (c) anomalib
    log(f"  anomalib: fit on {len(train)} site images, coreset to {bank_items} items, export")
    a = anomalib_onnx(det, train, bank_items, work / f"anomalib-{name}", args.batch_sizes)
    row["anomalib"] = {k: v for k, v in a.items() if k not in ("paths", "check_image", "check_score")}
    row["anomalib"]["onnx_bytes"] = {bs: _onnx_bytes(p) for bs, p in a["paths"].items()}
    ano_sess = {}
    for bs, path in a["paths"].items():
        t = time.perf_counter()
        ano_sess[bs] = ort_session(path, args.threads)
        out = ort_outputs(ano_sess[bs], np.repeat(a["check_image"], bs, axis=0))
        row["anomalib"].setdefault("session_first_s", {})[bs] = time.perf_counter() - t
        row["anomalib"]["outputs"] = list(out)
        row["anomalib"].setdefault("onnx_vs_torch_score_max_abs", {})[bs] = float(
            np.abs(out["pred_score"].ravel() - a["check_score"].ravel()[0]).max())
    row["anomalib"]["inputs"] = {bs: [[i.name, i.shape] for i in sess.get_inputs()] for bs, sess in ano_sess.items()}

    # agreement of our graph with the PyTorch path on the benchmark images (one batch)
    ref_pred = det.predict(images[:args.batch_sizes[-1]], batch_size=args.batch_sizes[-1])
    got = ort_outputs(ours_sess, images[:args.batch_sizes[-1]])
    row["onnx_outputs"] = list(got)
    if "image_score" in got:
        row["onnx_vs_torch_score_max_abs"] = float(np.abs(got["image_score"].ravel() - ref_pred.scores).max())
        row["score_max_abs"] = float(np.abs(ref_pred.scores).max())
    if "anomaly_map" in got:
        m = got["anomaly_map"].reshape(ref_pred.maps.shape)
        row["onnx_vs_torch_map_max_abs"] = float(np.abs(m - ref_pred.maps).max())

    # 2. throughput
    paths = {"torch": lambda x: det.predict(x, batch_size=len(x)),
             "onnx": ort_runner(ours_sess),
             "anomalib_onnx": None}
    row["throughput"] = {}
    for bs in args.batch_sizes:
        paths["anomalib_onnx"] = ort_runner(ano_sess[bs])
        for key, fn in paths.items():
            log(f"  batch {bs}: {key}")
            row["throughput"][f"{key}@{bs}"] = throughput(fn, images, bs, args.repeats)
    return row


# ----------------------------------------------------------------------------- report

def markdown(results: dict) -> str:
    rows = results["rows"]
    head = ("| set | site | bank items (ours = anomalib) | batch | fedsecmem PyTorch img/s | fedsecmem ONNX img/s | "
            "anomalib ONNX img/s | PyTorch / anomalib | ONNX / anomalib | CPU ms/img PyTorch / ONNX / anomalib |\n"
            + "|---" * 10 + "|\n")
    lines = []
    for r in rows:
        for bs in results["args"]["batch_sizes"]:
            t, o, a = (r["throughput"][f"{k}@{bs}"] for k in ("torch", "onnx", "anomalib_onnx"))
            bank = " + ".join(f"{v:,} {k}" for k, v in r["banks"].items())
            lines.append(f"| {r['set']} | {r['site']} | {r['bank_items']:,} ({bank}) | {bs} | {t['img_s']:.1f} | "
                         f"{o['img_s']:.1f} | {a['img_s']:.1f} | {t['img_s'] / a['img_s']:.2f}x | "
                         f"{o['img_s'] / a['img_s']:.2f}x | {t['cpu_ms_per_img']:.0f} / {o['cpu_ms_per_img']:.0f} / "
                         f"{a['cpu_ms_per_img']:.0f} |")
    load_head = ("| set | site | model folder MB | files | fedsecmem ONNX MB | anomalib ONNX MB (batch-1 graph) | "
                 "`Detector.load` s | load + first image s | ONNX session + first image s (ours / anomalib) | "
                 "ONNX vs PyTorch max abs diff: score / map |\n" + "|---" * 10 + "|\n")
    load_lines = []
    b1 = results["args"]["batch_sizes"][0]
    for r in rows:
        files = ", ".join(f"{k} {_mb(v):.2f}" for k, v in r["model_files"].items())
        diff = (f"{r.get('onnx_vs_torch_score_max_abs', float('nan')):.1e} / "
                f"{r.get('onnx_vs_torch_map_max_abs', float('nan')):.1e}")
        load_lines.append(f"| {r['set']} | {r['site']} | {_mb(r['model_bytes']):.2f} | {files} | {_mb(r['onnx_bytes']):.2f} | "
                          f"{_mb(r['anomalib']['onnx_bytes'][b1]):.2f} | {r['load_s']:.3f} | {r['load_first_s']:.3f} | "
                          f"{r['onnx_session_first_s']:.2f} / {r['anomalib']['session_first_s'][b1]:.2f} | {diff} |")
    a0 = rows[0]["anomalib"] if rows else {}
    fits = "; ".join(f"{r['set']}: {r['n_train']} site images, {r['anomalib']['stored_patches']:,} patches -> "
                     f"{r['anomalib']['bank_items']:,} items, coreset {r['anomalib']['coreset_s']:.0f} s, "
                     "export " + " + ".join(f"{v:.0f}" for v in r['anomalib']['export_s'].values()) + " s" for r in rows)
    env = results["env"]
    return (f"`{results['command']}`\n\n{env['machine']}; onnxruntime {env['onnxruntime']} (CPUExecutionProvider, "
            f"{results['args']['threads']} intra-op threads), anomalib {a0.get('anomalib', '-')}; load average "
            f"{env['loadavg_start']} at the start, {env.get('loadavg_end', '-')} at the end; wall "
            f"{results.get('wall_s', 0):.0f} s.\n\n"
            f"Predict throughput at {SIZE} px over the same {results['args']['images']} test images, median of "
            f"{results['args']['repeats']} passes after one warm-up batch (wall clock; process CPU per image beside):\n\n"
            + head + "\n".join(lines) + "\n\n"
            "*fedsecmem PyTorch*: `Detector.predict` on uint8 arrays (backbone, generator, faiss nearest-neighbour "
            "search, image score, smoothed anomaly maps). *fedsecmem ONNX*: `export_onnx` of the same model folder. "
            f"*anomalib ONNX*: anomalib's `PatchcoreModel` on the same weights, stages and normalisation, fitted on the "
            f"site's own training images with a coreset of the same size ({fits}); exported with `{a0.get('how', '-')}`. "
            "Both ONNX graphs take float32 (N, 3, 224, 224) in [0, 1]; the uint8 -> float conversion is timed.\n\n"
            "Model load and size:\n\n" + load_head + "\n".join(load_lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["textures", "elpv"])
    ap.add_argument("--site", type=int, default=0, help="the site whose model is benchmarked")
    ap.add_argument("--images", type=int, default=64, help="test images per timed pass")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes (and load timings); the median is kept")
    ap.add_argument("--threads", type=int, default=2, help="torch, faiss and onnxruntime intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "predict.json")
    args = ap.parse_args(argv)
    if any(args.images % bs for bs in args.batch_sizes):
        ap.error("--images must be a multiple of every batch size (anomalib's graphs have a fixed batch)")
    command = "python bench/bench_predict.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    import faiss
    import onnxruntime

    faiss.omp_set_num_threads(args.threads)
    results = {
        "command": command.strip(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                           f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
                "onnxruntime": onnxruntime.__version__, "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "rows": [],
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_predict-") as tmp:
        for name in args.sets:
            results["rows"].append(bench_set(name, args, Path(tmp)))
    results["wall_s"] = time.perf_counter() - t0
    results["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(markdown(results))
    log(f"wrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
