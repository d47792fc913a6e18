"""FedSM-style personalization (Xu et al., "Closing the generalization gap of cross-silo federated
medical image segmentation", CVPR 2022) for the memory generator, in the FedDyMem harness.

Three models per run:
- the **global** generator: FedAvg, exactly as ``method: fedavg``;
- one **personalized** generator per client, which never leaves it, trained with **SoftPull**:
  every round it continues from its own previous state on the client's metric loss, and after
  every optimizer step takes the proximal map of ``lambda / 2 * ||w - w_global||^2`` towards this
  round's global generator, ``w <- (w + lr * lambda * w_global) / (1 + lr * lambda)``
  (``fl.softpull`` = lambda: 0 is local training, a very large lambda keeps it at the global one);
- a **model selector**: a small classifier on each image's backbone embedding that predicts which
  client's data it resembles, trained federatedly (each client labels its own images with its id;
  FedAvg through the configured secure sum).

A client scores a test image with its personalized generator (and the bank it builds) when the
selector says the image looks like its own data, else with the global generator and its bank.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fedsecmem.method.aggregation import Aggregated, average_states
from fedsecmem.method.client import LossTerm
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.detector.scoring import Scores

__all__ = ["FedSM", "ModelSelector", "PullTerm", "pick", "selector_features", "train_selector"]


class PullTerm(LossTerm):
    """SoftPull: after every optimizer step the proximal map of ``lambda / 2 * ||w - reference||^2``
    with step lr: ``w <- (w + lr lambda ref) / (1 + lr lambda)`` (0: no pull; as lambda grows,
    w -> reference)."""

    def __init__(self, strength: float, reference: dict[str, torch.Tensor]):
        self.strength, self.reference = strength, reference

    def start(self, generator: nn.Module) -> None:
        device = next(generator.parameters()).device
        self.on_device = {n: t.detach().to(device, torch.float32) for n, t in self.reference.items()}

    def after_step(self, generator: nn.Module, lr: float) -> None:
        shrink = lr * self.strength
        for n, p in generator.named_parameters():
            p.copy_((p + shrink * self.on_device[n]) / (1.0 + shrink))


def selector_features(emb: Embeddings) -> np.ndarray:
    """One vector per image: the image-level embedding, or the mean patch embedding without one;
    L2-normalised (clients' brightness or scale differences should not decide)."""
    x = emb.images if emb.images is not None else emb.patches.mean(axis=(1, 2))
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ModelSelector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, n_clients: int, seed: int):
        super().__init__()
        with torch.random.fork_rng():  # a seeded initialisation that leaves the run's RNG alone
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, n_clients))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        self.eval()
        return self(torch.from_numpy(x)).argmax(1).numpy()


def train_selector(model: ModelSelector, x: np.ndarray, label: int, epochs: int, lr: float) -> None:
    """One client's local training: all its images carry its own id (full batch, Adam)."""
    xt = torch.from_numpy(x)
    y = torch.full((len(x),), label, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(xt), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def pick(personal: Scores, global_: Scores, use_personal: np.ndarray) -> Scores:
    """Per image, the personalized scores where ``use_personal``, else the global ones."""
    m = np.asarray(use_personal, bool)
    knn = None
    if personal.image_knn is not None and global_.image_knn is not None:
        knn = np.where(m, personal.image_knn, global_.image_knn)
    return Scores(np.where(m[:, None, None], personal.patch, global_.patch),
                  np.where(m, personal.image_patch, global_.image_patch), knn)


class FedSM:
    """The personalized generators and the selector beside a FedAvg run (``run_param_sharing``)."""

    def __init__(self, ctx, personal: list, ss, weights: list[float]):
        cfg = ctx.cfg
        self.ctx, self.fl, self.ss, self.weights = ctx, cfg.fl, ss, weights
        self.personal = personal  # one FedDyMemClient per client
        self.features = [selector_features(cl.train) for cl in personal]
        self.selector = ModelSelector(self.features[0].shape[1], self.fl.selector_hidden, len(personal), cfg.seed)

    def start(self, global_state: dict) -> None:
        """Every personalized generator starts as the initial global generator."""
        for cl in self.personal:
            cl.start_from(global_state)
            cl.rebuild_bank()

    def round(self, global_state: dict) -> Aggregated:
        """SoftPull every personalized generator towards ``global_state``; one FedAvg round of the
        selector (its traffic is returned)."""
        for cl in self.personal:
            cl.train_towards(torch.from_numpy(cl.bank.items), [PullTerm(self.fl.softpull, global_state)])
            cl.rebuild_bank()
        states = []
        for i, x in enumerate(self.features):
            local = copy.deepcopy(self.selector)
            train_selector(local, x, i, self.fl.selector_epochs, self.fl.selector_lr)
            states.append(local.state_dict())
        state, agg = average_states(states, self.weights, self.ss)
        self.selector.load_state_dict(state)
        return agg

    def score(self, global_scores: list[Scores]) -> tuple[list[Scores], float]:
        """Each client's test scores, personalized or global per image; and the selector's accuracy
        (does it name the client that owns the image?) over all test images."""
        ctx = self.ctx
        out, hits, total = [], 0, 0
        for i, (cl, c, g) in enumerate(zip(self.personal, ctx.clients, global_scores)):
            test = ctx.test_emb.subset(c.test_index)
            pred = self.selector.predict(selector_features(test))
            hits += int((pred == i).sum())
            total += len(pred)
            out.append(pick(cl.score(test, "local", ctx.cfg.scoring.image_k, ctx.cfg.scoring.reweight_k), g, pred == i))
        return out, hits / max(1, total)
