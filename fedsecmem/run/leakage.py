"""Membership inference against what each adversary of a FedDyMem run sees (``audit.leakage``).

Views, recorded in the final round:
- ``plain_server``: what a ``plain`` server gets from client c: its reduced
  memory (faithful ``kmeans++`` mode), or its per-cell centres decoded from the
  vectors it sent (federated k-means in the clear; with DP, the noisy ones);
  ``plain_server_images`` is the image embeddings it uploads, if it shares them;
- ``secagg_server``: what a ``secagg`` server gets: the centres of every
  per-cell sum over all clients it unmasked (each Lloyd step), noisy under DP;
- ``global_memory``: the final global memory, which every client (and anyone
  it leaks to) holds.

Candidates of client c: its training images (members) and non-members drawn
from the same distribution: a share (``audit.holdout_fraction``) of c's
training images withheld from training before the run starts. (Test images
are no non-members: on textures they come from another region of each source
and are not augmented, so an attack would detect the shift, not membership.)
All are embedded in c's final
memory space: we give the attacker c's generator, which a server never holds,
so the figures bound what a server could do from above. Two attacks:
- ``distance``: minus the mean distance of an image's patches to the nearest
  item of the view (members' patches were pooled into it);
- ``lira``: the online likelihood-ratio attack: ``audit.shadows`` shadow
  releases, each built the same way from a random half of c's candidates
  (plus, for shared views, the other clients' final contributions, which this
  strong attacker is assumed to know), calibrate each image's distance with
  and without it. Shadows release without DP noise, so under DP the LiRA
  Gaussians are the attacker's guess, not the true distributions (still a
  valid attack; possibly a weaker one).
Scores are pooled over clients; ``fedsecmem.audits.mia`` turns them into AUC
and TPR at 1% FPR with bootstrap intervals.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from fedsecmem.audits.mia import evaluate_attack, lira_scores, shadow_splits
from fedsecmem.data.partition import withhold
from fedsecmem.method.kmeans import weighted_kmeans
from fedsecmem.privacy.hooks import RoundHooks
from fedsecmem.detector.memory import MemoryBank
from fedsecmem.protocols.dp_release import SENSITIVITY
from fedsecmem.protocols.kmeans_party import CellStats, LloydStats, PrivateCells, Request
from fedsecmem.protocols.secure_kmeans import EMPTY_WEIGHT, NOISE_DEVIATIONS
from fedsecmem.protocols.secure_sum import SumOutcome
from fedsecmem.method.reduce import reduce_images

__all__ = [
    "CELL_REQUESTS", "LeakageViews", "SHADOW_KMEANS_ITERS", "cell_centres", "hold_out", "measure",
    "roc_plot", "strip_scores",
]

CELL_REQUESTS = (CellStats, LloydStats, PrivateCells)  # the sums that reveal per-cell centres
SHADOW_KMEANS_ITERS = 10  # Lloyd steps of a shadow release's k-means


def cell_centres(request: Request, vector: np.ndarray, dim: int, min_weight: float) -> np.ndarray:
    """The centres a per-cell (weight, weighted sum) vector reveals: sums / weights of the cells
    heavier than ``min_weight``, in memory units (DP releases are of unit-scaled points)."""
    match request:
        case CellStats():
            n, scale = request.n, 1.0
        case LloydStats():
            n, scale = len(request.centres), 1.0
        case PrivateCells():
            n, scale = request.cells(), request.clip
        case _:
            raise ValueError(f"cell_centres: {request.op} releases no cells")
    v = np.asarray(vector, np.float64)
    w = v[:n]
    sums = v[n : n * (1 + dim)].reshape(n, dim)
    keep = w > min_weight
    return sums[keep] / w[keep][:, None] * scale


class LeakageViews(RoundHooks):
    """Collects, during a run's final aggregation, what the plain and the secagg server see."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.armed = False
        self.clients: list = []
        self.contribs: list = []
        self.min_weight = EMPTY_WEIGHT
        self.per_client: dict[int, list[np.ndarray]] = defaultdict(list)
        self.aggregate: list[np.ndarray] = []

    def arm(self, clients: list, contribs: list, z: float | None = None) -> None:
        """From now on (the final round) record; ``z``: the DP noise multiplier, if any."""
        self.armed, self.clients, self.contribs = True, clients, contribs
        if z:
            self.min_weight = NOISE_DEVIATIONS * z * SENSITIVITY

    def on_contributions(self, r: int, last: bool, clients: list, contributions: list, z: float | None) -> None:
        if last:
            self.arm(clients, contributions, z)

    def on_sum(self, which: str, request: Request, out: SumOutcome) -> None:
        if not self.armed or which != "patches" or not isinstance(request, CELL_REQUESTS):
            return
        dim = self.contribs[0].prototypes.shape[1]
        if out.seen is not None:  # plain: every client's vector
            for c, v in out.seen.items():
                self.per_client[c].append(cell_centres(request, v, dim, self.min_weight))
        if out.visible_to == "server":
            self.aggregate.append(cell_centres(request, out.total, dim, self.min_weight))

    def views(self, global_patches: np.ndarray) -> dict[str, object]:
        """view name -> items (one array for all clients, or client -> array)."""
        cfg, out = self.cfg, {}
        if cfg.protocol == "plain":
            if self.per_client:
                out["plain_server"] = {c: np.concatenate(v) for c, v in self.per_client.items()}
            else:  # faithful mode: the uploads themselves, image embeddings included
                out["plain_server"] = {c: k.prototypes for c, k in enumerate(self.contribs)}
                if all(k.images is not None for k in self.contribs):
                    out["plain_server_images"] = {c: k.images for c, k in enumerate(self.contribs)}
        if cfg.protocol == "secagg" and self.aggregate:
            out["secagg_server"] = np.concatenate(self.aggregate)
        out["global_memory"] = np.asarray(global_patches)
        # a view may be empty (every noisy cell under the cut): it is measured, as telling nothing
        return out


