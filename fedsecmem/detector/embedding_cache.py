"""Optional on-disk cache of backbone embeddings: methods compared on the same data embed it once.

The backbone is frozen, so the embeddings are a function of what goes in, and the cache key is
a digest of all of it (``cache_ingredients``):

* the embedder's code: the source of the module(s) that compute embeddings, and the timm and
  torch versions;
* the weights: SHA-256 of the weights file that is loaded (``builtin`` or a path), or, for
  ``hub`` weights (not a local file), the model name and timm version;
* the backbone settings that shape the output (name, weights, layers, image_layer, pool_size;
  not batch_size or allow_network), and the kind of device that runs it (``cpu`` or ``cuda``:
  GPU convolutions may use TF32 and differ from the CPU's in the third decimal);
* the data: SHA-256 of the train and test image arrays (bytes, shape, dtype) of the loaded
  ``Benchmark``, which covers the data source, the seed, the split and files edited on disk.

Each ``emb-KEY.npz`` holds its ingredients (``ingredients_json``), also written beside it as
``emb-KEY.json`` for people. A file that cannot be read, or does not match, is a miss and is
replaced by the next store.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import uuid
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np

import fedsecmem.detector.backbone
from fedsecmem.detector.backbone import Embeddings
from fedsecmem.errors import UserError
from fedsecmem.provenance import file_sha256

__all__ = [
    "FORMAT", "cache_ingredients", "cache_key", "embedder_source_digest", "file_sha256", "images_digest",
    "clean_cache", "load_cached", "store_cached", "weights_ingredient",
]

FORMAT = 2  # bump when the file layout or the meaning of the key changes
_EMBEDDER_MODULES: tuple[ModuleType, ...] = (fedsecmem.detector.backbone,)
_KEPT_BACKBONE_FIELDS = ("name", "weights", "layers", "image_layer", "pool_size")
_CHUNK = 1 << 24


def embedder_source_digest() -> str:
    """SHA-256 over the source files of the modules that compute embeddings."""
    h = hashlib.sha256()
    for module in _EMBEDDER_MODULES:
        path = Path(inspect.getsourcefile(module) or module.__file__)
        data = path.read_bytes()
        h.update(f"{module.__name__}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def _library_versions() -> dict:
    import timm
    import torch

    return {"timm": str(timm.__version__), "torch": str(torch.__version__)}


def weights_ingredient(backbone) -> dict:
    """What identifies the weights a ``BackboneConfig`` loads."""
    if backbone.weights == "hub":  # fetched by timm, not a local file: name and timm version
        return {"source": "hub", "name": backbone.name, **_library_versions()}
    if backbone.weights == "builtin":
        path, source = fedsecmem.detector.backbone.builtin_weights_path(), "builtin"
    else:
        path, source = Path(backbone.weights), "file"
    if not path.is_file():
        raise UserError(f"backbone.weights: file not found: {path}")
    return {"source": source, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def images_digest(images: np.ndarray) -> str:
    """SHA-256 over an image array's dtype, shape and bytes (in order: embeddings are per row)."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256(json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape)}).encode())
    flat = arr.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _CHUNK):
        h.update(flat[start : start + _CHUNK].data)
    return h.hexdigest()


def cache_ingredients(cfg, bench) -> dict:
    """Everything the embeddings of ``bench`` under ``cfg.backbone`` depend on (JSON-able)."""
    backbone = json.loads(cfg.backbone.model_dump_json())
    return {
        "format": FORMAT,
        "embedder": {"source_sha256": embedder_source_digest(), **_library_versions()},
        "backbone": {k: backbone[k] for k in _KEPT_BACKBONE_FIELDS},
        "device": fedsecmem.detector.backbone.resolve_device(cfg.backbone.device).type,
        "weights": weights_ingredient(cfg.backbone),
        "data": {split: {"images_sha256": images_digest(images.images), "n": len(images),
                         "shape": list(images.images.shape), "dtype": images.images.dtype.str}
                 for split, images in (("train", bench.train), ("test", bench.test))},
    }


