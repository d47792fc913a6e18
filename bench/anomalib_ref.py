"""anomalib's own PatchCore (``anomalib.models.image.patchcore.torch_model.PatchcoreModel``,
version 2.7.0) on fedsecmem's backbone weights, for the side-by-side parity benchmark
(``bench/bench_anomalib.py``). Needs the ``bench`` extra (``pip install anomalib==2.7.0``).

Only anomalib's plain-torch model is used, not its Lightning module: the Lightning
pre-processor would resize to 256 px and normalise with ImageNet statistics, while these
EfficientNet-Lite0 weights expect mean = std = 0.5. Here both libraries see the very same
tensor: ``normalise`` applies the ``PatchEmbedder``'s own mean/std buffers (timm's data
config) with the same float32 operations ``PatchEmbedder.forward`` uses, and
``PatchcoreModel.forward`` does no normalisation of its own.

Weights are never downloaded: the model is built with ``pre_trained=False`` and fedsecmem's
builtin weights (``create_classifier``) are loaded into its timm feature extractor.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access, whatever asks for it
os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset loop prints a tqdm bar per model

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from fedsecmem.detector.backbone import PatchEmbedder, create_classifier, to_tensor  # noqa: E402

ANOMALIB_VERSION = "2.7.0"
NUM_NEIGHBORS = 9  # anomalib's default (torch_model.py and lightning_model.py)


def anomalib_version() -> str:
    """The installed anomalib version; a clear error when the ``bench`` extra is missing."""
    try:
        import anomalib
    except ImportError:
        raise SystemExit("bench_anomalib needs anomalib: pip install 'anomalib==2.7.0' "
                         "(the project's bench extra)") from None
    if anomalib.__version__ != ANOMALIB_VERSION:
        warnings.warn(f"anomalib {anomalib.__version__} installed; the figures to beat were "
                      f"measured with {ANOMALIB_VERSION}", stacklevel=2)
    return anomalib.__version__


def stage_module_names(backbone: str, stages: tuple[int, ...]) -> list[str]:
    """timm ``features_only`` stage indices -> the module names anomalib's layers use
    (tf_efficientnet_lite0: stage 2 = ``blocks.2``, stage 3 = ``blocks.4``)."""
    feats = timm.create_model(backbone, pretrained=False, features_only=True)
    names = feats.feature_info.module_name()
    return [names[i] for i in stages]


class AnomalibPatchCore:
    """anomalib's ``PatchcoreModel`` with the embedder's weights, layers and normalisation."""

    def __init__(self, embedder: PatchEmbedder, backbone: str, weights: str = "builtin",
                 num_neighbors: int = NUM_NEIGHBORS):
        anomalib_version()
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel

        self.layers = stage_module_names(backbone, embedder.layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.model = PatchcoreModel(layers=self.layers, backbone=backbone, pre_trained=False,
                                        num_neighbors=num_neighbors)
        extractor = self.model.feature_extractor
        if list(extractor.idx) != list(embedder.layers):
            raise RuntimeError(f"anomalib mapped {self.layers} to stages {extractor.idx}, "
                               f"fedsecmem uses {list(embedder.layers)}")
        state = create_classifier(backbone, weights).state_dict()
        missing, _unused = extractor.feature_extractor.load_state_dict(state, strict=False)
        if missing:
            raise RuntimeError(f"anomalib feature extractor: weights missing for {missing[:3]}")
        self.model.eval()
        self.mean = embedder.mean.detach().cpu()
        self.std = embedder.std.detach().cpu()
        self._patch_scores: list[torch.Tensor] = []
        # the raw (B, 1, h, w) nearest-neighbour distances, as the anomaly map generator receives
        # them: gives anomalib's plain max-patch image score beside its re-weighted one, for free
        self.model.anomaly_map_generator.register_forward_hook(
            lambda _m, args, _out: self._patch_scores.append(args[0].detach()))

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> the tensor ``PatchEmbedder.forward`` feeds its backbone."""
        return (to_tensor(images).to(torch.float32) - self.mean) / self.std

    @torch.no_grad()
    def embeddings(self, images: np.ndarray) -> np.ndarray:
        """(B, h, w, D) patch embeddings exactly as ``PatchcoreModel.forward`` builds them."""
        m = self.model
        feats = m.feature_extractor(self.normalise(images))
        feats = {layer: m.feature_pooler(f) for layer, f in feats.items()}
        return m.generate_embedding(feats).permute(0, 2, 3, 1).numpy()

    @torch.no_grad()
    def collect(self, images: np.ndarray, batch_size: int, advance=None) -> None:
        """Training-mode forward passes: anomalib stores every patch embedding."""
        self.model.embedding_store.clear()
        self.model.memory_bank = torch.empty(0)
        self.model.train()
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            self.model(self.normalise(batch))
            if advance is not None:
                advance(len(batch))
        self.model.eval()

    def subsample(self, ratio: float) -> int:
        """anomalib's k-center-greedy coreset of the stored embeddings; returns the bank size."""
        self.model.subsample_embedding(ratio)
        return int(self.model.memory_bank.shape[0])

    @property
    def n_stored(self) -> int:
        return int(sum(len(e) for e in self.model.embedding_store))

    @torch.no_grad()
    def score(self, images: np.ndarray, batch_size: int, advance=None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Eval-mode forward passes -> (pred_score (N,), anomaly_map (N, H, W), patch distances (N, h, w)),
        the last captured as the anomaly map generator receives them (its max = the plain image score)."""
        self.model.eval()
        self._patch_scores.clear()
        preds, maps = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            out = self.model(self.normalise(batch))
            preds.append(out.pred_score.numpy())
            maps.append(out.anomaly_map[:, 0].numpy())
            if advance is not None:
                advance(len(batch))
        patch = torch.cat([p[:, 0] for p in self._patch_scores]).numpy()
        self._patch_scores.clear()
        return np.concatenate(preds), np.concatenate(maps), patch

    @property
    def bank(self) -> np.ndarray:
        """anomalib's memory bank (M, D) after ``subsample``."""
        return self.model.memory_bank.detach().cpu().numpy()
