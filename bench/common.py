"""Helpers shared by the benchmark scripts: run a config in-process, collect results."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedsecmem.config import load_config
from fedsecmem.run.grid import finished, run_grid
from fedsecmem.run.runner import run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench"


def run_config(config: str, out: str, overrides: list[str]) -> dict:
    """Run configs/<config>.yaml with overrides into runs/bench/<out>. A finished run is reused only
    when the validated config it was made with is the one asked for now (a changed default, e.g. the
    accountant, re-runs it); the code version each figure came from is in its results.json."""
    path = OUT / out
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    return finished(cfg, path) or run(cfg, path)


def run_configs(jobs: list[tuple[str, str, list[str]]]) -> list[dict]:
    """Many ``run_config`` jobs at once: as Ray tasks when ``FEDSECMEM_BACKEND=ray`` (a local Ray, or
    the cluster at ``FEDSECMEM_RAY_ADDRESS``), else one after another; finished runs are reused."""
    backend = os.environ.get("FEDSECMEM_BACKEND", "inprocess")
    grid = [(load_config(ROOT / "configs" / f"{config}.yaml", overrides), OUT / out) for config, out, overrides in jobs]
    return run_grid(grid, backend, os.environ.get("FEDSECMEM_RAY_ADDRESS", ""))


def mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"
