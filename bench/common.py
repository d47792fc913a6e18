"""Helpers shared by the benchmark scripts: run a config in-process, collect results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from fedsecmem.config import load_config
from fedsecmem.run.runner import run

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench"


def run_config(config: str, out: str, overrides: list[str]) -> dict:
    """Run configs/<config>.yaml with overrides into runs/bench/<out>. A finished run is reused only
    when the validated config it was made with is the one asked for now (a changed default, e.g. the
    accountant, re-runs it); the code version each figure came from is in its results.json."""
    path = OUT / out
    done = path / "results.json"
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    made_with = path / "config.yaml"
    if done.exists() and made_with.exists() and yaml.safe_load(made_with.read_text()) == json.loads(cfg.model_dump_json()):
        return json.loads(done.read_text())
    return run(cfg, path)


def mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"
