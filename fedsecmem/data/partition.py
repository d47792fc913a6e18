"""Split a benchmark over clients with products skewed by a Dirichlet draw.

For each product a share vector over clients is drawn from Dirichlet(alpha);
that product's training images, and its test images, are dealt by the same
shares, so each client is tested on the product mix it trained on (small
alpha: a client holds few products; large alpha: every client holds all).
Test images with no product (Fashion-MNIST anomaly classes, product -1) are
dealt in proportion to each client's share of the normal test images. Test
images scored apart (ELPV's uncertain cells) are dealt last, by the same
shares, from a generator of their own: how many there are never moves the
training split or the headline test split. When the training images carry
patients (``ImageSet.groups``), patients are dealt instead of images (a patient
counts under the product of its first image), so a patient's images stay with
one client.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedsecmem.data.types import Benchmark, ImageSet

__all__ = ["ClientData", "MAX_REDRAWS", "calibration_split", "dirichlet_shares", "partition", "split_counts",
           "withhold"]

MAX_REDRAWS = 100


@dataclass
class ClientData:
    client: int
    train_index: np.ndarray  # into the benchmark's train split
    test_index: np.ndarray  # into the benchmark's test split
    train: ImageSet
    test: ImageSet


def split_counts(n: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``shares`` (largest remainders)."""
    raw = shares / shares.sum() * n
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    if rest:
        counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
    return counts


def _deal(index: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(index, np.cumsum(counts)[:-1])


def dirichlet_shares(n_products: int, n_clients: int, alpha: float, train_products: np.ndarray,
                     min_train: int, rng: np.random.Generator) -> np.ndarray:
    """(n_products, n_clients) shares; redrawn until every client gets ``min_train`` images."""
    sizes = np.bincount(train_products, minlength=n_products)
    if sizes.sum() < min_train * n_clients:
        raise ValueError(f"{sizes.sum()} training images cannot give {n_clients} clients {min_train} each")
    for _ in range(MAX_REDRAWS):
        shares = rng.dirichlet(np.full(n_clients, alpha), size=n_products)
        per_client = sum(split_counts(int(s), shares[p]) for p, s in enumerate(sizes))
        if per_client.min() >= min_train:
            return shares
    # strong skew with few images: mix in a uniform share until everyone gets enough
    for mix in np.linspace(0.05, 0.95, 19):
        mixed = (1 - mix) * shares + mix / n_clients
        per_client = sum(split_counts(int(s), mixed[p]) for p, s in enumerate(sizes))
        if per_client.min() >= min_train:
            return mixed
    # last resort: a round-robin deal (ties broken towards the client next in turn), so
    # every client gets at least floor(total / n_clients) >= min_train images
    out = np.empty((n_products, n_clients))
    turn = 0
    for p, size in enumerate(sizes):
        out[p] = 1.0 / n_clients - 1e-9 * ((np.arange(n_clients) - turn) % n_clients)
        turn = (turn + int(size)) % n_clients
    return out


def partition(bench: Benchmark, n_clients: int, alpha: float, seed: int, min_train: int = 1) -> list[ClientData]:
    """Deal ``bench`` over ``n_clients``; deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 11])
    n_products = len(bench.train.product_names)
    groups = bench.train.groups
    if groups is None:  # every image is a unit
        unit_product = bench.train.products
    else:  # every patient is a unit, under the product of its first image
        _, first = np.unique(groups, return_index=True)
        unit_product = bench.train.products[first]
    shares = dirichlet_shares(n_products, n_clients, alpha, unit_product, min_train, rng)
    train_parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    head = bench.test.headline
    for p in range(n_products):
        idx = rng.permutation(np.flatnonzero(unit_product == p))
        for c, part in enumerate(_deal(idx, split_counts(idx.size, shares[p]))):
            train_parts[c].append(part if groups is None else np.flatnonzero(np.isin(groups, np.unique(groups)[part])))
        for label in (0, 1):
            idx = rng.permutation(np.flatnonzero((bench.test.products == p) & (bench.test.labels == label) & head))
            for c, part in enumerate(_deal(idx, split_counts(idx.size, shares[p]))):
                test_parts[c].append(part)
    if not head.all():
        apart_rng = np.random.default_rng([seed, 11, 2])
        for p in range(n_products):
            idx = apart_rng.permutation(np.flatnonzero((bench.test.products == p) & ~head))
            for c, part in enumerate(_deal(idx, split_counts(idx.size, shares[p]))):
                test_parts[c].append(part)
    orphan = rng.permutation(np.flatnonzero((bench.test.products < 0) & head))
    if orphan.size:
        normal = bench.test.labels == 0
        normal_counts = np.array([sum(int(normal[a].sum()) for a in parts) for parts in test_parts], float)
        weights = normal_counts if normal_counts.sum() > 0 else np.ones(n_clients)
        for c, part in enumerate(_deal(orphan, split_counts(orphan.size, weights))):
            test_parts[c].append(part)
    clients = []
    for c in range(n_clients):
        tr = np.sort(np.concatenate(train_parts[c])) if train_parts[c] else np.array([], int)
        te = np.sort(np.concatenate(test_parts[c])) if test_parts[c] else np.array([], int)
        clients.append(ClientData(c, tr, te, bench.train.subset(tr), bench.test.subset(te)))
    return clients


def withhold(clients: list[ClientData], fraction: float, rng_of, by_patient: bool = False,
             min_keep: int = 2, strict: bool = True) -> tuple[list[ClientData], dict[int, np.ndarray]]:
    """Withhold ``fraction`` of every client's training units (at least one; the client keeps at
    least ``min_keep``): the clients to train with, and client -> withheld indices into the train split.
    ``rng_of(client)``: the generator choosing which units (not a secret). ``by_patient``: whole
    patients (``ImageSet.groups``) are withheld. A client with too few units is an error when
    ``strict``, else it keeps all of them (and nothing is withheld from it)."""
    kept, held = [], {}
    for c in clients:
        groups = c.train.groups if by_patient and c.train.groups is not None else np.arange(len(c.train_index))
        units = np.unique(groups)
        n = len(units)
        k = min(max(1, int(round(fraction * n))), n - min_keep)
        if k < 1:
            if strict:
                raise ValueError(f"client {c.client} has {n} training units: too few to withhold any")
            kept.append(c)
            held[c.client] = c.train_index[:0]
            continue
        perm = rng_of(c.client).permutation(n)
        out = np.isin(groups, units[perm[:k]])
        keep = np.flatnonzero(~out)
        held[c.client] = c.train_index[np.flatnonzero(out)]
        kept.append(replace(c, train_index=c.train_index[keep], train=c.train.subset(keep)))
    return kept, held


def calibration_split(clients: list[ClientData], fraction: float,
                      seed: int) -> tuple[list[ClientData], dict[int, np.ndarray]]:
    """Each site's calibration images: ``fraction`` of its training normals that never build its bank,
    on which it calibrates its decision threshold. Whole units are kept together whenever the data
    knows them (a patient's images, the frames or slices of one scan: ``ImageSet.groups``), whatever
    the privacy unit: a slice in the bank would make its neighbour look normal. A site with fewer
    than three units keeps them all and calibrates nothing."""
    if fraction <= 0:
        return clients, {c.client: c.train_index[:0] for c in clients}
    return withhold(clients, fraction, lambda cid: np.random.default_rng([seed, cid, 23]), by_patient=True,
                    strict=False)
