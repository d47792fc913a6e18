"""One run end to end: data, client split, embeddings, method, evaluation, outputs.

Writes ``OUT/results.json`` (the contract of DESIGN.md section 7), ``OUT/config.yaml``
(the validated config) and ``OUT/anomaly_maps.png``.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import numpy as np
import torch

from fedsecmem.detector.backbone import BackboneInfo, build_embedder, resolve_device
from fedsecmem.config import RunConfig
from fedsecmem.data.load import load_benchmark
from fedsecmem.detector.embedding_cache import load_cached, store_cached
from fedsecmem.data.partition import calibration_split, partition
from fedsecmem.data.types import ImageSet
from fedsecmem.crypto.errors import OverflowRisk
from fedsecmem.errors import UserError
from fedsecmem.protocols.errors import ProtocolAbort, ProtocolError
from fedsecmem.detector.evaluate import evaluate_client, mean_defined
from fedsecmem.detector.metrics import auroc
from fedsecmem.model.site import keep_model, site_threshold
from fedsecmem.model.store import MODELS_DIR, model_dir
from fedsecmem.run.results import decisions_summary, results_document, write_results
from fedsecmem.run.plots import anomaly_map_grid, pick_examples, round_curve
from fedsecmem.progress import make_progress, task
from fedsecmem.privacy.threat_model import threat_model
from fedsecmem.audits.ledger import LEDGER_DIR, key_fingerprint, remove_stale_plots, signed_files
from fedsecmem.audits.mia import dp_auc_bound, dp_tpr_bound
from fedsecmem.method.context import MethodContext
from fedsecmem.methods import METHODS, implementation
from fedsecmem.run.leakage import LeakageViews, hold_out, measure, roc_plot, strip_scores
from fedsecmem.privacy.ledgers import RunLedgers

from fedsecmem.detector.scoring import anomaly_maps

__all__ = ["LEAKAGE_PNG", "run"]

LEAKAGE_PNG = "leakage_roc.png"



def _embed(embedder, images: np.ndarray, batch: int, progress, label: str):
    with task(progress, label, len(images)) as advance:
        return embedder.embed(images, batch, progress=advance)


def _client_products(client, names: list[str]) -> dict[str, int]:
    counts = np.bincount(client.train.products, minlength=len(names))
    return {names[p]: int(n) for p, n in enumerate(counts) if n}


def split_sites(cfg: RunConfig, bench) -> tuple[list, dict[int, np.ndarray] | None, dict[int, np.ndarray]]:
    """Every site's data as every backend splits it (in process, ``join``, Ray): the configured
    partition; with ``audit.leakage`` the withheld non-members (client -> indices; None without);
    each site's calibration normals, never in its bank, that set its threshold (client -> indices)."""
    try:
        clients = partition(bench, cfg.clients.n, cfg.clients.alpha, cfg.seed, cfg.clients.min_train)
    except ValueError as exc:
        raise UserError(f"clients.n: {exc}") from None
    held = None
    if cfg.audit.leakage:  # non-members for the membership inference (every method: same training data)
        try:
            clients, held = hold_out(clients, cfg.audit.holdout_fraction, cfg.seed,
                                     by_patient=cfg.privacy.unit == "patient")
        except ValueError as exc:
            raise UserError(f"audit.holdout_fraction: {exc}") from None
    clients, calibration = calibration_split(clients, cfg.predict.calibration_fraction, cfg.seed)
    return clients, held, calibration


