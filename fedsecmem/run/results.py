"""The results.json contract as a typed model (documented field by field in docs/results.md):
the runner and the server write it through ``Results``; the CLI, the sweep and the tests read it
back through ``load_results``. A new field is added here and in docs/results.md (a test checks
that every field is documented); ``schema_version`` changes when a field changes meaning."""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from fedsecmem import __version__
from fedsecmem.config import RunConfig
from fedsecmem.data.load import CALIBRATION_CAVEATS
from fedsecmem.detector.evaluate import category_summary, mean_defined
from fedsecmem.errors import UserError
from fedsecmem.method.context import MethodOutput
from fedsecmem.provenance import source_commit

__all__ = ["RESULTS_FILE", "SCHEMA_VERSION", "Results", "decisions_summary", "load_results", "results_document",
           "write_results"]

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 1


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """A record whose listed fields are typed and whose further fields are kept as written."""

    model_config = ConfigDict(extra="allow")


class CategoryResult(_Open):
    n_test: int
    auroc_image: float | None = None
    auroc_pixel: float | None = None
    clients: int | None = None
    fpr: float | None = None
    tpr: float | None = None
    f1: float | None = None


class KindResult(_Open):
    n_test: int
    apart: bool
    auroc_image: float | None = None
    clients: int | None = None


class Auroc(_Closed):
    image: float | None
    pixel: float | None
    image_patch_max: float | None
    image_knn: float | None
    pro: float | None
    primary_score: Literal["patch", "image"]
    clients_scored: int
    pooled_image_patch_max: float | None = None
    pooled_image_knn: float | None = None
    per_category: dict[str, CategoryResult] = {}
    category_mean_image: float | None = None
    category_mean_pixel: float | None = None
    per_kind: dict[str, KindResult] = {}


class ClientResult(_Open):
    client: int
    n_train: int | None  # None: kept by the client (a private deployment sends no training counts)
    products: dict[str, int]
    bank_size: int | None
    n_test: int
    auroc_image: float | None
    auroc_pixel: float | None = None
    auroc_patch: float | None = None
    auroc_knn: float | None = None
    pro: float | None = None
    per_category: dict[str, CategoryResult] = {}
    per_kind: dict[str, KindResult] = {}
    threshold: float | None = None
    threshold_method: str | None = None
    n_calibration: int | None = None
    fpr: float | None = None
    tpr: float | None = None
    precision: float | None = None
    f1: float | None = None


class RoundRecord(_Open):
    round: int
    image_patch_max: float | None = None
    image_knn: float | None = None
    secure_sums: int | None = None
    kmeans_objective: float | None = None
    kmeans_updates: int | None = None
    global_items: int | None = None
    participants: list[int] | None = None
    dropped: list[int] | None = None
    loss: float | None = None
    epsilon: float | None = None
    global_items_used: float | None = None
    selector_accuracy: float | None = None


class Privacy(_Open):
    dp: bool
    epsilon: float | None
    delta: float | None
    epsilon_infinite: bool | None = None
    per_client: list[float | None] | None = None
    per_client_per_round: list[list[float | None]] | None = None
    noise_multiplier: float | None = None


class Comm(_Closed):
    bytes_up: list[list[int]]
    bytes_down: list[list[int]]


class Environment(_Closed):
    fedsecmem: str
    torch: str
    python: str
    commit: str | None = None  # the source tree's git commit (with "+changes" when it differs), if any


