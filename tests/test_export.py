"""ONNX export (``fedsecmem export``): the graph onnxruntime runs alone scores as ``Detector`` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsecmem.cli import main
from fedsecmem.config import config_from_dict
from fedsecmem.data.load import load_benchmark
from fedsecmem.detector.memory import MemoryBank
from fedsecmem.detector.scoring import Scores, anomaly_maps
from fedsecmem.detector.site import SiteDetector
from fedsecmem.detector.threshold import normalize
from fedsecmem.errors import UserError
from fedsecmem.model.detector import Detector
from fedsecmem.model.export import _ScoringGraph, export_onnx
from fedsecmem.model.store import ModelError, load_model, model_dir, save_model
from fedsecmem.run.runner import run

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

TOL = 1e-4  # max |onnx - python| / max(1, max |python|)
SMALL_CHUNK = 7  # items per distance block: several blocks over these banks
TINY = {"name": "tiny-export", "seed": 0, "method": "feddymem",
        "data": {"benchmark": "textures", "products": ["brick", "grass"], "train_per_product": 10,
                 "test_normal_per_product": 3, "test_defect_per_product": 3, "image_size": 64, "crop_size": 64},
        "clients": {"n": 2, "alpha": 1.0}, "protocol": "plain",
        "feddymem": {"rounds": 2, "global_k": 8, "global_k_images": 4},
        "audit": {"ledger": False}, "output": {"embedding_cache": None, "map_examples_per_product": 0}}

# what a deployment without fedsecmem runs: onnxruntime and numpy only
STANDALONE = """
import json, sys
import numpy as np
import onnxruntime as ort
model, images, out = sys.argv[1:4]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
x = np.load(images)
result = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))
np.savez(out, **result)
thr, low = float(meta["threshold"]), float(meta["threshold_calibration_min"])
norm = np.clip(0.5 + (result["image_score"] - thr) / (2 * max(thr - low, 1e-12)), 0.0, 1.0)
assert "fedsecmem" not in sys.modules and "torch" not in sys.modules
print(json.dumps({"threshold": thr, "normalized": norm.tolist(), "anomalous": (result["image_score"] > thr).tolist(),
                  "image_size": int(meta["image_size"]), "primary": meta["primary_score"]}))
"""


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _run(cfg: dict, out: Path) -> Path:
    run(config_from_dict(json.loads(json.dumps(cfg))), out)
    return model_dir(out, 0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """The run's test images at the model's input size, (N, S, S, 3) uint8."""
    from PIL import Image

    cfg = config_from_dict(json.loads(json.dumps(TINY)))
    size = cfg.data.image_size
    bench = load_benchmark(cfg.data, cfg.seed)
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in bench.test.images])


@pytest.fixture(scope="module")
def feddymem_model(tmp_path_factory) -> Path:
    return _run(TINY, tmp_path_factory.mktemp("feddymem"))


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """A model without generator, scored with PatchCore's re-weighted max."""
    return _run({**TINY, "method": "local", "scoring": {"reweight_k": 3}}, tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="module")
def cli_export(feddymem_model, tmp_path_factory) -> Path:
    """The feddymem model exported through ``fedsecmem export`` (automatic chunk)."""
    out = tmp_path_factory.mktemp("cli") / "sub" / "model.onnx"
    assert main(["export", str(feddymem_model), "--out", str(out)]) == 0
    return out


def _session_outputs(path: Path, x_uint8: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_uint8.transpose(0, 3, 1, 2), np.float32) / 255.0
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})))


_REFERENCE: dict[Path, tuple] = {}


def _reference(model: Path, images: np.ndarray) -> tuple[Detector, Scores, np.ndarray]:
    """``Detector``'s scores and anomaly maps of ``images`` (computed once per model)."""
    if model not in _REFERENCE:
        det = Detector.load(model)
        ref = det.score_batch(images)
        _REFERENCE[model] = det, ref, anomaly_maps(ref.patch, det.image_size,
                                                   float(det.manifest["scoring"]["smoothing_sigma"]))
    return _REFERENCE[model]


def _assert_parity(model: Path, onnx_file: Path, images: np.ndarray) -> float:
    """onnxruntime's outputs against ``Detector`` at batch N and batch 1; returns the worst difference."""
    det, ref, maps = _reference(model, images)
    got = _session_outputs(onnx_file, images)
    diffs = {"image_score": _rel(got["image_score"], ref.image(det.primary)),
             "patch_scores": _rel(got["patch_scores"], ref.patch),
             "anomaly_map": _rel(got["anomaly_map"], maps),
             "image_patch": _rel(got.get("image_patch", ref.image_patch), ref.image_patch)}
    if ref.image_knn is not None:
        diffs["image_knn"] = _rel(got["image_knn"], ref.image_knn)
    one = _session_outputs(onnx_file, images[:1])  # the batch axis is dynamic
    diffs["batch1"] = max(_rel(one["image_score"], ref.image(det.primary)[:1]), _rel(one["anomaly_map"], maps[:1]))
    assert max(diffs.values()) <= TOL, diffs
    return max(diffs.values())


