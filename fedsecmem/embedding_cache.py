"""Optional on-disk cache of backbone embeddings (the backbone is frozen, so they depend only on
the data, the seed and the backbone): methods compared on the same data embed it once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from fedsecmem.backbone import Embeddings

_IGNORED_BACKBONE_FIELDS = ("device", "batch_size", "allow_network")


def cache_key(cfg) -> str:
    backbone = {k: v for k, v in json.loads(cfg.backbone.model_dump_json()).items()
                if k not in _IGNORED_BACKBONE_FIELDS}
    blob = json.dumps({"data": json.loads(cfg.data.model_dump_json()), "seed": cfg.seed,
                       "backbone": backbone}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _path(cfg) -> Path | None:
    folder = cfg.output.embedding_cache
    return None if folder is None else Path(folder) / f"emb-{cache_key(cfg)}.npz"


def load_cached(cfg) -> tuple[Embeddings, Embeddings, dict] | None:
    path = _path(cfg)
    if path is None or not path.exists():
        return None
    with np.load(path) as z:
        has_images = "train_images" in z.files

        def get(name):
            return z[name] if has_images else None

        train = Embeddings(z["train_patches"], get("train_images"))
        test = Embeddings(z["test_patches"], get("test_images"))
        timings = {"embed_train_s": float(z["embed_train_s"]), "embed_test_s": float(z["embed_test_s"])}
    return train, test, timings


def store_cached(cfg, train: Embeddings, test: Embeddings, timings: dict) -> None:
    path = _path(cfg)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"train_patches": train.patches, "test_patches": test.patches,
              "embed_train_s": np.float64(timings["embed_train_s"]),
              "embed_test_s": np.float64(timings["embed_test_s"])}
    if train.images is not None:
        arrays["train_images"] = train.images
        arrays["test_images"] = test.images
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
