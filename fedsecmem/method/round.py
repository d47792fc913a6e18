"""One FedDyMem round, written once and free of I/O: the server's side (``RoundServer``) and a
client's side (``RoundClient``) exchange the messages below; the in-process simulator
(``fedsecmem.method.simulate``) and the deployment (``fedsecmem.deployment.serve`` / ``join``)
only carry them, as the SecAgg+ machines are carried (``fedsecmem.protocols``).

Round r:
1. ``RoundServer.open(r, targets)``: refuses the round if it would take any client past the privacy
   budget (before any DP-SGD step or release), then ``begin_round`` on the hooks, then charges
   every target's DP-SGD steps and saves the state (write-ahead).
2. ``RoundServer.task`` -> ``RoundTask`` per client: train or not (not in round 1), the DP noise
   multiplier, and the last global memory for a client that does not hold it.
3. ``RoundClient.on_task`` -> ``Ready``: takes the memory, trains its generator towards it (DP-SGD
   when private), rebuilds its dynamic bank and reduces each image to prototypes (its k-means
   points, ``RoundClient.points``).
4. ``RoundServer.on_ready``: checks that enough clients are ready (the SecAgg+ threshold, the
   survivors DP noise counts on).
5. The global memory: federated k-means over a ``Collective`` of the ready clients
   (``RoundServer.aggregate``), every private release charged and saved before the clients compute
   it (``NoisySum.charge``).
6. ``RoundClient.on_memory`` -> ``Scored``: keeps the memory, scores its own test images.
7. ``RoundServer.close``: bytes, the round's record, epsilon after the round (state saved first),
   ``end_round`` on the hooks.

One place thus decides what a round sends, charges and records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fedsecmem.config import RunConfig
from fedsecmem.data.types import ImageSet
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.evaluate import headline_auroc, mean_defined
from fedsecmem.detector.scoring import Scores
from fedsecmem.method.aggregation import RoundInfo, aggregation_summary, global_memory_over, kmeans_for
from fedsecmem.method.client import Contribution, FedDyMemClient, GlobalMemory
from fedsecmem.audits.accountant import Step
from fedsecmem.privacy.budget import (
    ClientBudget, RunPrivacy, noise_floor, releases_per_round, secagg_threshold, sgd_plan,
)
from fedsecmem.privacy.hooks import RoundHooks
from fedsecmem.protocols.errors import ProtocolAbort, ProtocolError
from fedsecmem.protocols.secure_kmeans import AggregateCost, Collective, dp_kmeans_releases

__all__ = ["Ready", "RoundClient", "RoundServer", "RoundTask", "Scored"]

# ---- messages -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundTask:
    """Server to client: open round ``round``."""

    round: int
    train: bool  # train the generator towards the global memory first (not in round 1)
    z: float | None  # the DP noise multiplier (DP-SGD and the client's noise share); None: no DP
    memory: GlobalMemory | None = None  # the last global memory, for a client that does not hold it


@dataclass(frozen=True)
class Ready:
    """Client to server: trained (or not) and rebuilt; how many k-means points it holds."""

    n_prototypes: int
    n_images: int  # image embeddings it shares (0: none)
    trained: bool
    loss: float | None  # mean training loss; a private run's deployed client does not send it


@dataclass(frozen=True)
class Scored:
    """A client's scores of its own test images against its bank and the global memory. Only the
    round metrics cross the network; the scores stay with the client."""

    scores: Scores
    image_patch_max: float | None
    image_knn: float | None
    bank_size: int
    global_used: int  # global patch items it scored with (``feddymem.global_near``)

    def metrics(self) -> dict:
        return {"image_patch_max": self.image_patch_max, "image_knn": self.image_knn, "global_used": self.global_used}


# ---- the client's side --------------------------------------------------------------------------

class RoundClient:
    """One client's side of every round: its FedDyMem state and its own test set."""

    def __init__(self, cfg: RunConfig, client: FedDyMemClient, test: ImageSet, test_emb: Embeddings):
        self.cfg, self.client, self.test, self.test_emb = cfg, client, test, test_emb
        self.contribution: Contribution | None = None
        pv, fc = cfg.privacy, cfg.feddymem
        self.plan = sgd_plan(cfg)  # public: the same at every site
        # the least noise this client accepts: what its own epsilon target needs (its own calibration)
        self.floor = noise_floor(cfg, self.plan) if pv.dp else None
        self.budget: ClientBudget | None = None  # its own accountant (set by the driver in a private run)
        self.z: float | None = None  # the noise multiplier of the round in progress
        self.round = 0  # the round in progress
        self.released: dict[str, int] = {}  # private releases made in it, per k-means run
        self.on_charged: Callable[[int], None] | None = None  # after each charge (round): e.g. sign epsilon

    def charge_release(self, kmeans: str | None = None) -> None:
        """One private release this client is about to compute (for the k-means on ``kmeans``, when
        known): refused past what its own plan allows (releases per k-means run and per round) or past
        its own limit; charged (and saved) first, then ``on_charged`` (a deployed client signs its
        epsilon there, at every release)."""
        if self.budget is None or self.z is None:
            return
        cfg = self.cfg
        per_kmeans = dp_kmeans_releases(cfg.privacy.kmeans_iters)
        allowed = ("patches", "images") if cfg.feddymem.share_images else ("patches",)
        done = sum(self.released.values())
        if kmeans is not None and kmeans not in allowed:
            raise ProtocolError(f"client {self.cid}: a private release of {kmeans[:32]!r} is not in its plan; refused")
        if kmeans is not None and self.released.get(kmeans, 0) >= per_kmeans:
            raise ProtocolError(f"client {self.cid}: release {self.released[kmeans] + 1} of the {kmeans} k-means in "
                                f"round {self.round}; its plan allows {per_kmeans} (privacy.kmeans_iters); refused")
        if done >= releases_per_round(cfg):
            raise ProtocolError(f"client {self.cid}: release {done + 1} in round {self.round}; its plan allows "
                                f"{releases_per_round(cfg)} a round; refused")
        step = [Step(self.z, 1.0, 1)]
        refused = self.budget.refuse(step)
        if refused is not None:
            raise ProtocolError(refused)
        self.budget.charge(step)
        key = kmeans or "any"
        self.released[key] = self.released.get(key, 0) + 1
        if self.on_charged is not None:
            self.on_charged(self.round)

    def check_noise(self, z: float | None) -> None:
        """Refuse a private round whose noise multiplier is below this client's own floor: its
        privacy must not rest on the server's arithmetic."""
        if self.floor is None:
            return
        if z is None or not z >= self.floor * (1 - 1e-9):
            raise ProtocolError(f"noise multiplier {z} is below client {self.cid}'s floor {self.floor:.4g} "
                                f"(its own target epsilon {self.cfg.privacy.epsilon} at delta "
                                f"{self.cfg.privacy.delta:g}); refused")

    @property
    def cid(self) -> int:
        return self.client.cid

    def on_task(self, task: RoundTask) -> Ready:
        cl, pv = self.client, self.cfg.privacy
        self.check_noise(task.z)  # before anything is trained or released
        if not 1 <= task.round <= self.cfg.feddymem.rounds:
            raise ProtocolError(f"client {self.cid}: round {task.round} asked; it joined a run of "
                                f"{self.cfg.feddymem.rounds} rounds; refused")
        self.round, self.released = task.round, {}
        if task.memory is not None:
            cl.receive(task.memory)
        train = task.train and cl.generator is not None
        if train and cl.global_memory is None:
            raise ProtocolError("asked to train without a global memory")
        self.z = task.z
        if self.budget is not None:  # its own budget: the whole round's cost, before any of it
            steps = (self.budget.training(task.z) if train else []) + self.budget.releases(task.z)
            refused = self.budget.refuse(steps)
            if refused is not None:
                raise ProtocolError(refused)
            if train:
                self.budget.charge(self.budget.training(task.z))
        loss, trained = 0.0, False
        t = time.perf_counter()
        if train:
            if task.z is not None:
                targets = torch.from_numpy(cl.global_memory.patches)
                loss = cl.train_towards_dp(targets, task.z, pv.sgd_clip, self.plan, pv.sgd_batch_images)
            else:
                loss = cl.train_generator()
            trained = True
        t = cl.tick("generator_train_s", t)
        self.contribution = cl.rebuild()
        cl.tick("memory_rebuild_s", t)
        c = self.contribution
        return Ready(len(c.prototypes), 0 if c.images is None else len(c.images), trained, float(loss))

    def points(self, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """This round's k-means points and weights of ``kind`` ("patches" | "images"), or None."""
        c = self.contribution
        if c is None:
            raise ProtocolError("k-means before the round's task")
        if kind == "patches":
            return c.prototypes, c.weights
        return c.image_points()

    def detector(self):
        """What this client scores with now (the site's model at the run's end)."""
        sc = self.cfg.scoring
        return self.client.detector(self.cfg.feddymem.score_with, sc.image_k, sc.reweight_k)

    def on_memory(self, memory: GlobalMemory | None) -> Scored:
        cl, sc = self.client, self.cfg.scoring
        if memory is not None:
            cl.receive(memory)
        if cl.global_memory is None:
            raise ProtocolError("asked to score without a global memory")
        scores = self.detector().score(self.test_emb)
        return Scored(scores, headline_auroc(self.test, scores.image_patch), headline_auroc(self.test, scores.image_knn),
                      len(cl.bank), cl.global_used)


# ---- the server's side --------------------------------------------------------------------------

class RoundServer:
    """The server's side of every round: privacy budget, global memory, bytes and records."""

    def __init__(self, cfg: RunConfig, privacy: RunPrivacy | None, hooks: Sequence[RoundHooks] = (),
                 out: Path | None = None):
        self.cfg, self.privacy, self.hooks, self.out = cfg, privacy, list(hooks), out
        self.memory: GlobalMemory | None = None
        self.per_round: list[dict] = []
        n = cfg.clients.n
        self.bytes_up: list[list[int]] = [[] for _ in range(n)]
        self.bytes_down: list[list[int]] = [[] for _ in range(n)]

    @property
    def z(self) -> float | None:
        return self.privacy.z if self.privacy is not None else None

    def need(self) -> int:
        """Clients a round needs: the SecAgg+ threshold, and the survivors DP noise counts on."""
        need = secagg_threshold(self.cfg) if self.cfg.protocol == "secagg" else 1
        return max(need, self.privacy.noisy.need if self.privacy is not None else 1)

    def open(self, r: int, targets: Sequence[int]) -> str | None:
        """Begin round ``r`` with ``targets``, or the reason it may not run (nothing recorded or
        released then). From round 2 every target is charged its DP-SGD steps here, and the state
        saved, before any task goes out (write-ahead: a client trains before it replies, so a lost
        reply or a crash must not lose the charge)."""
        if self.privacy is not None:
            refused = self.privacy.refuse(r)
            if refused is not None:
                return refused
            if r == 1:  # the noise actually used, signed before anything is released
                for h in self.hooks:
                    h.privacy_plan(self.privacy.plan())
        for h in self.hooks:
            h.begin_round(r)
        if self.privacy is not None and r > 1:
            self.privacy.record_sgd(sorted(targets))
        return None

    def task(self, r: int, resend: bool = False) -> RoundTask:
        return RoundTask(r, r > 1, self.z, self.memory if resend else None)

    def on_ready(self, r: int, ready: dict[int, Ready]) -> list[int]:
        """The round's participants (its DP-SGD steps were charged at ``open``)."""
        if len(ready) < self.need():
            raise ProtocolAbort(f"round {r}: only {len(ready)} clients ready, at least {self.need()} needed")
        return sorted(ready)

    def aggregate(self, patches: Collective,
                  images: Callable[[], Collective] | None) -> tuple[GlobalMemory, AggregateCost, RoundInfo]:
        """The global memory by federated k-means over the ready clients' points (private k-means,
        its releases charged as they happen, when DP is on)."""
        return global_memory_over(kmeans_for(self.cfg, self.z), patches, images)

    def close(self, r: int, memory: GlobalMemory, bytes_up: dict[int, int], bytes_down: dict[int, int], info: RoundInfo,
              ready: dict[int, Ready], scored: dict[int, dict], targets: Sequence[int]) -> dict:
        """End round ``r``: keep the memory, count the bytes, write the record (epsilon after the
        round, privacy state saved) and tell the hooks. ``scored``: client -> ``Scored.metrics()``."""
        self.memory = memory
        for c in range(self.cfg.clients.n):
            self.bytes_up[c].append(int(bytes_up.get(c, 0)))
            self.bytes_down[c].append(int(bytes_down.get(c, 0)))
        rows = [scored[c] for c in sorted(scored)]  # a private deployment's clients withhold their metrics
        record = {"round": r, "image_patch_max": mean_defined(rows, "image_patch_max"),
                  "image_knn": mean_defined(rows, "image_knn"),
                  **info.record(),
                  "participants": sorted(scored), "dropped": sorted(set(targets) - set(scored))}
        losses = [ready[c].loss for c in sorted(ready) if ready[c].trained and ready[c].loss is not None]
        if losses:
            record["loss"] = float(np.mean(losses))
        used = [row["global_used"] for row in rows if row.get("global_used") is not None]
        if self.cfg.feddymem.global_near is not None and used:
            record["global_items_used"] = float(np.mean(used))
        if self.privacy is not None:
            record["epsilon"] = self.privacy.end_round(self.out)
        for h in self.hooks:
            h.end_round(r, record, self.privacy)
        self.per_round.append(record)
        return record

    def aggregation(self, **extra) -> dict:
        """results.json's ``aggregation`` record of this run."""
        return {**aggregation_summary(self.cfg, self.cfg.global_seeding,
                                      self.cfg.privacy.noise if self.privacy is not None else None), **extra}
