"""``fedsecmem predict MODEL_DIR INPUT... [--out DIR]``: a site scores new images with its model.

Inputs are files or folders (walked recursively): PNG, JPEG, TIFF, BMP (8/16-bit, grey or RGB),
DICOM and NIfTI (``fedsecmem.data.imageio``). Writes ``predictions.csv`` and ``predictions.json``
(path, frame or slice, score, normalized score, decision, threshold, model id) and one overlay PNG
per image (the anomaly map over the image) under ``--out``, never inside an input folder. A file
that cannot be read is one line on the console and in the outputs, and the rest are still scored;
the exit code is then 1.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fedsecmem.data.imageio import Frame, UnreadableImage, find_inputs, image_stem, read_frames
from fedsecmem.detector.threshold import SPAN_FLOOR, Threshold, normalize
from fedsecmem.errors import UserError
from fedsecmem.model.detector import Detector, Predictions
from fedsecmem.progress import console, make_progress, task

__all__ = ["CSV_FIELDS", "OVERLAY_DIR", "PredictRun", "overlay", "predict_files"]

CSV_FIELDS = ("path", "frame", "score", "normalized", "decision", "threshold", "model_id", "overlay", "error")
OVERLAY_DIR = "overlays"
OVERLAY_MIN_SIDE = 256  # overlays are drawn at least this large, whatever the model's input size
OVERLAY_ALPHA = 0.45  # weight of the anomaly map's colours over the image
OVERLAY_MAX_STEM = 200  # characters of an overlay's name before its suffix (file systems allow 255 bytes)


@dataclass
class PredictRun:
    """What ``predict_files`` did: rows written and files that failed."""

    rows: list[dict]
    failed: list[UnreadableImage]
    out: Path
    signed: str | None = None  # the site's ledger that signs the model (None: moved out of its run folder)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _overlay_name(source: str, frame: int | None, used: set[str], roots: list[Path]) -> str:
    """The file's path under the input folder it was found in (its name alone if given directly),
    without its suffix, flattened to one safe file name."""
    path = Path(source)
    rel = next((path.relative_to(r) for r in roots if r.is_dir() and _inside(path, r) and path != r), None)
    rel = (rel.parent / image_stem(path)) if rel is not None else Path(image_stem(path))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", rel.as_posix()).strip("_") or "image"
    if len(stem) > OVERLAY_MAX_STEM:  # a file name has at most 255 bytes: keep the end, tell apart by a digest
        stem = hashlib.sha256(stem.encode()).hexdigest()[:12] + "-" + stem[-OVERLAY_MAX_STEM + 13:]
    name = f"{stem}{'' if frame is None else f'_f{frame:04d}'}.png"
    base, k = name[:-4], 1
    while name in used:  # two inputs that flatten alike keep both overlays
        name, k = f"{base}-{k}.png", k + 1
    used.add(name)
    return name


def overlay(image: np.ndarray, amap: np.ndarray, threshold: Threshold | None, label: str) -> Image.Image:
    """The anomaly map in colour over the grey image; with a threshold, colours are the normalized
    score (red above the threshold, blue well below), else the map's own range."""
    from matplotlib import colormaps

    if threshold is not None:
        t = normalize(amap, threshold)
    else:
        t = (amap - amap.min()) / max(float(np.ptp(amap)), SPAN_FLOOR)
    heat = (colormaps["jet"](t)[..., :3] * 255).astype(np.float32)
    grey = np.repeat(image.mean(-1, keepdims=True), 3, axis=-1).astype(np.float32)
    mixed = ((1 - OVERLAY_ALPHA) * grey + OVERLAY_ALPHA * heat).clip(0, 255).astype(np.uint8)
    pic = Image.fromarray(mixed)
    side = max(OVERLAY_MIN_SIDE, pic.width)
    pic = pic.resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(pic)
    draw.rectangle([0, 0, side, 14], fill=(0, 0, 0))
    draw.text((3, 1), label, fill=(255, 255, 255))
    return pic