def _key_of(ingredients: dict) -> str:
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()[:24]


def cache_key(cfg, bench) -> str:
    return _key_of(cache_ingredients(cfg, bench))


def _paths(folder: Path, key: str) -> tuple[Path, Path]:
    return Path(folder) / f"emb-{key}.npz", Path(folder) / f"emb-{key}.json"


def load_cached(cfg, bench) -> tuple[Embeddings, Embeddings, dict] | None:
    """The cached (train, test, timings) of ``bench`` under ``cfg``, or None (off, absent, unreadable)."""
    folder = cfg.output.embedding_cache
    if folder is None:
        return None
    ingredients = cache_ingredients(cfg, bench)
    path, _ = _paths(folder, _key_of(ingredients))
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["ingredients_json"])) != ingredients:
                raise ValueError("ingredients differ from the key's")
            has_images = "train_images" in z.files

            def get(name):
                return np.asarray(z[name]) if has_images else None

            train = Embeddings(np.asarray(z["train_patches"]), get("train_images"))
            test = Embeddings(np.asarray(z["test_patches"]), get("test_images"))
            timings = {"embed_train_s": float(z["embed_train_s"]), "embed_test_s": float(z["embed_test_s"])}
        for emb, images in ((train, bench.train), (test, bench.test)):
            if emb.patches.ndim != 4 or len(emb.patches) != len(images) or (
                    emb.images is not None and len(emb.images) != len(images)):
                raise ValueError("embeddings do not match the images")
    except Exception as exc:  # noqa: BLE001 - a truncated zip raises many kinds; a cache never fails a run
        warnings.warn(f"embedding cache: ignoring unreadable {path} ({type(exc).__name__}: {exc}); "
                      "embedding again", RuntimeWarning, stacklevel=2)
        return None
    return train, test, timings


def store_cached(cfg, bench, train: Embeddings, test: Embeddings, timings: dict) -> None:
    """Keep (train, test, timings) of ``bench`` under ``cfg``; a failed write warns, never fails the run."""
    folder = cfg.output.embedding_cache
    if folder is None:
        return
    ingredients = cache_ingredients(cfg, bench)
    text = json.dumps(ingredients, indent=2, sort_keys=True)
    path, sidecar = _paths(folder, _key_of(ingredients))
    arrays = {"train_patches": train.patches, "test_patches": test.patches,
              "embed_train_s": np.float64(timings["embed_train_s"]),
              "embed_test_s": np.float64(timings["embed_test_s"]),
              "ingredients_json": np.array(text)}
    if train.images is not None:
        arrays["train_images"] = train.images
        arrays["test_images"] = test.images
    tag = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # concurrent runs never share a temp file
    tmps = (path.with_name(path.name + tag), sidecar.with_name(sidecar.name + tag))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmps[1].write_text(text + "\n")
        with open(tmps[0], "wb") as f:
            np.savez(f, **arrays)
        tmps[1].replace(sidecar)
        tmps[0].replace(path)  # atomic: readers see the old file or the whole new one
    except OSError as exc:
        warnings.warn(f"embedding cache: cannot write {path}: {exc}", RuntimeWarning, stacklevel=2)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def clean_cache(folder: Path) -> tuple[int, int]:
    """Delete every cache file (``emb-*.npz`` and ``emb-*.json``) in ``folder`` and nothing else; the
    folder goes too once empty. Returns (files, bytes) removed. The embeddings are derived from the
    images (personal data where the images are), so a retention policy needs a way to drop them."""
    folder = Path(folder)
    files = bytes_ = 0
    if not folder.is_dir():
        return 0, 0
    for path in sorted(folder.glob("emb-*")):
        if path.is_file() and path.suffix in (".npz", ".json", ".tmp"):
            bytes_ += path.stat().st_size
            path.unlink()
            files += 1
    if not any(folder.iterdir()):
        folder.rmdir()
    return files, bytes_
