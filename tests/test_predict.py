"""A site uses what it trained: the model folder each site keeps, its calibrated threshold, loading
(every digest, the backbone weights, the ledger's signature), ``fedsecmem predict`` on PNG, DICOM and
NIfTI, and scores equal to the run's own evaluation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsecmem.cli import main
from fedsecmem.config import config_from_dict
from fedsecmem.data.load import load_benchmark
from fedsecmem.data.partition import calibration_split, partition
from fedsecmem.detector.metrics import auroc
from fedsecmem.detector.threshold import calibrate, decision_metrics, normalize
from fedsecmem.model.detector import Detector
from fedsecmem.model.store import ModelError, model_dir

TINY = {"name": "tiny-predict", "seed": 0, "method": "feddymem",
        "data": {"benchmark": "textures", "products": ["brick", "immunohistochemistry"], "train_per_product": 16,
                 "test_normal_per_product": 4, "test_defect_per_product": 4, "image_size": 64, "crop_size": 64},
        "clients": {"n": 2, "alpha": 1.0}, "protocol": "plain",
        "feddymem": {"rounds": 2, "global_k": 8, "global_k_images": 4},
        "output": {"embedding_cache": None, "map_examples_per_product": 0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fedsecmem.run.runner import run

    out = tmp_path_factory.mktemp("predict") / "run"
    run(config_from_dict(json.loads(json.dumps(TINY))), out)
    return out


def _copy_model(run: Path, tmp: Path) -> Path:
    dst = tmp / "moved" / "client-0"
    shutil.copytree(model_dir(run, 0), dst)
    return dst


# ---- thresholds ---------------------------------------------------------------------------------

def test_the_conformal_quantile_is_the_right_order_statistic_and_small_sets_fit_a_log_normal():
    scores = np.arange(1, 100, dtype=float)  # 99 scores: (n + 1)(1 - 0.05) = 95 -> the 95th smallest
    t = calibrate(scores, 0.05, "quantile")
    assert t.value == 95.0 and t.method == "quantile" and t.calibration_fpr == pytest.approx(4 / 99)
    assert calibrate(scores, 0.05).method == "quantile"  # auto: (n + 1) * 0.05 = 5 expected above it
    few = np.exp(np.random.default_rng(0).normal(3.0, 0.2, 10))
    ln = calibrate(few, 0.05)  # auto with 10 scores: the log-normal's 95% quantile
    logs = np.log(few)
    assert ln.method == "lognormal" and ln.value == pytest.approx(np.exp(logs.mean() + 1.6448536 * logs.std(ddof=1)))
    assert calibrate(few, 0.05, "quantile").method == "max"  # 10 scores cannot give a 5% quantile
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate(scores, 1.5)
    with pytest.raises(ValueError, match="at least one finite"):
        calibrate(np.array([]), 0.05)


def test_a_log_normal_threshold_holds_its_rate_on_log_normal_scores():
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(400):  # 12 calibration scores, each threshold judged on many new normals
        t = calibrate(np.exp(rng.normal(2.0, 0.3, 12)), 0.05)
        rates.append(float((np.exp(rng.normal(2.0, 0.3, 4000)) > t.value).mean()))
    assert 0.03 < np.mean(rates) < 0.08  # about the target on average (a max of 12 would give 1/13 = 7.7%)


def test_normalized_scores_put_the_threshold_at_one_half_and_decisions_count_right():
    t = calibrate(np.array([1.0, 2.0, 3.0, 4.0]), 0.05, "lognormal")
    n = normalize(np.array([t.calibration_min, t.value, 2 * t.value - t.calibration_min, 1e9, -1e9]), t)
    assert n.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0])
    m = decision_metrics(np.array([0, 0, 0, 0, 1, 1]), np.array([1, 2, 9, 3, 8, 2]), 5.0)
    assert (m["fpr"], m["tpr"], m["precision"]) == (0.25, 0.5, 0.5) and m["f1"] == pytest.approx(0.5)
    assert decision_metrics(np.array([0, 0]), np.array([1, 2]), 5.0)["tpr"] is None


def test_calibration_images_are_each_sites_own_disjoint_from_its_training_images():
    cfg = config_from_dict(TINY)
    bench = load_benchmark(cfg.data, cfg.seed)
    clients = partition(bench, 2, 1.0, 0, 2)
    kept, calib = calibration_split(clients, 0.25, 0)
    again, calib2 = calibration_split(clients, 0.25, 0)
    for c, k in zip(clients, kept):
        assert len(calib[c.client]) == round(0.25 * len(c.train_index))
        assert not set(calib[c.client]) & set(k.train_index)
        assert set(calib[c.client]) | set(k.train_index) == set(c.train_index)
        assert calib[c.client].tolist() == calib2[c.client].tolist()  # deterministic: serve/join deal alike
    none, empty = calibration_split(clients, 0.0, 0)
    assert none == clients and all(len(v) == 0 for v in empty.values())


# ---- the model each site keeps ------------------------------------------------------------------

def test_every_site_keeps_a_model_whose_manifest_its_ledger_signs(tiny, capsys):
    results = json.loads((tiny / "results.json").read_text())
    for c in range(2):
        folder = model_dir(tiny, c)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert {"generator.safetensors", "bank-local.npy", "bank-global.npy", "image_bank.npy",
                "global_memory.npz"} <= set(manifest["files"])
        assert manifest["backbone"]["weights_sha256"] and manifest["threshold"]["n_calibration"] >= 2
        det = Detector.load(folder)
        assert det.saved.signed.endswith(f"client-{c}.jsonl")
        assert results["models"]["manifest_sha256"][str(c)] == det.saved.manifest_sha256
        row = results["per_client"][c]
        assert row["threshold"] == pytest.approx(manifest["threshold"]["value"])
        assert row["n_calibration"] == manifest["threshold"]["n_calibration"]
    assert results["decisions"]["sites_calibrated"] == 2 and results["decisions"]["target_fpr"] == 0.05
    assert main(["audit", "verify", str(tiny)]) == 0  # the model events keep the ledgers verifiable


def test_the_saved_model_scores_the_sites_test_images_as_the_run_did(tiny, tmp_path):
    cfg = config_from_dict(TINY)
    bench = load_benchmark(cfg.data, cfg.seed)
    test = partition(bench, 2, 1.0, 0, 2)[0].test
    folder = tmp_path / "test-images"
    folder.mkdir()
    for i, img in enumerate(test.images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    det = Detector.load(model_dir(tiny, 0))
    pred = det.predict(sorted(folder.glob("*.png")))
    direct = det.score_batch(test.images).image("patch")
    assert np.allclose(pred.scores, direct, rtol=0, atol=1e-5)  # through files = through arrays
    row = json.loads((tiny / "results.json").read_text())["per_client"][0]
    assert auroc(test.labels, pred.scores) == pytest.approx(row["auroc_image"], abs=1e-12)
    found = decision_metrics(test.labels, pred.scores, det.threshold.value)
    assert (found["fpr"], found["tpr"]) == (row["fpr"], row["tpr"])
    assert (pred.decisions == (pred.normalized > 0.5)).all() and pred.maps.shape == (len(test), 64, 64)


def test_a_tampered_or_mismatched_model_is_refused_with_one_line_naming_the_file(tiny, tmp_path):
    moved = _copy_model(tiny, tmp_path)
    assert Detector.load(moved).saved.signed is None  # out of its run folder: digests only
    bank = moved / "bank-local.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 1
    bank.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="bank-local.npy differs from the manifest"):
        Detector.load(moved)
    shutil.rmtree(moved.parent)
    moved = _copy_model(tiny, tmp_path)
    (moved / "generator.safetensors").unlink()
    with pytest.raises(ModelError, match="generator.safetensors is missing"):
        Detector.load(moved)
    other = tmp_path / "other-weights.pth"
    import torch

    from fedsecmem.detector.backbone import create_classifier

    sd = create_classifier().state_dict()
    first = next(iter(sd))
    sd[first] = sd[first] + 1e-3
    torch.save(sd, other)
    with pytest.raises(ModelError, match="backbone weights .* differ from those it was trained with"):
        Detector.load(model_dir(tiny, 0), weights=str(other))
    in_run = tmp_path / "run-copy"
    shutil.copytree(tiny, in_run)
    manifest = model_dir(in_run, 1) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["threshold"]["value"] *= 10  # a quieter detector, digests of the files untouched
    manifest.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="manifest.json differs from the manifest signed in client-1.jsonl"):
        Detector.load(model_dir(in_run, 1))
    assert str(ModelError("x")).count("\n") == 0


def _dicom(path: Path, frames: int = 1) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "anon"
    pixels = (np.random.default_rng(0).integers(0, 2000, (frames, 48, 40))).astype(np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 48, 40, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_predict_scores_png_dicom_and_nifti_and_reports_an_unreadable_file(tiny, tmp_path, capsys):
    import nibabel as nib

    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(np.full((80, 90, 3), 120, np.uint8)).save(inputs / "flat.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(inputs / "sub" / "deep.png")
    _dicom(inputs / "sub" / "ct.dcm", frames=3)
    nib.Nifti1Image(np.random.default_rng(1).normal(size=(32, 32, 4)).astype(np.float32), np.eye(4)).to_filename(
        str(inputs / "vol.nii.gz"))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (inputs / "empty.tif").write_bytes(b"")
    (inputs / "notes.txt").write_text("not an image: skipped in a folder")
    before = sorted(p.name for p in inputs.rglob("*"))
    out = tmp_path / "pred"
    code = main(["predict", str(model_dir(tiny, 0)), str(inputs), "--out", str(out)])
    assert code == 1  # two files could not be read; the rest were scored
    assert sorted(p.name for p in inputs.rglob("*")) == before  # nothing written into the inputs
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    scored = [r for r in rows if not r["error"]]
    assert len(scored) == 1 + 1 + 3 + 4  # flat, deep, 3 DICOM frames, 4 NIfTI slices
    assert sorted(r["frame"] for r in scored if r["path"].endswith("ct.dcm")) == ["0", "1", "2"]
    assert sorted(Path(r["path"]).name for r in rows if r["error"]) == ["broken.png", "empty.tif"]
    assert all(r["decision"] in ("normal", "anomalous") and 0 <= float(r["normalized"]) <= 1 for r in scored)
    assert all((out / r["overlay"]).stat().st_size > 500 for r in scored)
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["failed"] == 2 and doc["threshold"]["target_fpr"] == 0.05 and len(doc["model_id"]) == 16
    err = capsys.readouterr().out
    assert "cannot read" in err and "broken.png" in err and "9 images scored" in err
    code = main(["predict", str(model_dir(tiny, 0)), str(inputs / "flat.png"), "--out", str(out / "again")])
    assert code == 0


@pytest.mark.parametrize("args, message", [
    (["--window", "40"], "--window: expected CENTER,WIDTH"),
    (["--window", "40,-4"], "--window: width must be positive"),
    (["--axis", "3"], "--axis: expected 0, 1 or 2"),
    (["--out", "INPUT/inside"], "is inside the input folder"),
])
def test_predict_refuses_bad_arguments_with_one_line_and_exit_2(tiny, tmp_path, capsys, args, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(inputs / "a.png")
    args = [a.replace("INPUT", str(inputs)) for a in args]
    code = main(["predict", str(model_dir(tiny, 0)), str(inputs), *(["--out", str(tmp_path / "o")]
                                                                     if "--out" not in args else []), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (inputs / "inside").exists()


def test_predict_without_a_model_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code = main(["predict", str(tmp_path / "nomodel"), str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no model folder" in err[0]


def test_local_and_central_runs_keep_models_too(tmp_path):
    from fedsecmem.run.runner import run

    for method in ("local", "central"):
        cfg = config_from_dict({**json.loads(json.dumps(TINY)), "method": method, "name": method})
        run(cfg, tmp_path / method)
        det = Detector.load(model_dir(tmp_path / method, 1))
        assert det.manifest["generator"] is None and det.manifest["method"] == method
        assert list(det.saved.detector.patch_banks) == (["local"] if method == "local" else ["pooled"])
        assert det.threshold is not None


def test_the_comparison_table_never_cuts_a_run_name(tiny, tmp_path, capsys):
    from rich.console import Console

    import fedsecmem.progress as progress

    long = tmp_path / ("a-rather-long-folder-name-" * 3) / "feddymem_dp"
    shutil.copytree(tiny, long)
    old = progress.console
    progress.console = Console(width=80, highlight=False)  # a narrow terminal
    try:
        assert main(["table", str(long), str(tiny)]) == 0
    finally:
        progress.console = old
    out = capsys.readouterr().out
    assert f"run 1: {long}" in out and f"run 2: {tiny}" in out  # each name whole, on one line
    progress.console = Console(width=400, highlight=False)  # wide enough: the names in the table
    try:
        assert main(["table", str(long), str(tiny)]) == 0
    finally:
        progress.console = old
    out = capsys.readouterr().out
    assert str(long) in out and "run 1:" not in out


def test_predict_converts_files_as_training_did_unless_told_otherwise(tiny, tmp_path):
    import nibabel as nib

    moved = _copy_model(tiny, tmp_path)
    manifest = moved / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["conversion"] == {"window": None, "slice_axis": 2}
    m["conversion"] = {"window": [500.0, 800.0], "slice_axis": 0}  # as a model trained with data.window would say
    manifest.write_text(json.dumps(m))
    _dicom(tmp_path / "ct.dcm")
    det = Detector.load(moved)
    default = det.predict([tmp_path / "ct.dcm"]).scores
    assert default == pytest.approx(det.predict([tmp_path / "ct.dcm"], window=(500, 800)).scores, abs=0)
    assert abs(default[0] - det.predict([tmp_path / "ct.dcm"], window=(40, 400)).scores[0]) > 1e-3
    nib.Nifti1Image(np.zeros((5, 32, 32), np.float32), np.eye(4)).to_filename(str(tmp_path / "v.nii"))
    assert len(det.predict([tmp_path / "v.nii"])) == 5 and len(det.predict([tmp_path / "v.nii"], axis=2)) == 32


def test_a_window_of_no_width_is_a_config_error(capsys, tmp_path):
    code = main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), "--out",
                 str(tmp_path / "x"), "--set", "data.window=[40,0]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.window: the width must be positive" in err[0]


def test_a_model_in_its_run_folder_cannot_shed_its_ledger_check(tiny, tmp_path):
    """Review findings: an edited manifest naming another site, a deleted ledger, a swapped folder."""
    run = tmp_path / "run"
    shutil.copytree(tiny, run)
    manifest = model_dir(run, 0) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["threshold"]["value"], m["site"] = 1e9, 99
    manifest.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="is site 99's, the folder says client-0"):
        Detector.load(model_dir(run, 0))
    m["site"] = 0
    manifest.write_text(json.dumps(m))
    (run / "ledger" / "client-0.jsonl").unlink()
    with pytest.raises(ModelError, match="its run folder has no ledger ledger/client-0.jsonl"):
        Detector.load(model_dir(run, 0))
    shutil.rmtree(run)
    shutil.copytree(tiny, run)
    a, b = model_dir(run, 0), model_dir(run, 1)
    a.rename(run / "models" / "x")
    b.rename(a)
    with pytest.raises(ModelError, match="is site 1's, the folder says client-0"):
        Detector.load(a)


def test_a_loaded_model_keeps_the_id_of_the_manifest_it_parsed(tiny, tmp_path):
    moved = _copy_model(tiny, tmp_path)
    det = Detector.load(moved)
    before = det.model_id
    (moved / "manifest.json").write_text((model_dir(tiny, 1) / "manifest.json").read_text())
    assert det.model_id == before and det.predict(np.zeros((64, 64, 3), np.uint8)).model_id == before


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["patch_banks"][0].pop("name"), "manifest.json is malformed"),
    (lambda m: m["threshold"].update(value=float("nan")), "threshold is not a finite number"),
    (lambda m: m["patch_banks"][0].update(dim=3), "the manifest says"),
    (lambda m: m.update(scoring="x"), "manifest.json is malformed"),
])
def test_a_malformed_manifest_is_one_line_never_a_traceback(tiny, tmp_path, capsys, edit, message):
    moved = _copy_model(tiny, tmp_path)
    m = json.loads((moved / "manifest.json").read_text())
    edit(m)
    (moved / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    code = main(["predict", str(moved), str(tmp_path / "in"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_predict_never_overwrites_an_input_given_as_a_file(tiny, tmp_path, capsys):
    (tmp_path / "A" / "overlays").mkdir(parents=True)
    img = tmp_path / "A" / "overlays" / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    before = img.read_bytes()
    code = main(["predict", str(model_dir(tiny, 0)), str(img), "--out", str(tmp_path / "A")])
    err = capsys.readouterr().err
    assert code == 2 and "predict never writes where its inputs are" in err and img.read_bytes() == before


def test_predict_keeps_the_order_it_was_given(tiny, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "img.png")
    det = Detector.load(model_dir(tiny, 0))
    pred = det.predict([np.zeros((64, 64, 3), np.uint8), tmp_path / "img.png", np.zeros((2, 64, 64), np.uint8)])
    assert [p.source for p in pred.items] == ["array[0]", str(tmp_path / "img.png"), "array[2][0]", "array[2][1]"]
    from fedsecmem.errors import UserError

    with pytest.raises(UserError, match="channels-first"):
        det.predict(np.zeros((3, 64, 64), np.uint8))


def test_the_calibration_split_keeps_a_scans_frames_together_whatever_the_privacy_unit():
    cfg = config_from_dict(TINY)
    bench = load_benchmark(cfg.data, cfg.seed)
    bench.train.groups = np.arange(len(bench.train)) // 2  # two frames per scan
    clients = partition(bench, 2, 1.0, 0, 2)
    kept, calib = calibration_split(clients, 0.25, 0)
    for c, k in zip(clients, kept):
        held = set(bench.train.groups[calib[c.client]])
        assert len(np.unique(c.train.groups)) < 3 or (held and not held & set(bench.train.groups[k.train_index]))
        assert len(calib[c.client]) == 2 * len(held)  # whole scans


def test_image_scores_without_an_image_layer_are_a_config_error(capsys, tmp_path):
    code = main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"), "--out",
                 str(tmp_path / "x"), "--set", "scoring.primary=image", "--set", "backbone.image_layer=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "primary image needs backbone.image_layer" in err[0]


def test_without_ledgers_results_json_still_names_each_sites_model(tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny, run)
    shutil.rmtree(run / "ledger")
    results = json.loads((run / "results.json").read_text())
    results.pop("ledger")  # as a run with audit.ledger: false writes it
    (run / "results.json").write_text(json.dumps(results))
    assert Detector.load(model_dir(run, 0)).saved.signed is None
    manifest = model_dir(run, 0) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["threshold"]["value"] = 1e9
    manifest.write_text(json.dumps(m))
    with pytest.raises(ModelError, match="differs from the one results.json lists for site 0"):
        Detector.load(model_dir(run, 0))
