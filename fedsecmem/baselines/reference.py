"""Reference PatchCore modes without federation: ``local`` (each client alone) and
``central`` (pooled training data: the upper reference)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.coreset import coreset_size
from fedsecmem.data.partition import ClientData
from fedsecmem.detector.memory import MemoryBank, coreset_bank
from fedsecmem.progress import task
from fedsecmem.detector.scoring import Scores, score_embeddings


@dataclass
class MethodContext:
    cfg: object  # RunConfig
    clients: list[ClientData]
    train_emb: Embeddings
    test_emb: Embeddings
    progress: object = None
    timings: dict = field(default_factory=dict)
    out: Path | None = None  # the run folder (state saved during the run, e.g. the privacy accountant)
    ledgers: object = None  # RunLedgers: the parties' signed records (fedsecmem.privacy.ledgers)
    leakage: object = None  # LeakageViews: what each adversary saw, for the membership inference


@contextmanager
def timed(timings: dict, key: str):
    """Add the wall time of the block to ``timings[key]``."""
    t = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t


@dataclass
class MethodOutput:
    """Scores of each client's test set, and bytes each client sent/received per round."""

    scores: list[Scores]
    bytes_up: list[list[int]]
    bytes_down: list[list[int]]
    rounds: int
    protocol: str
    bank_sizes: list[int]
    per_round: list[dict] = field(default_factory=list)  # mean metrics after each round
    aggregation: dict | None = None  # protocol and its settings (federated methods)
    privacy: dict | None = None  # DP parameters and epsilon spent (runs with privacy.dp)


def fit_bank(emb: Embeddings, ratio: float, seed: int, progress, label: str) -> tuple[MemoryBank, MemoryBank | None]:
    n_items = emb.patches.shape[0] * emb.patches.shape[1] * emb.patches.shape[2]
    with task(progress, label, coreset_size(n_items, ratio)) as advance:
        bank = coreset_bank(emb.patches, ratio, seed=seed, progress=advance)
    image_bank = MemoryBank(emb.images) if emb.images is not None else None
    return bank, image_bank


def run_local(ctx: MethodContext) -> MethodOutput:
    cfg = ctx.cfg
    scores, sizes = [], []
    for c in ctx.clients:
        with timed(ctx.timings, "coreset_s"):
            bank, ibank = fit_bank(ctx.train_emb.subset(c.train_index), cfg.memory.coreset_ratio,
                                   cfg.seed + c.client, ctx.progress, f"coreset client {c.client}")
        with timed(ctx.timings, "score_s"):
            scores.append(score_embeddings(ctx.test_emb.subset(c.test_index), [bank], ibank, cfg.scoring.image_k, cfg.scoring.reweight_k))
        sizes.append(len(bank))
    zeros = [[0] for _ in ctx.clients]
    return MethodOutput(scores, zeros, [[0] for _ in ctx.clients], 1, "none", sizes)


def run_central(ctx: MethodContext) -> MethodOutput:
    """Pooled training images (what a consortium may not do): each client uploads its raw images."""
    cfg = ctx.cfg
    pooled = np.concatenate([c.train_index for c in ctx.clients])
    with timed(ctx.timings, "coreset_s"):
        bank, ibank = fit_bank(ctx.train_emb.subset(pooled), cfg.memory.coreset_ratio, cfg.seed,
                               ctx.progress, "coreset (pooled)")
    with timed(ctx.timings, "score_s"):
        scores = [score_embeddings(ctx.test_emb.subset(c.test_index), [bank], ibank, cfg.scoring.image_k, cfg.scoring.reweight_k)
                  for c in ctx.clients]
    up = [[int(c.train.nbytes)] for c in ctx.clients]
    return MethodOutput(scores, up, [[0] for _ in ctx.clients], 1, "pooled-raw-images",
                        [len(bank)] * len(ctx.clients))


REFERENCE_METHODS = {"local": run_local, "central": run_central}