class Results(_Closed):
    schema_version: int = SCHEMA_VERSION
    name: str
    method: str
    benchmark: str
    seed: int
    protocol: str
    aggregation: dict[str, Any] | None
    rounds: int
    clients: int
    auroc: Auroc
    per_client: list[ClientResult]
    per_round: list[RoundRecord]
    privacy: Privacy
    comm: Comm
    timing: dict[str, float | None]
    peak_rss_mb: float
    wall_seconds: float
    device: str
    threads: int
    environment: Environment
    files: dict[str, str | None]
    run_id: str
    threat_model: dict[str, Any]
    leakage: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    deployment: dict[str, Any] | None = None
    decisions: dict[str, Any] | None = None
    models: dict[str, Any] | None = None

    def to_json(self) -> dict:
        """The document as written (fields never set are left out, as before they existed)."""
        return self.model_dump(mode="json", exclude_unset=True)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def results_document(cfg: RunConfig, benchmark: str, per_client: list[dict], output: MethodOutput, timings: dict,
                     t_start: float, device: str, files: dict, pooled: dict | None = None,
                     n_images: int | None = None, n_test: int | None = None, extra: dict | None = None) -> Results:
    """The results of a run from a method's output and the per-client evaluation rows."""
    pooled = pooled or {}
    embed_s = timings.get("embed_train_s", 0.0) + timings.get("embed_test_s", 0.0)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "method": cfg.method,
        "benchmark": benchmark,
        "seed": cfg.seed,
        "protocol": output.protocol,
        "aggregation": output.aggregation,
        "rounds": output.rounds,
        "clients": cfg.clients.n,
        "auroc": {
            "image": mean_defined(per_client, "auroc_image"),
            "pixel": mean_defined(per_client, "auroc_pixel"),
            "image_patch_max": mean_defined(per_client, "auroc_patch"),
            "image_knn": mean_defined(per_client, "auroc_knn"),
            "pro": mean_defined(per_client, "pro"),
            "primary_score": cfg.scoring.primary,
            "clients_scored": sum(r["auroc_image"] is not None for r in per_client),
            # one model for everyone (central): AUROC over all clients' test images together
            "pooled_image_patch_max": pooled.get("patch"),
            "pooled_image_knn": pooled.get("knn"),
            # each category (product) scored on its own, as MVTec AD's protocol
            **category_summary(per_client),
        },
        "per_client": per_client,
        "per_round": output.per_round,
        "privacy": output.privacy or {"epsilon": None, "delta": None, "dp": False},
        "comm": {"bytes_up": output.bytes_up, "bytes_down": output.bytes_down},
        "timing": {**{k: round(v, 3) for k, v in timings.items()},
                   "embed_images_per_s": round(n_images / embed_s, 2) if embed_s > 0 and n_images else None,
                   "score_images_per_s": round(n_test / timings["score_s"], 2)
                   if timings.get("score_s") and n_test else None},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "device": device,
        "threads": torch.get_num_threads(),
        "environment": {"fedsecmem": __version__, "torch": torch.__version__, "python": platform.python_version(),
                        "commit": source_commit()},
        "files": files,
        **(extra or {}),
    }
    return Results.model_validate(doc)


def decisions_summary(cfg: RunConfig, per_client: list[dict]) -> dict:
    """results.json's ``decisions``: the calibration asked for and the decisions at each site's
    threshold, averaged over the sites that have one."""
    calibrated = [r for r in per_client if r.get("threshold") is not None]
    return {"target_fpr": cfg.predict.target_fpr, "calibration_fraction": cfg.predict.calibration_fraction,
            "calibration": cfg.predict.calibration, "sites_calibrated": len(calibrated),
            **{k: mean_defined(calibrated, k) for k in ("fpr", "tpr", "precision", "f1")},
            "caveat": CALIBRATION_CAVEATS.get(cfg.data.benchmark)}


def write_results(cfg: RunConfig, results: Results, out: Path) -> dict:
    """``OUT/config.yaml`` (the validated config) and ``OUT/results.json``; returns the document."""
    doc = results.to_json()
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    (out / RESULTS_FILE).write_text(json.dumps(doc, indent=2))
    return doc


def load_results(run_dir: str | Path) -> Results:
    """A run folder's results, validated (a one-line error naming the problem otherwise)."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESULTS_FILE} (not a run folder?)")
    try:
        return Results.model_validate_json(path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']} (results schema {SCHEMA_VERSION})") from None
