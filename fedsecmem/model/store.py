"""A site's model folder: everything a site needs to score tomorrow's images, kept at the site.

::

    models/client-<i>/
      manifest.json          format, code version and commit, backbone (name, weights SHA-256, layers,
                             image size, preprocessing), scoring settings, threshold and its calibration,
                             and the SHA-256 of every file below
      generator.safetensors  the memory generator (methods that have one)
      bank-<name>.npy        the patch banks it scores with, in memory space (its own coreset
                             "local" or "pooled", the global memory items "global")
      image_bank.npy         the image-level kNN bank (its own image embeddings, with the global
                             image memory joined in)
      global_memory.npz      the global memory as the server sent it (federated memory methods)

Loading checks every file against the manifest and the backbone's weights against the manifest's
digest, and refuses a model that differs with one line naming the file. The manifest's own
SHA-256 (the model id) is signed in the site's ledger at the run's end. The model is never sent
anywhere: its banks are the site's own training patches and are not covered by DP.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsecmem import __version__
from fedsecmem.audits.ledger import KEYS_FILE, LEDGER_DIR, RESULTS_FILE, read_keys, verify_ledger
from fedsecmem.detector.backbone import BackboneInfo, weights_sha256
from fedsecmem.detector.memory import MemoryBank
from fedsecmem.detector.site import SiteDetector
from fedsecmem.detector.threshold import Threshold
from fedsecmem.errors import UserError
from fedsecmem.method.client import GlobalMemory, save_global_memory
from fedsecmem.method.generator import MemoryGenerator
from fedsecmem.provenance import hash_file, source_commit

__all__ = ["FORMAT", "FORMAT_VERSION", "GENERATOR_FILE", "IMAGE_BANK_FILE", "MANIFEST", "MODELS_DIR",
           "ModelError", "SavedModel", "load_model", "model_dir", "save_model"]

FORMAT = "fedsecmem-site-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODELS_DIR = "models"
GENERATOR_FILE = "generator.safetensors"
IMAGE_BANK_FILE = "image_bank.npy"
GLOBAL_FILE = "global_memory.npz"


class ModelError(UserError):
    """A model folder that cannot be used as it is (missing, tampered, other weights)."""


def model_dir(out: Path, site: int) -> Path:
    """Where a run writes site ``site``'s model: ``OUT/models/client-<site>``."""
    return Path(out) / MODELS_DIR / f"client-{site}"


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


@dataclass
class SavedModel:
    """A loaded model: its manifest, the detector it scores with, and its threshold (or None)."""

    folder: Path
    manifest: dict
    detector: SiteDetector
    threshold: Threshold | None
    backbone: BackboneInfo
    manifest_sha256: str  # of the manifest as loaded (what the site's ledger signs)
    signed: str | None = None  # the ledger that signs this manifest, when the folder is still in its run folder

    @property
    def model_id(self) -> str:
        """The manifest's SHA-256, first 16 hex digits."""
        return self.manifest_sha256[:16]


