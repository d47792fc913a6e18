"""CLI contract: results.json fields, PNG output, one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsecmem.cli import main
from fedsecmem.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.products=[brick,immunohistochemistry]", "data.train_per_product=6",
    "data.test_normal_per_product=4", "data.test_defect_per_product=4", "data.image_size=64",
    "data.crop_size=64", "clients.n=2", "clients.alpha=1.0", "output.embedding_cache=null", "audit.leakage=false",
]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("method", ["local", "central"])
def test_run_writes_the_results_contract(tmp_path, capsys, method):
    out = tmp_path / method
    code, stdout, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out),
                                 "--set", f"method={method}", *sum((["--set", s] for s in TINY), [])], capsys)
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == method and r["rounds"] == 1 and r["protocol"]
    assert 0.0 <= r["auroc"]["image"] <= 1.0 and 0.0 <= r["auroc"]["pixel"] <= 1.0
    assert len(r["per_client"]) == 2
    assert r["privacy"]["epsilon"] is None and "delta" in r["privacy"]
    assert len(r["comm"]["bytes_up"]) == 2 and len(r["comm"]["bytes_down"]) == 2
    if method == "central":  # pooling uploads every raw training image
        trained = 12 - sum(c["n_calibration"] for c in r["per_client"])  # calibration images stay at the site
        assert sum(b[0] for b in r["comm"]["bytes_up"]) == trained * 64 * 64 * 3
    else:
        assert all(b == [0] for b in r["comm"]["bytes_up"])
    assert r["wall_seconds"] > 0
    assert (out / "anomaly_maps.png").stat().st_size > 1000
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == method
    assert "img AUROC" in stdout


def test_table_compares_runs(tmp_path, capsys):
    out = tmp_path / "a"
    assert run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--set", "method=local",
                    *sum((["--set", s] for s in TINY), [])], capsys)[0] == 0
    code, stdout, _ = run_cli(["table", str(out)], capsys)
    assert code == 0 and "local" in stdout
    code, _, err = run_cli(["table", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no results.json" in err


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=abc"], "data.image_size"),
    (["data.bogus=1"], "data.bogus: unknown key"),
    (["method=fedmagic"], "method"),
    (["clients.alpha=-1"], "clients.alpha"),
    (["data.products=[brick,marble]"], "marble"),
    (["data.benchmark=mvtec"], "root: required"),
    (["nodot"], "expected key=value"),
    (["protocol=paillier"], "protocol"),
    (["secure.secagg.bits=32", "secure.secagg.frac_bits=31"], "frac_bits: at most bits - 2"),
    (["protocol=ckks", "feddymem.kmeans_init=kmeans++"], "needs pca-partition"),
    (["protocol=secagg", "clients.n=5", "secure.secagg.neighbours=3"], "no such regular graph"),
    (["protocol=secagg", "clients.n=5", "secure.secagg.threshold=2"], "must be a majority"),
    (["protocol=secagg", "clients.n=3", "secure.secagg.neighbours=4"], "exceeds clients.n - 1"),
])
def test_bad_config_is_one_line_exit_2(overrides, message, capsys, tmp_path):
    code, _, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / "x"),
                            *sum((["--set", s] for s in overrides), [])], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "x" / "results.json").exists()


def test_values_beyond_the_fixed_point_bound_stop_the_run_with_one_line(tmp_path, capsys):
    code, _, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / "x"),
                            *sum((["--set", s] for s in [*TINY, "method=feddymem", "feddymem.rounds=1", "privacy.dp=false",
                                                          "protocol=secagg", "secure.secagg.bits=32"]), [])],
                           capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: aggregation (secagg): fixed point:") and "exceeds the bound" in line
    assert not (tmp_path / "x" / "results.json").exists()


def test_missing_and_broken_config_files(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    code, _, err = run_cli(["run", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err


def test_missing_fmnist_names_the_package(tmp_path, capsys):
    code, _, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(tmp_path / "o"),
                            "--set", "data.benchmark=fmnist", "--set", f"data.root={tmp_path}"], capsys)
    assert code == 2 and "dataset-fashion-mnist" in err and len(err.strip().splitlines()) == 1


def test_console_script_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedsecmem", "run", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


@pytest.mark.parametrize("name", ["quickstart", "textures", "fmnist", "fmnist_ovr", "mvtec",
                                  "feddymem_textures", "feddymem_fmnist"])
def test_shipped_configs_validate(name):
    overrides = ["data.root=/tmp"] if name == "mvtec" else []
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    assert cfg.name
