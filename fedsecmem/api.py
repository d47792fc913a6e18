"""The Python API for users who script (docs/api.md)::

    import fedsecmem
    results = fedsecmem.run("configs/quickstart.yaml", out="runs/mine", overrides=["privacy.dp=false"])
    det = fedsecmem.Detector.load("runs/mine/models/client-0")
    pred = det.predict(["new/cell-001.png", "new/scan.dcm"])

``run`` does what ``fedsecmem run`` does (in process or on Ray, as the config says) and returns the
typed ``Results`` of results.json; ``Detector`` is a site's saved model (``fedsecmem.model.detector``).
Errors are ``fedsecmem.errors.UserError`` with the same one-line messages as the command line.
"""

from __future__ import annotations

from pathlib import Path

from fedsecmem.config import RunConfig, load_config
from fedsecmem.model.detector import Detector, Prediction, Predictions
from fedsecmem.run.results import Results, load_results

__all__ = ["Detector", "Prediction", "Predictions", "Results", "run"]


def run(config: str | Path | RunConfig, out: str | Path | None = None, overrides: list[str] | None = None) -> Results:
    """Run ``config`` (a YAML path or a ``RunConfig``), write its folder ``out`` (default
    ``runs/<name>``) and return its results."""
    cfg = load_config(config, overrides) if not isinstance(config, RunConfig) else config
    if overrides and isinstance(config, RunConfig):
        from fedsecmem.config import config_from_dict

        cfg = config_from_dict(config.model_dump(mode="json"), overrides)
    folder = Path(out) if out is not None else Path("runs") / cfg.name
    if cfg.execution.backend == "ray":
        from fedsecmem.deployment.ray_backend import run_on_ray

        run_on_ray(cfg, folder)
    else:
        from fedsecmem.run.runner import run as run_in_process

        run_in_process(cfg, folder)
    return load_results(folder)
