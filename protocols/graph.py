"""Neighbour graphs for SecAgg+: each client shares keys with, and masks against, k neighbours.

A Harary graph H(k, n) (the k-regular graph with the best connectivity: it is
k-connected, so it stays connected while fewer than k clients are removed)
over a random relabelling of the clients drawn with the OS CSPRNG; k = n - 1
is the complete graph of the original SecAgg.
"""

from __future__ import annotations

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
