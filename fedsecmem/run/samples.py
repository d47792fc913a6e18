"""``fedsecmem samples CONFIG --client I --n N --out DIR``: a few of a site's test images as PNG
files (half normal, half anomalous), named by what they are, to try ``fedsecmem predict`` on.
They are the same test images the run scores (same split, same seed), never training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedsecmem.config import RunConfig
from fedsecmem.data.load import load_benchmark
from fedsecmem.data.partition import partition
from fedsecmem.errors import UserError

__all__ = ["write_samples"]


def write_samples(cfg: RunConfig, client: int, n: int, out: Path) -> list[Path]:
    """Write up to ``n`` of client ``client``'s test images to ``out``; returns the files."""
    if not 0 <= client < cfg.clients.n:
        raise UserError(f"--client: {client} is not one of the clients 0..{cfg.clients.n - 1}")
    if n < 1:
        raise UserError(f"--n: expected at least 1, got {n}")
    bench = load_benchmark(cfg.data, cfg.seed)
    try:
        test = partition(bench, cfg.clients.n, cfg.clients.alpha, cfg.seed, cfg.clients.min_train)[client].test
    except ValueError as exc:
        raise UserError(f"clients.n: {exc}") from None
    normal = np.flatnonzero((test.labels == 0) & test.headline)
    anomalous = np.flatnonzero((test.labels == 1) & test.headline)
    rng = np.random.default_rng(cfg.seed)
    picks = list(rng.permutation(normal)[: n - n // 2]) + list(rng.permutation(anomalous)[: n // 2])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror}") from None
    written = []
    for k, i in enumerate(picks):
        product = test.product_names[test.products[i]] if test.products[i] >= 0 else "none"
        path = out / f"{k:02d}-{product}-{test.kinds[i]}.png"
        Image.fromarray(test.images[i]).save(path)
        written.append(path)
    return written