def _rows(pred: Predictions, threshold: Threshold | None, out: Path, used: set[str], overlays: bool,
          roots: list[Path]) -> list[dict]:
    rows = []
    for i, p in enumerate(pred.items):
        name = None
        if overlays:
            name = _overlay_name(p.source, p.frame, used, roots)
            verdict = "" if p.anomalous is None else ("ANOMALOUS" if p.anomalous else "normal")
            norm = "" if p.normalized is None else f" ({p.normalized:.2f})"
            overlay(pred.images[i], pred.maps[i], threshold, f"{verdict} score {p.score:.3f}{norm}").save(
                out / OVERLAY_DIR / name)
        rows.append({"path": p.source, "frame": p.frame, "score": p.score, "normalized": p.normalized,
                     "decision": None if p.anomalous is None else ("anomalous" if p.anomalous else "normal"),
                     "threshold": pred.threshold, "model_id": pred.model_id,
                     "overlay": f"{OVERLAY_DIR}/{name}" if name else None, "error": None})
    return rows


def predict_files(model_dir: Path, inputs: list[Path], out: Path, batch_size: int = 32,
                  window: tuple[float, float] | None = None, axis: int | None = None, overlays: bool = True,
                  device: str = "cpu", weights: str | None = None) -> PredictRun:
    """Score every readable image under ``inputs`` with the model at ``model_dir``; write the outputs
    (``window``, ``axis``: the conversion of DICOM, NIfTI and 16-bit files; default: the training's)."""
    if axis is not None and axis not in (0, 1, 2):
        raise UserError(f"--axis: expected 0, 1 or 2, got {axis}")
    if batch_size < 1:
        raise UserError(f"--batch-size: expected at least 1, got {batch_size}")
    for src in inputs:
        if src.is_dir() and _inside(out, src):
            raise UserError(f"--out: {out} is inside the input folder {src}; predict never writes into its inputs")
    det = Detector.load(model_dir, device, weights)
    window, axis = det.conversion(window, axis)
    files, failed = find_inputs(inputs)
    if not files and not failed:
        raise UserError(f"predict: no images under {', '.join(map(str, inputs))}")
    clash = next((f for f in files if _inside(f, out) or _inside(f.resolve(), out)), None)
    if clash is not None:
        raise UserError(f"--out: the input {clash} lies in {out}; predict never writes where its inputs are")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overlays:
            (out / OVERLAY_DIR).mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out}: {exc.strerror}") from None
    for f in failed:
        console.print(f"[yellow]cannot read {f}", highlight=False)
    rows: list[dict] = []
    used: set[str] = set()
    pending: list[Frame] = []

    def flush() -> None:
        if pending:
            rows.extend(_rows(det.predict_frames(pending, batch_size), det.threshold, out, used, overlays, inputs))
            pending.clear()

    with make_progress() as progress, task(progress, "predict", len(files)) as advance:
        for path in files:
            try:
                pending.extend(read_frames(path, window, axis))
            except UnreadableImage as exc:
                failed.append(exc)
                console.print(f"[yellow]cannot read {exc}", highlight=False)
            if len(pending) >= batch_size:
                flush()
            advance(1)
        flush()
    for f in failed:
        rows.append({"path": str(f.path), "frame": None, "score": None, "normalized": None, "decision": None,
                     "threshold": det.threshold.value if det.threshold else None, "model_id": det.model_id,
                     "overlay": None, "error": f.reason})
    with open(out / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    thr = det.threshold
    doc = {"model": str(model_dir), "model_id": det.model_id, "site": det.manifest.get("site"),
           "signed_in": det.saved.signed,  # the site's ledger that signs this model (None: moved out of its run)
           "threshold": thr.record() if thr else None, "primary_score": det.primary,
           "normalized": "0..1, 0.5 at the threshold (lowest calibration score 0)",
           "predictions": rows, "failed": len(failed)}
    (out / "predictions.json").write_text(json.dumps(doc, indent=2) + "\n")
    return PredictRun(rows, failed, out, det.saved.signed)
