"""The Python API of a site's trained detector::

    from fedsecmem import Detector
    det = Detector.load("runs/quickstart/feddymem_dp/models/client-0")
    result = det.predict(["scan.dcm", "cell.png"])        # or uint8 arrays
    result.scores, result.normalized, result.decisions, result.maps

It loads the model folder (every file and the backbone weights checked against the manifest),
rebuilds the backbone with the same stages and preprocessing, and scores exactly as the run's own
evaluation did (``SiteDetector``): image score, anomaly map, the score normalized to 0..1 with 0.5
at the site's calibrated threshold, and the decision ``score > threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fedsecmem.data.imageio import Frame, UnreadableImage, read_frames, to_model_input
from fedsecmem.detector.backbone import PatchEmbedder
from fedsecmem.detector.scoring import Scores, anomaly_maps
from fedsecmem.detector.threshold import Threshold, normalize
from fedsecmem.errors import UserError
from fedsecmem.model.store import SavedModel, load_model

__all__ = ["Detector", "Prediction", "Predictions"]


@dataclass(frozen=True)
class Prediction:
    """One scored image (or one frame / slice of a DICOM or NIfTI file)."""

    source: str  # the file's path, or "array[i]" for an array given directly
    frame: int | None  # frame (multi-frame DICOM) or slice (NIfTI) number; None for a 2-D image
    score: float  # the image score (the run's primary score)
    normalized: float | None  # 0..1, 0.5 at the threshold (None without a threshold)
    anomalous: bool | None  # score > threshold (None without a threshold)


@dataclass
class Predictions:
    """What ``Detector.predict`` returns: one ``Prediction`` per scored image, their anomaly maps
    (N, S, S) at the model's input size, and the files that could not be read."""

    items: list[Prediction]
    maps: np.ndarray
    images: np.ndarray  # (N, S, S, 3) uint8: what the model saw (for overlays)
    threshold: float | None
    model_id: str
    failed: list[UnreadableImage] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.array([p.score for p in self.items], np.float64)

    @property
    def normalized(self) -> np.ndarray | None:
        return None if self.threshold is None else np.array([p.normalized for p in self.items], np.float64)

    @property
    def decisions(self) -> np.ndarray | None:
        return None if self.threshold is None else np.array([p.anomalous for p in self.items], bool)

    def __len__(self) -> int:
        return len(self.items)


def _as_images(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 3), (N, H, W) or (N, H, W, 3) uint8 -> (N, H, W, 3) uint8."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise UserError(f"predict: arrays must be uint8 images, got {a.dtype} (read files by path for other depths)")
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        raise UserError(f"predict: shape {a.shape} looks channels-first; give (H, W, 3) images")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        a = a[None] if a.ndim == 2 else a
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (3, 4):
        raise UserError(f"predict: expected (H, W), (H, W, 3) or (N, H, W, 3) images, got shape {a.shape}")
    return np.ascontiguousarray(a[..., :3])


class Detector:
    """A site's trained detector (see the module docstring)."""

    def __init__(self, saved: SavedModel, device: str = "cpu"):
        self.saved = saved
        self.device = device
        self._embedder: PatchEmbedder | None = None

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", weights: str | None = None) -> "Detector":
        """Load and check the model folder at ``path`` (``weights``: where the backbone weights are now,
        if moved; they must have the recorded SHA-256)."""
        return cls(load_model(Path(path), weights), device)

    # ---- what the model is ---------------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return self.saved.manifest

    @property
    def model_id(self) -> str:
        return self.saved.model_id

    @property
    def threshold(self) -> Threshold | None:
        return self.saved.threshold

    @property
    def image_size(self) -> int:
        return self.saved.backbone.image_size

    @property
    def primary(self) -> str:
        return self.manifest["scoring"]["primary"]

    @property
    def embedder(self) -> PatchEmbedder:
        if self._embedder is None:  # built on first use: loading stays cheap
            self._embedder = self.saved.backbone.build(self.device)
        return self._embedder

    # ---- scoring -------------------------------------------------------------------------------
    def score_batch(self, images: np.ndarray, batch_size: int = 32) -> Scores:
        """Raw scores of (N, S, S, 3) uint8 images at the model's input size."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise UserError(f"predict: images must be {self.image_size}x{self.image_size} here "
                            f"(got {images.shape[1]}x{images.shape[2]}); use predict() to resize")
        return self.saved.detector.score(self.embedder.embed(images, batch_size))

    def _finish(self, images: np.ndarray, sources: list[tuple[str, int | None]], batch_size: int) -> Predictions:
        scores = self.score_batch(images, batch_size)
        image = np.asarray(scores.image(self.primary), np.float64)
        maps = anomaly_maps(scores.patch, self.image_size, float(self.manifest["scoring"]["smoothing_sigma"]))
        thr = self.threshold
        norm = normalize(image, thr) if thr is not None else [None] * len(image)
        items = [Prediction(src, fr, float(s), None if n is None else float(n),
                            None if thr is None else bool(s > thr.value))
                 for (src, fr), s, n in zip(sources, image, norm)]
        return Predictions(items, maps, images, thr.value if thr else None, self.model_id)

    def predict_frames(self, frames: Sequence[Frame], batch_size: int = 32) -> Predictions:
        """Score frames already read (``fedsecmem.data.imageio.read_frames``)."""
        if not frames:
            return self._empty()
        images = np.stack([to_model_input(f.image, self.image_size) for f in frames])
        return self._finish(images, [(str(f.path), f.index) for f in frames], batch_size)

    def conversion(self, window: tuple[float, float] | None = None, axis: int | None = None
                   ) -> tuple[tuple[float, float] | None, int]:
        """The VOI window and NIfTI slice axis for files: as given, else as in training (the manifest)."""
        conv = self.manifest.get("conversion") or {}
        if window is None and conv.get("window"):
            window = tuple(conv["window"])
        return window, int(conv.get("slice_axis", 2)) if axis is None else axis

    def predict(self, inputs, batch_size: int = 32, window: tuple[float, float] | None = None,
                axis: int | None = None, progress: Callable[[int], None] | None = None) -> Predictions:
        """Score ``inputs``: a path, a uint8 image array ((H, W), (H, W, 3) or (N, H, W, 3)), or a list of
        either. Files go through the conversion training used (``window``: a DICOM/16-bit VOI window
        (center, width); ``axis``: the NIfTI slice axis; both default to the training data's). A file
        that cannot be read is listed in ``failed`` and the rest are scored."""
        window, axis = self.conversion(window, axis)
        items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        frames: list[Frame] = []  # in the order given
        failed: list[UnreadableImage] = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                stack = _as_images(item)
                frames += [Frame(Path(f"array[{i}]" if len(stack) == 1 and item.ndim < 4 else f"array[{i}][{j}]"),
                                 None, img) for j, img in enumerate(stack)]
                continue
            try:
                frames.extend(read_frames(Path(item), window, axis))
            except UnreadableImage as exc:
                failed.append(exc)
            if progress is not None:
                progress(1)
        out = self.predict_frames(frames, batch_size)
        out.failed = failed
        return out

    def _empty(self) -> Predictions:
        s = self.image_size
        return Predictions([], np.zeros((0, s, s), np.float32), np.zeros((0, s, s, 3), np.uint8),
                           self.threshold.value if self.threshold else None, self.model_id)
