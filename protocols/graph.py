"""Neighbour graphs for SecAgg+: each client shares keys with, and masks against, k neighbours.

A Harary graph H(k, n) (the k-regular graph with the best connectivity: it is
k-connected, so it stays connected while fewer than k clients are removed)
over a random relabelling of the clients drawn with the OS CSPRNG; k = n - 1
is the complete graph of the original SecAgg.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def harary_graph(clients: Sequence[int], k: int) -> dict[int, tuple[int, ...]]:
    """Neighbours of each client in a randomly labelled k-regular Harary graph."""
    n = len(clients)
    if len(set(clients)) != n:
        raise ValueError("client ids must be distinct")
    if not 1 <= k <= n - 1:
        raise ValueError(f"neighbours k={k} must be between 1 and n - 1 = {n - 1}")
    if k % 2 and n % 2:
        raise ValueError(f"no {k}-regular graph on {n} clients (k * n must be even); use an even k")
    order = list(clients)
    random.SystemRandom().shuffle(order)
    adj: dict[int, set[int]] = {c: set() for c in clients}
    for i in range(n):
        offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for off in offsets:
            a, b = order[i], order[(i + off) % n]
            adj[a].add(b)
            adj[b].add(a)
    return {c: tuple(sorted(v)) for c, v in adj.items()}


def connected(nodes: set[int], neighbours: dict[int, tuple[int, ...]]) -> bool:
    """Whether the graph induced on ``nodes`` is connected (a masked sum over a disconnected
    survivor graph would reveal each component's partial sum)."""
    if not nodes:
        return True
    start = next(iter(nodes))
    seen, todo = {start}, [start]
    while todo:
        for v in neighbours[todo.pop()]:
            if v in nodes and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == nodes


def sparse_graph_risks(n: int, k: int, t: int, dropout: float, collusion: float) -> dict[str, float]:
    """The failure events of SecAgg+ on a k-regular graph (Bell et al. 2020), union bound over the n
    clients, each neighbour counted as an independent draw (binomial tails):
    - ``isolated``: an honest client's neighbours all dropped or colluding, so the server with the
      colluders strips every mask of its input: n (dropout + collusion)^k;
    - ``collusion``: colluding neighbours hold t shares of an honest client's secrets:
      n P[Bin(k, collusion) >= t];
    - ``dropout``: fewer than t of a client and its neighbours survive to return shares, so the sum
      fails: n P[Bin(k + 1, 1 - dropout) < t]."""
    def tail(m: int, p: float, at_least: int) -> float:
        return sum(math.comb(m, j) * p**j * (1 - p) ** (m - j) for j in range(max(at_least, 0), m + 1))

    return {"isolated": min(1.0, n * (dropout + collusion) ** k),
            "collusion": min(1.0, n * tail(k, collusion, t)),
            "dropout": min(1.0, n * (1.0 - tail(k + 1, 1.0 - dropout, t)))}


def check_sparse_graph(n: int, k: int, t: int, dropout: float, collusion: float, security_bits: int,
                       correctness_bits: int) -> str | None:
    """Why a k-regular graph does not meet Bell et al.'s bounds for these fractions (None: it does,
    or it is the complete graph, whose promise holds for any coalition below t)."""
    if k >= n - 1:
        return None
    risk = sparse_graph_risks(n, k, t, dropout, collusion)
    if risk["isolated"] > 2.0 ** -security_bits:
        return (f"secure: secagg.neighbours {k} of {n} clients: an honest client is isolated by dropouts and "
                f"colluders with probability {risk['isolated']:.1e} > 2^-{security_bits} (Bell et al. 2020: "
                f"n (dropout_fraction + collusion_fraction)^k); use the complete graph (neighbours: null)")
    if risk["collusion"] > 2.0 ** -security_bits:
        return (f"secure: secagg.threshold {t} with {k} neighbours: colluders hold t shares of an honest client "
                f"with probability {risk['collusion']:.1e} > 2^-{security_bits}; raise the threshold")
    if risk["dropout"] > 2.0 ** -correctness_bits:
        return (f"secure: secagg.threshold {t} with {k} neighbours: a client keeps fewer than t live share "
                f"holders with probability {risk['dropout']:.1e} > 2^-{correctness_bits}; lower the threshold "
                "or add neighbours")
    return None


def smallest_graph(n: int, dropout: float, collusion: float, security_bits: int,
                   correctness_bits: int) -> tuple[int, int]:
    """The smallest degree k (and a threshold t for it) of a k-regular graph on n clients that meets
    Bell et al.'s bounds (``check_sparse_graph``); (n - 1, default t) when only the complete graph does."""
    for k in range(2, n - 1):
        for t in range(1, k + 2):
            if check_sparse_graph(n, k, t, dropout, collusion, security_bits, correctness_bits) is None:
                return k, t
    return n - 1, n // 2 + 1
