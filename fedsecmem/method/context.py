"""What every method of a run is given (``MethodContext``) and gives back (``MethodOutput``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.progress import Progress

from fedsecmem.config import RunConfig
from fedsecmem.data.partition import ClientData
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.scoring import Scores
from fedsecmem.detector.site import SiteDetector
from fedsecmem.privacy.hooks import RoundHooks
from fedsecmem.privacy.ledgers import RunLedgers

__all__ = ["MethodContext", "MethodOutput", "timed"]


@dataclass(kw_only=True)
class MethodContext:
    cfg: RunConfig
    clients: list[ClientData]
    train_emb: Embeddings
    test_emb: Embeddings
    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)
    out: Path | None = None  # the run folder (state saved during the run, e.g. the privacy accountant)
    ledgers: RunLedgers | None = None  # the parties' signed records
    leakage: RoundHooks | None = None  # what each adversary saw, for the membership inference
    run_id: str | None = None  # this run's id (a client's own accountant is kept per run in process)

    @property
    def hooks(self) -> list[RoundHooks]:
        return [h for h in (self.ledgers, self.leakage) if h is not None]


@dataclass(kw_only=True)
class MethodOutput:
    """Scores of each client's test set (None: the clients scored themselves, deployment), and the
    bytes each client sent/received per round."""

    scores: list[Scores] | None
    bytes_up: list[list[int]]
    bytes_down: list[list[int]]
    rounds: int
    protocol: str
    bank_sizes: list[int | None]
    per_round: list[dict] = field(default_factory=list)  # mean metrics after each round
    aggregation: dict | None = None  # protocol and its settings (federated methods)
    privacy: dict | None = None  # DP parameters and epsilon spent (runs with privacy.dp)
    detectors: list[SiteDetector] | None = None  # what each site scores with at the end (its saved model)
    detectors_scored: bool = True  # ``scores`` came from ``detectors`` (FedSM's selector scores otherwise)
    memory: object | None = None  # the last global memory (``GlobalMemory``; memory-sharing methods)


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings[key]``."""
    t = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
