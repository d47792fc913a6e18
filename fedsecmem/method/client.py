"""FedDyMem: federated dynamic memory (client and server logic, free of I/O).

A round:
1. every client maps its frozen patch embeddings through its memory
   generator, rebuilds its local bank (coreset: the dynamic memory bank),
   reduces each image to a few weighted prototypes (memory-reduce) and hands
   them, with its image embeddings, to the aggregation;
2. the aggregation (``fedsecmem.method.aggregation``: weighted k-means on the
   uploads in faithful `plain` mode, federated k-means over a secure sum
   otherwise) returns the global memory, which every client receives;
3. clients are evaluated with their local bank and the global memory;
4. clients train their generator with the metric loss towards the global
   memory (not after the last round, whose banks would go stale).

Nothing but prototypes, their weights and image-level embeddings leaves a
client; the generator never does.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedsecmem.detector.backbone import Embeddings
from fedsecmem.method.generator import MemoryGenerator
from fedsecmem.detector.memory import MemoryBank, coreset_bank
from fedsecmem.method.metric_loss import anti_collapse_target, metric_loss, per_image_metric_loss
from fedsecmem.method.reduce import reduce_images
from fedsecmem.detector.scoring import Scores
from fedsecmem.detector.site import SiteDetector, image_bank_for, near_items, patch_banks_for

__all__ = [
    "Contribution", "FLOAT_BYTES", "FedDyMemClient", "GLOBAL_MEMORY_FILE", "GlobalMemory", "LossTerm",
    "TARGET_SAMPLE", "load_global_memory", "patients_of", "save_global_memory",
]

FLOAT_BYTES = 4


class LossTerm:
    """One more term of the generator's local objective, or a step on its weights after every
    optimizer step; the parameter-sharing baselines add theirs (FedProx' proximal term, Weight
    Scope Alignment, FedSM's SoftPull) as a list of these. No-ops unless overridden."""

    def start(self, generator: torch.nn.Module) -> None:
        """Local training begins (e.g. remember the starting weights)."""

    def penalty(self, generator: torch.nn.Module) -> torch.Tensor | None:
        """Added to the metric loss of every batch (None: nothing)."""
        return None

    def after_step(self, generator: torch.nn.Module, lr: float) -> None:
        """Called without gradients after every optimizer step of learning rate ``lr``."""
TARGET_SAMPLE = 50_000  # patches used to measure the spread the generator must keep


@dataclass
class Contribution:
    """What one client shares in a round."""

    prototypes: np.ndarray  # (P, M) reduced patch prototypes in memory space
    weights: np.ndarray  # (P,) each image's prototypes sum to its unit weight (1; 1/m for a patient's m images)
    images: np.ndarray | None  # (N, E) image-level embeddings, or None
    image_weights: np.ndarray | None = None  # (N,) each image's unit weight (None: 1 each)

    def image_points(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The image embeddings and their weights for k-means (each its unit weight), or None."""
        if self.images is None:
            return None
        return self.images, (self.image_weights if self.image_weights is not None else np.ones(len(self.images)))

    @property
    def nbytes(self) -> int:
        n = self.prototypes.size + self.weights.size + (0 if self.images is None else self.images.size)
        return int(n * FLOAT_BYTES)


@dataclass
class GlobalMemory:
    patches: np.ndarray  # (K, M)
    images: np.ndarray | None  # (K_img, E)

    @property
    def nbytes(self) -> int:
        return int((self.patches.size + (0 if self.images is None else self.images.size)) * FLOAT_BYTES)


GLOBAL_MEMORY_FILE = "global_memory.npz"


def save_global_memory(memory: GlobalMemory | None, path) -> None:
    """A global memory as ``.npz`` (patches, and images if shared), written atomically."""
    if memory is None or path is None:
        return
    from pathlib import Path

    path = Path(path)
    arrays = {"patches": memory.patches} if memory.images is None else {"patches": memory.patches,
                                                                         "images": memory.images}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_global_memory(path) -> GlobalMemory:
    with np.load(path) as z:
        return GlobalMemory(z["patches"], z["images"] if "images" in z else None)


class FedDyMemClient:
    """One client's state: its embeddings, generator, dynamic local bank and the global memory."""

    def __init__(self, cid: int, train: Embeddings, cfg, seed: int, coreset_ratio: float,
                 use_generator: bool = True, device: torch.device | str = "cpu", groups: np.ndarray | None = None):
        """``groups``: the patient of each training image when a patient is the privacy unit (its
        images then share a weight of 1 in every release, and DP-SGD samples and clips patients)."""
        self.cid = cid
        self.groups = None if groups is None else np.asarray(groups)
        if self.groups is not None and len(self.groups) != len(train.patches):
            raise ValueError("groups and training images differ in length")
        self.device = torch.device(device)
        self.coreset_ratio = coreset_ratio
        self.train = train
        self.cfg = cfg  # FedDyMemConfig
        self.seed = seed
        d = train.patches.shape[-1]
        self.generator = (MemoryGenerator(d, cfg.memory_dim or d, cfg.hidden, seed).to(self.device)
                          if use_generator else None)
        self.target_std = self._spread_target()
        self.bank: MemoryBank | None = None
        self.image_bank = MemoryBank(train.images) if train.images is not None else None
        self.global_memory: GlobalMemory | None = None
        self.global_bank: MemoryBank | None = None
        self.joint_image_bank: MemoryBank | None = None  # own image embeddings + global image memory
        self.global_used = 0  # global patch items this client scores with (feddymem.global_near)
        self.losses: list[float] = []
        self.timings: dict[str, float] = {}  # seconds spent per stage (for the round-time split)

    def _spread_target(self) -> torch.Tensor:
        """The per-dimension spread the generator must keep, measured in its current space."""
        flat = self.train.patches.reshape(-1, self.train.patches.shape[-1])
        sample = flat[np.random.default_rng(self.seed).permutation(len(flat))[:TARGET_SAMPLE]]
        return anti_collapse_target(torch.from_numpy(self.memory_space(sample)))

    def start_from(self, state: dict[str, torch.Tensor]) -> None:
        """Take ``state`` as the initial generator (parameter sharing: every model starts from the
        same one) and re-measure the spread target in its space."""
        self.generator.load_state_dict(state)
        self.target_std = self._spread_target()

    def memory_space(self, patches: np.ndarray) -> np.ndarray:
        return self.generator.transform(patches) if self.generator is not None else patches

    def rebuild_bank(self) -> np.ndarray:
        """Dynamic memory bank: re-embed with the current generator and rebuild the coreset.
        Returns the training patches in memory space."""
        t = time.perf_counter()
        z = self.memory_space(self.train.patches)
        t = self.tick("generator_embed_s", t)
        self.bank = coreset_bank(z, self.coreset_ratio, seed=self.seed)
        self.tick("coreset_s", t)
        return z

    def rebuild(self) -> Contribution:
        """Rebuild the bank, then reduce each image to weighted prototypes: what the client shares."""
        z = self.rebuild_bank()
        t = time.perf_counter()
        protos, weights = reduce_images(z, self.cfg.reduce_ratio, self.cfg.reduce_iters)
        self.tick("reduce_s", t)
        unit = self.unit_weights()
        return Contribution(protos.reshape(-1, protos.shape[-1]), (weights * unit[:, None]).reshape(-1),
                            self.train.images if self.cfg.share_images else None,
                            unit if self.cfg.share_images else None)

    def unit_weights(self) -> np.ndarray:
        """(N,) each training image's weight in a release: 1, or 1/m for each of a patient's m images
        (so removing one unit moves a release by at most the same bound)."""
        if self.groups is None:
            return np.ones(len(self.train.patches))
        _, inverse, counts = np.unique(self.groups, return_inverse=True, return_counts=True)
        return 1.0 / counts[inverse]

    @property
    def units(self) -> int:
        """How many privacy units this client holds: images, or patients."""
        return len(self.train.patches) if self.groups is None else len(np.unique(self.groups))

    def tick(self, key: str, since: float) -> float:
        """Add the seconds since ``since`` to ``timings[key]``; returns now."""
        now = time.perf_counter()
        self.timings[key] = self.timings.get(key, 0.0) + now - since
        return now

    def receive(self, memory: GlobalMemory) -> None:
        """Keep the global memory and index it once for the round's scoring."""
        self.global_memory = memory
        patches = near_items(self.bank, memory.patches, self.cfg.global_near)  # near its own normal patches
        self.global_used = len(patches)
        self.global_bank = MemoryBank(patches) if len(patches) else None
        if self.image_bank is not None and memory.images is not None:
            self.joint_image_bank = MemoryBank(np.concatenate([self.image_bank.items, memory.images]))

    def train_generator(self) -> float:
        """FedDyMem's local training: the metric loss towards the global memory."""
        if self.generator is None or self.global_memory is None:
            return 0.0
        return self.train_towards(torch.from_numpy(self.global_memory.patches))

    def train_towards(self, targets: torch.Tensor, terms: Sequence[LossTerm] = ()) -> float:
        """Local epochs of the metric loss towards ``targets`` (memory items), plus every term of
        ``terms`` (in order). Returns the mean loss."""
        cfg = self.cfg
        gen = self.generator
        for term in terms:
            term.start(gen)
        x = torch.from_numpy(self.train.patches.reshape(-1, self.train.patches.shape[-1])).to(self.device)
        targets = targets.to(self.device)
        target_std = self.target_std.to(self.device)
        opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
        rng = torch.Generator().manual_seed(self.seed + len(self.losses))
        gen.train()
        total, steps = 0.0, 0
        for _ in range(cfg.local_epochs):
            order = torch.randperm(len(x), generator=rng)
            for s in range(0, min(len(x), cfg.max_steps_per_epoch * cfg.batch_size), cfg.batch_size):
                batch = x[order[s : s + cfg.batch_size].to(self.device)]
                if len(batch) < 2:
                    continue
                loss = metric_loss(gen(batch), targets, target_std, cfg.var_weight)
                for term in terms:
                    extra = term.penalty(gen)
                    if extra is not None:
                        loss = loss + extra
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for term in terms:
                        term.after_step(gen, cfg.lr)
                total += float(loss.detach())
                steps += 1
        gen.eval()
        mean = total / max(1, steps)
        self.losses.append(mean)
        return mean

    def train_towards_dp(self, targets: torch.Tensor, noise_multiplier: float, clip: float,
                         plan: tuple[float, int], batch_images: int) -> float:
        """DP-SGD (Opacus) of the generator with one image (or patient) as the privacy unit: ``plan``
        (Poisson rate, steps; public, ``privacy.budget.sgd_plan``) batches of units, the per-image
        metric loss, each unit's gradient clipped to ``clip``, Gaussian noise of ``noise_multiplier *
        clip``, the sum divided by the public ``batch_images``. Returns the mean loss."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        cfg = self.cfg
        if self.generator.in_dim != self.generator.out_dim:
            raise ValueError("DP training needs memory_dim equal to the backbone dimension")
        x = torch.from_numpy(self.train.patches.reshape(len(self.train.patches), -1,
                                                        self.train.patches.shape[-1])).to(self.device)
        x, present = self._units_of(x)  # (U, m_max * P, D): one row per unit; present (U, m_max)
        per_unit = present.shape[1]
        targets = targets.to(self.device)
        q, steps = plan
        rng = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))  # fresh per call
        noise_rng = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(8), "little"))
        model = GradSampleModule(self.generator)
        opt = DPOptimizer(torch.optim.Adam(model.parameters(), lr=cfg.lr), noise_multiplier=noise_multiplier,
                          max_grad_norm=clip, expected_batch_size=batch_images, generator=noise_rng)
        model.train()
        total = 0.0
        for _ in range(steps):
            chosen = torch.rand(len(x), generator=rng) < q  # Poisson sampling: each unit with probability q
            opt.zero_grad(set_to_none=True)
            if chosen.any():
                batch = x[chosen.to(self.device)]
                b, length, d = batch.shape
                images = batch.reshape(b * per_unit, length // per_unit, d)
                per_image = per_image_metric_loss(model(batch).reshape(b * per_unit, length // per_unit, -1),
                                                  images, targets, cfg.var_weight).reshape(b, per_unit)
                mask = present[chosen.to(self.device)]
                losses = (per_image * mask).sum(1) / mask.sum(1)  # a unit's loss: the mean over its images
                with warnings.catch_warnings():  # Opacus' hooks on a frozen input: expected, harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    losses.mean().backward()
                total += float(losses.detach().mean())
            else:  # an empty batch still takes a noisy step (the accountant counts it)
                for p in model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=self.device)
            opt.step()
        model._close()
        self.generator.eval()
        mean = total / steps
        self.losses.append(mean)
        return mean

    def _units_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, P, D) as units: unchanged with one image per unit; otherwise one row per patient
        holding its images' patches side by side, padded to the largest patient with copies of its first
        image (weight 0 in the loss, finite everywhere) (U, m*P, D), and which slots hold an image (U, m).
        Opacus then takes one gradient per patient."""
        n, p, d = x.shape
        if self.groups is None:
            return x, torch.ones((n, 1), dtype=x.dtype, device=x.device)
        patients, inverse = np.unique(self.groups, return_inverse=True)
        slots = [np.flatnonzero(inverse == u) for u in range(len(patients))]
        m = max(len(s) for s in slots)
        rows = x.new_zeros((len(patients), m, p, d))
        present = x.new_zeros((len(patients), m))
        for u, s in enumerate(slots):
            rows[u, :len(s)] = x[torch.from_numpy(s).to(x.device)]
            rows[u, len(s):] = x[int(s[0])]
            present[u, :len(s)] = 1
        return rows.reshape(len(patients), m * p, d), present

    def detector(self, score_with: str, image_k: int, reweight_k: int = 0) -> SiteDetector:
        """What this client scores with now: its generator, its bank and/or the global memory, and the
        image kNN bank (its own image embeddings, plus the global image memory unless ``local``)."""
        return SiteDetector(patch_banks_for(self.bank, self.global_bank, score_with),
                            image_bank_for(self.image_bank, self.joint_image_bank, score_with),
                            self.generator, image_k, reweight_k)

    def score(self, test: Embeddings, score_with: str, image_k: int, reweight_k: int = 0) -> Scores:
        """Patch score = distance to the nearest item of the local bank and/or the global memory;
        image kNN over the own image embeddings (plus the global image memory unless ``local``)."""
        return self.detector(score_with, image_k, reweight_k).score(test)


def patients_of(cfg, train) -> np.ndarray | None:
    """A client's patient per training image when the privacy unit is a patient (else None)."""
    return train.groups if cfg.privacy.unit == "patient" else None