def test_cli_export_matches_the_detector(cli_export, feddymem_model, images):
    m = onnx.load(str(cli_export))
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}  # standard operators only
    assert [o.name for o in m.graph.output] == ["image_score", "anomaly_map", "patch_scores", "image_patch",
                                                 "image_knn"]
    meta = {p.key: p.value for p in m.metadata_props}
    saved = load_model(feddymem_model)
    assert meta["model_id"] == saved.model_id and meta["site"] == "0" and meta["primary_score"] == "patch"
    assert float(meta["threshold"]) == saved.threshold.value and meta["image_size"] == "64"
    assert json.loads(meta["mean"]) == list(saved.backbone.mean) and "0.5 +" in meta["normalization"]
    _assert_parity(feddymem_model, cli_export, images)


def test_chunks_give_the_same_scores(local_model, images):
    """Distance blocks of a few items (and the re-weighting across them) change nothing."""
    import torch

    saved = load_model(local_model)
    n_items = sum(len(b) for b in saved.detector.patch_banks.values())
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32) / 255.0)
    with torch.no_grad():
        whole = _ScoringGraph(saved, n_items).eval()(x)
        chunked = _ScoringGraph(saved, SMALL_CHUNK).eval()(x)
    assert len(chunked) == len(whole) == 5
    for a, b in zip(chunked, whole):
        assert _rel(a.numpy(), b.numpy()) <= 1e-5


def test_model_without_generator_reweighted_and_chunked(local_model, images, tmp_path):
    saved = load_model(local_model)
    assert saved.manifest["generator"] is None and saved.detector.reweight_k == 3
    info = export_onnx(local_model, tmp_path / "local.onnx", chunk=SMALL_CHUNK)
    assert info["chunk"] == SMALL_CHUNK and info["input"] == "image (N, 3, S, S) float32 in [0, 1]"
    assert info["bytes"] == (tmp_path / "local.onnx").stat().st_size and info["opset"] >= 17
    assert info["outputs"] == ["image_score", "anomaly_map", "patch_scores", "image_patch", "image_knn"]
    _assert_parity(local_model, tmp_path / "local.onnx", images)
    det, ref, _ = _reference(local_model, images)
    assert not np.allclose(ref.image_patch, ref.patch.reshape(len(images), -1).max(axis=1))  # re-weighted


def test_reweighting_with_banks_smaller_than_k(local_model, images, tmp_path):
    """A 1-item bank keeps the plain max; a 2-item bank weighs against fewer than k items. No image
    bank, no threshold, no smoothing."""
    saved = load_model(local_model)
    items = saved.detector.patch_banks["local"].items
    folder = tmp_path / "small"
    det = SiteDetector({"one": MemoryBank(items[:1]), "two": MemoryBank(items[1:3])}, None, None, 2, 3)
    save_model(folder, det, saved.backbone, {"primary": "patch", "smoothing_sigma": 0.0}, None, {"site": 0})
    _, ref, _ = _reference(folder, images)
    plain = ref.image_patch == ref.patch.reshape(len(images), -1).max(axis=1)
    assert plain.any() and not plain.all()  # both branches are exercised
    info = export_onnx(folder, tmp_path / "small.onnx")
    assert info["outputs"] == ["image_score", "anomaly_map", "patch_scores"]
    _assert_parity(folder, tmp_path / "small.onnx", images)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "small.onnx")).metadata_props}
    assert meta["threshold"] == "" and meta["threshold_calibration_min"] == ""


def test_runs_with_onnxruntime_alone(cli_export, feddymem_model, images, tmp_path):
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32) / 255.0
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(cli_export), str(tmp_path / "x.npy"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    det, ref, _ = _reference(feddymem_model, images)
    scores = ref.image(det.primary)
    assert got["threshold"] == det.threshold.value and got["image_size"] == det.image_size
    assert got["primary"] == det.primary
    assert np.abs(np.array(got["normalized"]) - normalize(scores, det.threshold)).max() <= TOL
    near = np.abs(scores - det.threshold.value) <= TOL * max(1.0, det.threshold.value)
    assert (np.array(got["anomalous"]) == (scores > det.threshold.value))[~near].all()
    assert _rel(np.load(tmp_path / "out.npz")["image_score"], scores) <= TOL


def test_tampered_model_is_refused(feddymem_model, tmp_path):
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(feddymem_model, folder)
    bank = folder / "bank-local.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0x01
    bank.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="bank-local.npy"):
        export_onnx(folder, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ModelError):
        export_onnx(tmp_path / "nowhere", tmp_path / "x.onnx")


def test_bad_output_and_chunk(feddymem_model, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="^--out: "):
        export_onnx(feddymem_model, tmp_path / "file" / "sub" / "model.onnx")
    with pytest.raises(UserError, match="^--chunk: "):
        export_onnx(feddymem_model, tmp_path / "model.onnx", chunk=0)
    with pytest.raises(UserError, match="exporter"):
        export_onnx(feddymem_model, tmp_path / "model.onnx", exporter="tf")
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model") and len(err.strip().splitlines()) == 1