def run(cfg: RunConfig, out: Path) -> dict:
    """Run ``cfg``, write outputs under ``out``, return the results dict."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_plots(out)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror}") from None
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    bench = load_benchmark(cfg.data, cfg.seed, patients=cfg.privacy.unit == "patient")
    clients, held, calibration = split_sites(cfg, bench)
    timings["data_s"] = time.perf_counter() - t

    device = resolve_device(cfg.backbone.device)
    with make_progress() as progress:
        cached = load_cached(cfg, bench)
        if cached is None:  # the backbone is loaded only when something needs embedding
            embedder = build_embedder(cfg.backbone)
            t = time.perf_counter()
            train_emb = _embed(embedder, bench.train.images, cfg.backbone.batch_size, progress, "embed train images")
            timings["embed_train_s"] = time.perf_counter() - t
            t = time.perf_counter()
            test_emb = _embed(embedder, bench.test.images, cfg.backbone.batch_size, progress, "embed test images")
            timings["embed_test_s"] = time.perf_counter() - t
            store_cached(cfg, bench, train_emb, test_emb, timings)
        else:
            train_emb, test_emb, cached_timings = cached
            timings.update(cached_timings)
        ledgers = RunLedgers(out, cfg.clients.n, cfg.privacy.delta) if cfg.audit.ledger else None
        run_id = secrets.token_hex(8)
        if ledgers is not None:
            ledgers.start(cfg, run_id)
        leakage = LeakageViews(cfg) if held is not None and METHODS[cfg.method].memory_sharing else None
        ctx = MethodContext(cfg=cfg, clients=clients, train_emb=train_emb, test_emb=test_emb, progress=progress,
                            timings=timings, out=out, ledgers=ledgers, leakage=leakage, run_id=run_id)
        t = time.perf_counter()
        try:
            output = implementation(cfg.method)(ctx)
        except (OverflowRisk, ProtocolAbort, ProtocolError) as exc:  # refused before anything was revealed
            _end_ledgers(ledgers, f"failed: {exc}", run_id=run_id)
            raise UserError(f"aggregation ({cfg.protocol}): {exc}") from None
        except BaseException as exc:
            _end_ledgers(ledgers, f"failed: {type(exc).__name__}: {exc}", run_id=run_id)
            raise
        timings["method_s"] = time.perf_counter() - t
        leak = None
        if leakage is not None and leakage.armed:
            t = time.perf_counter()
            with task(progress, "membership inference", len(clients)) as advance:
                leak = measure(cfg, leakage.clients, held, train_emb, leakage,
                               leakage.clients[0].global_memory.patches, advance)
            timings["leakage_s"] = time.perf_counter() - t

    t = time.perf_counter()
    per_client: list[dict] = []
    thresholds = {}
    for c, scores in zip(clients, output.scores):
        det = output.detectors[c.client] if output.detectors is not None else None
        thresholds[c.client] = site_threshold(cfg, det, train_emb.subset(calibration[c.client]))
        row = {"client": c.client, "n_train": int(len(c.train)), "products": _client_products(c, bench.train.product_names),
               "bank_size": output.bank_sizes[c.client]}
        # decisions only where the threshold was calibrated with the scorer that gave these scores (not FedSM's)
        row.update(evaluate_client(c.test, scores, cfg.scoring.primary, cfg.scoring.smoothing_sigma, cfg.scoring.pro,
                                   thresholds[c.client] if output.detectors_scored else None))
        per_client.append(row)
    timings["evaluate_s"] = time.perf_counter() - t
    models = _keep_models(cfg, out, clients, output, thresholds, run_id, ledgers)

    pooled = _pooled_auroc(clients, output) if cfg.method == "central" else {}
    maps_png = _save_map_grid(cfg, clients, output, out)
    curve_png = round_curve(output.per_round, out / "auroc_per_round.png") if len(output.per_round) > 1 else None
    extra = {"run_id": run_id, "threat_model": threat_model(cfg), "decisions": decisions_summary(cfg, per_client)}
    if models:
        extra["models"] = models
    files = {"anomaly_maps": maps_png.name if maps_png else None,
             "auroc_per_round": curve_png.name if curve_png else None}
    if leak is not None:
        files["leakage_roc"] = roc_plot(leak, out / LEAKAGE_PNG).name
        extra["leakage"] = strip_scores(leak)
        eps = (output.privacy or {}).get("epsilon")
        if eps is not None:  # what the guarantee alone promises against any attack
            extra["leakage"]["dp_bound"] = {"epsilon": eps, "delta": cfg.privacy.delta,
                                            "auc": dp_auc_bound(eps, cfg.privacy.delta),
                                            "tpr": dp_tpr_bound(eps, cfg.privacy.delta, cfg.audit.fpr)}
    if ledgers is not None:  # the heads as they are before run_end, which then signs results.json
        extra["ledger"] = {"dir": LEDGER_DIR, "key_fingerprint": key_fingerprint(ledgers.public),
                           "parties": len(ledgers.all()), "heads": ledgers.heads()}
    results = results_document(cfg, bench.name, per_client, output, timings, t_start, str(device), files,
                               pooled, n_images=len(bench.train) + len(bench.test), n_test=len(bench.test),
                               extra=extra)
    doc = write_results(cfg, results, out)
    _end_ledgers(ledgers, "completed", run_id=run_id, files=signed_files(out),
                 auroc_image=mean_defined(per_client, "auroc_image"), epsilon=(output.privacy or {}).get("epsilon"))
    return doc


def _keep_models(cfg: RunConfig, out: Path, clients, output, thresholds: dict, run_id: str, ledgers) -> dict | None:
    """Every site's model folder (``OUT/models/client-<i>``), its manifest signed in the site's ledger."""
    if not cfg.predict.save_models or output.detectors is None:
        return None
    t = time.perf_counter()
    backbone = BackboneInfo.of(cfg.backbone, cfg.data.image_size)
    sites = {}
    for c in clients:
        folder = model_dir(out, c.client)
        digest = keep_model(cfg, folder, c.client, output.detectors[c.client], thresholds[c.client], backbone,
                            run_id, len(c.train), output.memory)
        sites[str(c.client)] = digest
        if ledgers is not None:
            ledgers.clients[c.client].append("model", manifest_sha256=digest, folder=str(folder.relative_to(out)))
    return {"dir": MODELS_DIR, "manifest_sha256": sites, "seconds": round(time.perf_counter() - t, 3)}


def _end_ledgers(ledgers, status: str, **fields) -> None:
    if ledgers is not None:
        ledgers.end(status, **fields)


def _pooled_auroc(clients, output) -> dict:
    keep = np.concatenate([c.test.headline for c in clients])
    labels = np.concatenate([c.test.labels for c in clients])[keep]
    out = {"patch": auroc(labels, np.concatenate([s.image_patch for s in output.scores])[keep])}
    if all(s.image_knn is not None for s in output.scores):
        out["knn"] = auroc(labels, np.concatenate([s.image_knn for s in output.scores])[keep])
    return out


def _save_map_grid(cfg: RunConfig, clients, output, out: Path) -> Path | None:
    """Anomaly maps for a few defective test images per product, from the client that scored them."""
    per = cfg.output.map_examples_per_product
    if per <= 0:
        return None
    rows = []
    for c, scores in zip(clients, output.scores):
        for i in pick_examples(c.test, per):
            rows.append((c, scores, i))
    seen: dict[int, int] = {}
    chosen = []
    for c, scores, i in rows:  # keep `per` per product over all clients
        prod = int(c.test.products[i])
        if seen.get(prod, 0) < per:
            seen[prod] = seen.get(prod, 0) + 1
            chosen.append((c, scores, i))
    if not chosen:
        return None
    images = np.stack([c.test.images[i] for c, _, i in chosen])
    masks = np.stack([c.test.masks[i] for c, _, i in chosen]) if chosen[0][0].test.masks is not None else None
    subset = ImageSet(images, np.ones(len(chosen), np.int64), np.array([c.test.products[i] for c, _, i in chosen]),
                      [c.test.kinds[i] for c, _, i in chosen], chosen[0][0].test.product_names, masks)
    patch = np.stack([s.patch[i] for _, s, i in chosen])
    maps = anomaly_maps(patch, images.shape[1], cfg.scoring.smoothing_sigma)
    image_scores = np.array([s.image(cfg.scoring.primary)[i] for _, s, i in chosen])
    return anomaly_map_grid(subset, list(range(len(chosen))), maps, image_scores, out / "anomaly_maps.png")
