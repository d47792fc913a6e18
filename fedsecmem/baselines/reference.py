"""Reference PatchCore modes without federation: ``local`` (each client alone) and
``central`` (pooled training data: the upper reference)."""

from __future__ import annotations

import numpy as np

from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.coreset import coreset_size
from fedsecmem.detector.memory import MemoryBank, coreset_bank
from fedsecmem.method.context import MethodContext, MethodOutput, timed
from fedsecmem.progress import task
from fedsecmem.detector.site import SiteDetector

__all__ = ["fit_bank", "run_central", "run_local"]


def fit_bank(emb: Embeddings, ratio: float, seed: int, progress, label: str) -> tuple[MemoryBank, MemoryBank | None]:
    n_items = emb.patches.shape[0] * emb.patches.shape[1] * emb.patches.shape[2]
    with task(progress, label, coreset_size(n_items, ratio)) as advance:
        bank = coreset_bank(emb.patches, ratio, seed=seed, progress=advance)
    image_bank = MemoryBank(emb.images) if emb.images is not None else None
    return bank, image_bank


def run_local(ctx: MethodContext) -> MethodOutput:
    cfg = ctx.cfg
    scores, sizes, detectors = [], [], []
    for c in ctx.clients:
        with timed(ctx.timings, "coreset_s"):
            bank, ibank = fit_bank(ctx.train_emb.subset(c.train_index), cfg.memory.coreset_ratio,
                                   cfg.seed + c.client, ctx.progress, f"coreset client {c.client}")
        det = SiteDetector({"local": bank}, ibank, None, cfg.scoring.image_k, cfg.scoring.reweight_k)
        with timed(ctx.timings, "score_s"):
            scores.append(det.score(ctx.test_emb.subset(c.test_index)))
        sizes.append(len(bank))
        detectors.append(det)
    return MethodOutput(scores=scores, bytes_up=[[0] for _ in ctx.clients], bytes_down=[[0] for _ in ctx.clients],
                        rounds=1, protocol="none", bank_sizes=sizes, detectors=detectors)


def run_central(ctx: MethodContext) -> MethodOutput:
    """Pooled training images (what a consortium may not do): each client uploads its raw images."""
    cfg = ctx.cfg
    pooled = np.concatenate([c.train_index for c in ctx.clients])
    with timed(ctx.timings, "coreset_s"):
        bank, ibank = fit_bank(ctx.train_emb.subset(pooled), cfg.memory.coreset_ratio, cfg.seed,
                               ctx.progress, "coreset (pooled)")
    det = SiteDetector({"pooled": bank}, ibank, None, cfg.scoring.image_k, cfg.scoring.reweight_k)
    with timed(ctx.timings, "score_s"):
        scores = [det.score(ctx.test_emb.subset(c.test_index)) for c in ctx.clients]
    up = [[int(c.train.nbytes)] for c in ctx.clients]
    return MethodOutput(scores=scores, bytes_up=up, bytes_down=[[0] for _ in ctx.clients], rounds=1,
                        protocol="pooled-raw-images", bank_sizes=[len(bank)] * len(ctx.clients),
                        detectors=[det] * len(ctx.clients))