def _mean_nn(bank_items: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(N, P, D) queries -> (N,) mean distance of each image's patches to the nearest item."""
    n, p, d = queries.shape
    dist = MemoryBank(np.ascontiguousarray(bank_items, np.float32)).nearest_distance(queries.reshape(-1, d))
    return dist.reshape(n, p).mean(1)


def hold_out(clients: list, fraction: float, seed: int, by_patient: bool = False) -> tuple[list, dict[int, np.ndarray]]:
    """Withhold ``fraction`` of every client's training images (at least one; the client keeps at
    least two): the clients to train with, and client -> withheld indices into the train split.
    ``by_patient``: withhold whole patients (``ImageSet.groups``), so that no non-member image
    belongs to a patient still trained on (the unit the guarantee is for)."""
    try:
        return withhold(clients, fraction, lambda cid: np.random.default_rng(seed + cid), by_patient)
    except ValueError as exc:
        raise ValueError(f"{exc} (non-members for the membership inference)") from None


class _Candidates:
    """One client's members and non-members in its memory space, and their prototypes."""

    def __init__(self, cl, held_patches: np.ndarray, held_images: np.ndarray | None, reduce_ratio: int,
                 reduce_iters: int):
        members = cl.memory_space(cl.train.patches)
        nonmembers = cl.memory_space(held_patches)
        z = np.concatenate([members, nonmembers])
        n, h, w, d = z.shape
        self.patches = z.reshape(n, h * w, d)
        self.is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
        protos, weights = reduce_images(z, reduce_ratio, reduce_iters)
        self.protos, self.weights = protos, weights  # (n, r, d), (n, r)
        self.images = (np.concatenate([cl.train.images, held_images])
                       if cl.train.images is not None and held_images is not None else None)


def measure(cfg, clients, held: dict[int, np.ndarray], train_emb, views: LeakageViews,
            global_patches: np.ndarray, progress_note=None) -> dict:
    """Attack every view; scores pooled over clients. ``held``: client -> withheld training images
    (indices into ``train_emb``), the non-members."""
    a = cfg.audit
    seen = views.views(global_patches)
    scores: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    k_shared = len(global_patches)
    for idx, cl in enumerate(clients):
        out_emb = train_emb.subset(held[cl.cid])
        cand = _Candidates(cl, out_emb.patches, out_emb.images, cfg.feddymem.reduce_ratio,
                           cfg.feddymem.reduce_iters)
        inclusion = shadow_splits(len(cand.is_member), a.shadows, cfg.seed + idx)
        others = [k for j, k in enumerate(views.contribs) if j != idx]
        other_pts = np.concatenate([k.prototypes for k in others]) if others else np.zeros((0, cand.protos.shape[2]))
        other_w = np.concatenate([k.weights for k in others]) if others else np.zeros(0)
        shared_shadows = None
        for name, items in seen.items():
            if name == "plain_server_images":
                if cand.images is None:
                    continue
                bank = MemoryBank(np.ascontiguousarray(items[idx], np.float32))
                stat = -bank.nearest_distance(np.ascontiguousarray(cand.images, np.float32))
                _add(scores[(name, "distance")], stat, cand.is_member)
                continue
            target = items[idx] if isinstance(items, dict) else items
            if len(target) == 0:  # nothing survived the noise: the view tells this attacker nothing
                for attack in ("distance", "lira"):
                    _add(scores[(name, attack)], np.zeros(len(cand.is_member)), cand.is_member)
                continue
            observed = -_mean_nn(target, cand.patches)
            _add(scores[(name, "distance")], observed, cand.is_member)
            if name == "plain_server":
                faithful = cfg.kmeans_init == "kmeans++" and not cfg.privacy.dp
                k = None if faithful or not views.per_client else max(1, len(views.per_client[idx][-1]))
                shadow = [_release(cand, inc, None, None, k, cfg.seed + j)
                          for j, inc in enumerate(inclusion)]
            else:
                if shared_shadows is None:
                    shared_shadows = [_release(cand, inc, other_pts, other_w, k_shared, cfg.seed + j)
                                      for j, inc in enumerate(inclusion)]
                shadow = shared_shadows
            stats = np.stack([-_mean_nn(s, cand.patches) for s in shadow])
            _add(scores[(name, "lira")], lira_scores(observed, stats, inclusion), cand.is_member)
        if progress_note is not None:
            progress_note(1)
    out = {"views": {}, "shadows": a.shadows, "fpr": a.fpr, "attacker": "knows the target client's generator",
           "nonmembers": f"{a.holdout_fraction:g} of each client's training images, withheld from training"}
    for (name, attack), (m, n) in sorted(scores.items()):
        res = evaluate_attack(np.concatenate(m), np.concatenate(n), a.fpr, a.bootstrap, seed=cfg.seed)
        out["views"].setdefault(name, {})[attack] = res.to_dict()
        out["views"][name][attack]["_scores"] = (np.concatenate(m), np.concatenate(n))
    return out


def _add(slot: tuple[list, list], stat: np.ndarray, is_member: np.ndarray) -> None:
    slot[0].append(stat[is_member])
    slot[1].append(stat[~is_member])


def _release(cand: _Candidates, include: np.ndarray, other_pts, other_w, k: int | None, seed: int) -> np.ndarray:
    """A shadow release from the included candidates (plus the other clients' prototypes): their
    prototypes as they are (``k`` None) or k-means to ``k`` items, as the target was built."""
    pts = cand.protos[include].reshape(-1, cand.protos.shape[2])
    w = cand.weights[include].reshape(-1)
    if other_pts is not None and len(other_pts):
        pts, w = np.concatenate([pts, other_pts]), np.concatenate([w, other_w])
    if k is None:
        return pts
    centres, _, _ = weighted_kmeans(pts, w, min(k, len(pts)), SHADOW_KMEANS_ITERS, seed)
    return centres



def strip_scores(result: dict) -> dict:
    """The leakage record without the raw scores (for results.json)."""
    views = {name: {atk: {k: v for k, v in r.items() if k != "_scores"} for atk, r in atks.items()}
             for name, atks in result["views"].items()}
    return {**result, "views": views}


def roc_plot(result: dict, path: Path) -> Path:
    """ROC curves of every view and attack, log-scaled FPR (the low-FPR regime matters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, atks in result["views"].items():
        for atk, r in atks.items():
            m, n = r["_scores"]
            f, t, _ = roc_curve(np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n])
            ax.plot(np.maximum(f, 1e-3), t, label=f"{name} / {atk}: AUC {r['auc']:.2f}")
    grid = np.logspace(-3, 0, 50)
    ax.plot(grid, grid, "k:", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
