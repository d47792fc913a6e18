"""Many runs, in sequence here or as Ray tasks (``--backend ray``), reusing the finished ones.

A run folder is reused only when the validated config it was made with (its ``config.yaml``) is
the config asked for now, so a changed default re-runs it; the code version each result came from
is in its results.json (``environment.commit``). With Ray every run is one task (one CPU each, on a
local Ray or the cluster at ``address``); the driver writes nothing a task writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fedsecmem.config import RunConfig
from fedsecmem.errors import UserError

__all__ = ["finished", "require_ray", "run_grid"]


def require_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError("backend ray needs Ray: pip install 'fedsecmem[ray]'") from None
    return ray


def finished(cfg: RunConfig, out: Path) -> dict | None:
    """The results of a finished run of exactly ``cfg`` in ``out``, or None."""
    done, made_with = Path(out) / "results.json", Path(out) / "config.yaml"
    if not (done.is_file() and made_with.is_file()):
        return None
    try:
        if yaml.safe_load(made_with.read_text()) != json.loads(cfg.model_dump_json()):
            return None
        return json.loads(done.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _run_one(cfg_json: str, out: str) -> dict:
    from fedsecmem.config import config_from_dict
    from fedsecmem.run.runner import run

    return run(config_from_dict(json.loads(cfg_json)), Path(out))


def run_grid(jobs: list[tuple[RunConfig, Path]], backend: str = "inprocess", address: str = "",
             on_done=None) -> list[dict]:
    """The results of every (config, folder) job, in order; ``on_done(i, results)`` as each ends."""
    out: list[dict | None] = [finished(cfg, path) for cfg, path in jobs]
    todo = [i for i, r in enumerate(out) if r is None]
    for i, r in enumerate(out):
        if r is not None and on_done is not None:
            on_done(i, r)
    if backend == "inprocess":
        for i in todo:
            out[i] = _run_one(jobs[i][0].model_dump_json(), str(jobs[i][1]))
            if on_done is not None:
                on_done(i, out[i])
        return out  # type: ignore[return-value]
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=1)(_run_one)
        pending = {task.remote(jobs[i][0].model_dump_json(), str(Path(jobs[i][1]).resolve())): i for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            out[i] = ray.get(ready[0])
            if on_done is not None:
                on_done(i, out[i])
    finally:
        if started:
            ray.shutdown()
    return out  # type: ignore[return-value]