def save_model(folder: Path, detector: SiteDetector, backbone: BackboneInfo, scoring: dict,
               threshold: Threshold | None, about: dict, global_memory: GlobalMemory | None = None) -> str:
    """Write the model folder (replacing an old one); returns the manifest's SHA-256.

    ``scoring``: primary score, smoothing sigma, score_with...; ``about``: site, run id, method,
    protocol, training and calibration counts (recorded as given)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files: dict[str, str] = {}
    generator = None
    if detector.projection is not None:
        from safetensors.torch import save_file

        gen = detector.projection
        if not isinstance(gen, MemoryGenerator):
            raise TypeError(f"cannot save a projection of type {type(gen).__name__}")
        save_file({k: v.detach().cpu().contiguous() for k, v in gen.state_dict().items()}, str(tmp / GENERATOR_FILE))
        generator = {"file": GENERATOR_FILE, "in_dim": gen.in_dim, "out_dim": gen.out_dim,
                     "hidden": gen.hidden.out_features}
    banks = []
    for name, bank in detector.patch_banks.items():
        fname = f"bank-{name}.npy"
        _write_npy(tmp / fname, bank.items)
        banks.append({"name": name, "file": fname, "items": len(bank), "dim": bank.dim, "radius": bank.radius})
    image_bank = None
    if detector.image_bank is not None:
        _write_npy(tmp / IMAGE_BANK_FILE, detector.image_bank.items)
        image_bank = {"file": IMAGE_BANK_FILE, "items": len(detector.image_bank), "dim": detector.image_bank.dim}
    if global_memory is not None:
        save_global_memory(global_memory, tmp / GLOBAL_FILE)
    for f in sorted(tmp.iterdir()):
        files[f.name] = hash_file(f)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "fedsecmem": __version__, "commit": source_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **about,
        "backbone": backbone.record(),
        "scoring": {**scoring, "image_k": detector.image_k, "reweight_k": detector.reweight_k},
        "generator": generator, "patch_banks": banks, "image_bank": image_bank,
        "global_memory": {"file": GLOBAL_FILE} if global_memory is not None else None,
        "threshold": threshold.record() if threshold is not None else None,
        "files": files,
        "never_sent": "this folder holds the site's own training patches (not covered by DP); it stays at the site",
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return hash_file(folder / MANIFEST)


def _refuse(folder: Path, what: str) -> ModelError:
    return ModelError(f"model {folder}: {what}; refused")


def _read_manifest(folder: Path) -> tuple[dict, str]:
    """The manifest and the SHA-256 of the very bytes it was parsed from (the model id)."""
    if not folder.is_dir():
        raise ModelError(f"model: no model folder {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise _refuse(folder, f"no {MANIFEST} (not a model folder?)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refuse(folder, f"{MANIFEST} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(folder, f"{MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _refuse(folder, f"format version {manifest.get('format_version')} (this fedsecmem reads "
                              f"{FORMAT_VERSION})")
    return manifest, hashlib.sha256(raw).hexdigest()


def _check_files(folder: Path, manifest: dict) -> None:
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise _refuse(folder, f"{MANIFEST} lists no files")
    for name, digest in listed.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise _refuse(folder, f"{name} is missing")
        if hash_file(path) != digest:
            raise _refuse(folder, f"{name} differs from the manifest (SHA-256)")
    needed = [b["file"] for b in manifest.get("patch_banks") or []]
    needed += [x["file"] for x in (manifest.get("generator"), manifest.get("image_bank"),
                                   manifest.get("global_memory")) if x]
    unlisted = [n for n in needed if n not in listed]
    if unlisted:
        raise _refuse(folder, f"{unlisted[0]} is not covered by the manifest's digests")


def _load_npy(folder: Path, name: str) -> np.ndarray:
    try:
        return np.load(folder / name, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise _refuse(folder, f"{name} cannot be read: {exc}".splitlines()[0]) from None


def _site_of(folder: Path, manifest: dict) -> int:
    """The site a model folder belongs to: its name says (``client-<i>``) and its manifest must agree."""
    site = manifest.get("site")
    if not isinstance(site, int) or isinstance(site, bool):
        raise _refuse(folder, f"{MANIFEST} names no site")
    if folder.name.startswith("client-") and folder.name != f"client-{site}":
        raise _refuse(folder, f"{MANIFEST} is site {site}'s, the folder says {folder.name}")
    return site


def _signed_in_ledger(folder: Path, manifest: dict, digest: str) -> str | None:
    """While the model sits in a run folder (``RUN/models/client-<i>``, the run's ledger/ or results.json
    beside it), results.json's listing of the models must name this manifest (``digest``), and, unless the
    run kept no ledgers, the site's ledger there must exist and verify and its last ``model`` event sign
    it. Returns that ledger's path, or None when there is no ledger to check (a model moved out of any
    run folder: its digests are all that is checked then)."""
    site = _site_of(folder, manifest)
    run = folder.parent.parent
    ledger_dir = run / LEDGER_DIR
    results = _results(run)
    if folder.parent.name != MODELS_DIR or not (ledger_dir.is_dir() or results is not None):
        return None
    if not ledger_dir.is_dir() and not (results or {}).get("ledger"):
        _check_listed(folder, results, site, digest)
        return None  # a run that kept no ledgers (audit.ledger: false): results.json's listing is all there is
    path = ledger_dir / f"client-{site}.jsonl"
    if not path.is_file():
        raise _refuse(folder, f"its run folder has no ledger {LEDGER_DIR}/{path.name} to check the manifest against")
    keys = read_keys(ledger_dir / KEYS_FILE) if (ledger_dir / KEYS_FILE).is_file() else {}
    entries, problems = verify_ledger(path, f"client-{site}", keys.get(f"client-{site}"))
    if problems:
        raise _refuse(folder, f"its site's ledger {path.name} does not verify ({problems[0].message})")
    signed = [e.record for e in entries if e.record.get("event") == "model"]
    if not signed:
        raise _refuse(folder, f"its site's ledger {path.name} signs no model")
    if signed[-1].get("manifest_sha256") != digest:
        raise _refuse(folder, f"{MANIFEST} differs from the manifest signed in {path.name}")
    _check_listed(folder, results, site, digest)
    return str(path)


def _check_listed(folder: Path, results: dict | None, site: int, digest: str) -> None:
    listed = ((results or {}).get("models") or {}).get("manifest_sha256") or {}
    if str(site) in listed and listed[str(site)] != digest:
        raise _refuse(folder, f"{MANIFEST} differs from the one {RESULTS_FILE} lists for site {site}")


def _results(run: Path) -> dict | None:
    """The run folder's results.json as a dict, or None (absent or unreadable)."""
    try:
        doc = json.loads((run / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _check_bank(folder: Path, name: str, items: np.ndarray, record: dict) -> np.ndarray:
    if items.ndim != 2 or not np.isfinite(items).all():
        raise _refuse(folder, f"{name} is not a finite (items, dim) array")
    if record.get("items") not in (None, len(items)) or record.get("dim") not in (None, items.shape[1]):
        raise _refuse(folder, f"{name} holds {items.shape}, the manifest says ({record.get('items')}, "
                              f"{record.get('dim')})")
    return items


def load_model(folder: Path, weights: str | None = None) -> SavedModel:
    """Load and check a model folder. ``weights``: where the backbone weights are now, when not
    where the manifest says (their SHA-256 must still match)."""
    folder = Path(folder)
    manifest, digest = _read_manifest(folder)
    _check_files(folder, manifest)
    signed = _signed_in_ledger(folder, manifest, digest)
    try:
        return _build(folder, manifest, digest, signed, weights)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _refuse(folder, f"{MANIFEST} is malformed ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def _build(folder: Path, manifest: dict, digest: str, signed: str | None, weights: str | None) -> SavedModel:
    backbone = BackboneInfo.from_record(manifest["backbone"])
    if weights is not None:
        backbone = backbone.with_weights(weights)
    found = weights_sha256(backbone.name, backbone.weights, backbone.weights == "hub")
    if found != backbone.weights_sha256:
        raise _refuse(folder, f"backbone weights {backbone.weights} differ from those it was trained with "
                              f"(SHA-256 {found[:12]}, manifest {backbone.weights_sha256[:12]})")
    projection = None
    gen = manifest.get("generator")
    if gen:
        from safetensors.torch import load_file

        try:
            state = load_file(str(folder / gen["file"]))
            projection = MemoryGenerator(int(gen["in_dim"]), int(gen["out_dim"]), int(gen["hidden"]))
            projection.load_state_dict(state, strict=True)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise _refuse(folder, f"{gen.get('file')} does not hold the generator: {exc}".splitlines()[0]) from None
        projection.eval()
    banks = {}
    for b in manifest["patch_banks"]:
        items = _check_bank(folder, b["file"], _load_npy(folder, b["file"]), b)
        if projection is not None and items.shape[1] != projection.out_dim:
            raise _refuse(folder, f"{b['file']} has dimension {items.shape[1]}, the generator gives {projection.out_dim}")
        banks[str(b["name"])] = MemoryBank(items, b.get("radius"))
    if not banks:
        raise _refuse(folder, "no patch bank")
    ib = manifest.get("image_bank")
    image_bank = MemoryBank(_check_bank(folder, ib["file"], _load_npy(folder, ib["file"]), ib)) if ib else None
    sc = manifest["scoring"]
    if sc["primary"] not in ("patch", "image") or (sc["primary"] == "image" and image_bank is None):
        raise _refuse(folder, f"scoring.primary {sc['primary']!r} does not fit its banks")
    detector = SiteDetector(banks, image_bank, projection, int(sc["image_k"]), int(sc["reweight_k"]))
    thr = Threshold.from_record(manifest["threshold"]) if manifest.get("threshold") else None
    if thr is not None and not (np.isfinite(thr.value) and np.isfinite(thr.calibration_min)):
        raise _refuse(folder, "its threshold is not a finite number")
    return SavedModel(folder, manifest, detector, thr, backbone, digest, signed)
