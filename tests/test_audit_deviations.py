"""Audit deviations: what a run folder edited after the fact, or a privacy state holding a
non-number, must not get past ``audit verify``, ``audit report`` and ``audit check``.

- a plot the server did not sign at the run's end is never shown in the report (the page says so);
- a noise multiplier, rate or count that is not a number in range is refused by the accountant, and
  a privacy state file holding NaN/Infinity is refused by name, never counted as epsilon 0;
- a folder whose signed results are gone is not "verified" unless its ledgers say the run failed.
"""

import json
import math
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audits import TINY, _copy, _lines, _two_runs, _verify_cli

from fedsecmem.audits.ledger import LEDGER_DIR, Ledger, sha256, verify_run, write_keys
from fedsecmem.cli import main
from fedsecmem.config import config_from_dict

PNG_PREFIX = "data:image/png;base64,"


@pytest.fixture(scope="module")
def one_round_dp(tmp_path_factory):
    """A real simulated DP run of one round, leakage off: no AUROC curve and no ROC plot signed."""
    from fedsecmem.run.runner import run

    cfg = json.loads(json.dumps(TINY))
    cfg["name"] = "one-round-dp"
    cfg["feddymem"]["rounds"] = 1
    cfg["audit"] = {"leakage": False}
    cfg["clients"]["n"] = 2
    cfg["data"].update(products=["brick", "grass"], train_per_product=6, test_normal_per_product=2,
                       test_defect_per_product=2)
    out = tmp_path_factory.mktemp("one_round") / "out"
    run(config_from_dict(cfg), out)
    return out


def _three_round_curve(path: Path) -> bytes:
    """What an AUROC curve of another, three-round run looks like (a real PNG)."""
    from fedsecmem.run.plots import round_curve

    round_curve([{"round": r, "image_patch_max": 0.6 + 0.1 * r} for r in (1, 2, 3)], path)
    return path.read_bytes()


# ---- 7: an unsigned plot never enters a verified report -------------------------------------------

def test_a_plot_copied_into_a_run_after_the_fact_is_not_shown_and_the_page_says_why(one_round_dp, tmp_path, capsys):
    import base64

    run = _copy(one_round_dp, tmp_path)
    end = json.loads(_lines(run / LEDGER_DIR / "server.jsonl")[-1])
    assert "auroc_per_round.png" not in end["files"] and "leakage_roc.png" not in end["files"]
    foreign = _three_round_curve(tmp_path / "curve.png")
    for name in ("auroc_per_round.png", "leakage_roc.png"):
        (run / name).write_bytes(foreign)
    assert main(["audit", "report", str(run)]) == 0, capsys.readouterr().err
    page = (run / "report.html").read_text()
    assert base64.b64encode(foreign).decode() not in page  # the foreign curve is not on the page
    assert page.count(PNG_PREFIX) == 1  # only the epsilon plot, drawn from the signed dp events
    assert page.count("auroc_per_round.png is in the run folder but the server did not sign it") == 1
    report = json.loads((run / "report.json").read_text())
    assert report["leakage"] is None  # no leakage section, so no ROC plot line either
    capsys.readouterr()
    assert main(["audit", "check", str(run / "report.json")]) == 0  # the page is the honest rendering
    assert "FAIL" not in capsys.readouterr().out


def test_only_a_plot_whose_digest_the_signed_run_end_lists_is_embedded(one_round_dp, tmp_path):
    """render_html itself: the same bytes are embedded when the signed file list names their digest,
    refused with one line when the list names another digest (changed after the run)."""
    import base64

    from fedsecmem.audits.report import build_report, render_html

    run = _copy(one_round_dp, tmp_path)
    curve = _three_round_curve(run / "auroc_per_round.png")
    report = build_report(run)
    signed = json.loads(json.dumps(report))
    signed["files"]["auroc_per_round.png"] = {"sha256": sha256(curve), "signed_in": "server run_end"}
    assert base64.b64encode(curve).decode() in render_html(signed, run)
    changed = json.loads(json.dumps(report))
    changed["files"]["auroc_per_round.png"] = {"sha256": "0" * 64, "signed_in": "server run_end"}
    page = render_html(changed, run)
    assert base64.b64encode(curve).decode() not in page
    assert page.count("auroc_per_round.png in the run folder is not the file the server signed") == 1


# ---- 9: NaN never makes the accountant fail open --------------------------------------------------

def test_a_nan_noise_multiplier_is_refused_not_counted_as_epsilon_zero():
    from fedsecmem.audits.accountant import PrivacyAccountant, Step, canonical, epsilon_of, step_of

    honest = [Step(4.0, 1.0, 6), Step(4.0, 0.2, 10, "sgd")]
    assert epsilon_of(honest, 1e-5) > 2.0
    nan = float("nan")
    for bad in (nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="noise multiplier"):
            Step(bad, 1.0, 1)
    with pytest.raises(ValueError, match="nan"):
        canonical([(4.0, 1.0, 6), (nan, 1.0, 1)])  # never silently dropped (it made epsilon 0.0)
    for bad_rate in (0.0, 1.5, nan):
        with pytest.raises(ValueError, match="sampling rate"):
            Step(4.0, bad_rate, 1)
    for bad_count in (-1, 2.5):
        with pytest.raises(ValueError, match="count"):
            step_of([4.0, 1.0, bad_count])
    assert epsilon_of([Step(0.0, 1.0, 1)], 1e-5) == math.inf  # no noise: no guarantee (fails closed)
    acc = PrivacyAccountant([0], 1e-5)
    acc.record(0, honest)
    state = acc.to_json()
    state["history"]["0"].append([nan, 1.0, 1, "release"])
    with pytest.raises(ValueError, match="client 0.*nan"):
        PrivacyAccountant.from_json(state)


def test_privacy_state_files_are_read_strictly(tmp_path):
    from fedsecmem.audits.accountant import PrivacyAccountant, Step, read_json_strict

    for text in ('{"z": NaN}', '{"z": Infinity}', '{"z": -Infinity}', '{"z": 1e999}'):
        (tmp_path / "s.json").write_text(text)
        with pytest.raises(ValueError, match=r"s\.json"):
            read_json_strict(tmp_path / "s.json")
    acc = PrivacyAccountant([0], 1e-5)
    acc.record(0, [Step(2.0, 1.0, 3)])
    acc.save(tmp_path / "privacy_state.json")
    assert PrivacyAccountant.load(tmp_path / "privacy_state.json").epsilon(0) == acc.epsilon(0)
    path = tmp_path / "privacy_state.json"
    path.write_text(path.read_text().replace("2.0", "NaN", 1))
    with pytest.raises(ValueError, match="privacy_state.json.*NaN"):
        PrivacyAccountant.load(path)


def _with_nan(path: Path) -> None:
    """Set the first recorded noise multiplier in ``path`` to NaN, as an editor would (json.dumps
    writes NaN): the file's first list that starts with a number is a step [z, rate, count, kind]."""
    doc = json.loads(path.read_text())

    def first_step(x):
        if isinstance(x, list) and x and isinstance(x[0], float):
            return x
        for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else []):
            found = first_step(v)
            if found is not None:
                return found
        return None

    first_step(doc)[0] = float("nan")
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("name", ["privacy_state.json", "privacy_state-client-1.json"])
def test_a_state_file_edited_to_hold_nan_is_refused_by_verify_and_report_naming_it(one_round_dp, tmp_path, capsys,
                                                                                  name):
    run = _copy(one_round_dp, tmp_path)
    _with_nan(run / name)
    code, out = _verify_cli(run, capsys)
    assert code == 1 and f"{name}: " in out and "NaN" in out, out
    first = next(line for line in out.splitlines() if line.startswith(name))
    assert "NaN" in first, out  # the reason itself, not only "differs from the signed file"
    assert main(["audit", "report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "NaN" in err, err
    assert not (run / "report.json").exists()


# ---- 10: a folder without its signed results is not "verified" ------------------------------------

def test_a_finished_runs_folder_without_results_json_does_not_verify(one_round_dp, tmp_path, capsys):
    run = _copy(one_round_dp, tmp_path)
    (run / "results.json").unlink()
    code, out = _verify_cli(run, capsys)
    assert code == 1 and "ledgers verified" not in out, out
    assert "results.json: missing" in out and "unbound" in out, out
    v = verify_run(run)
    assert not v.ok and v.binding.startswith("unbound")


def test_ledgers_cut_back_to_an_earlier_end_with_results_json_deleted_do_not_verify(tmp_path, capsys):
    """The deployed shape (ledgers continue across runs): both ledgers cut back to run a's run_end,
    every chain valid, and run b's results.json deleted so nothing records run b."""
    d, _ = _two_runs(tmp_path)
    before = verify_run(tmp_path)
    assert before.ok
    for party in ("server", "client-0"):
        lines = (d / f"{party}.jsonl").read_bytes().splitlines(keepends=True)
        (d / f"{party}.jsonl").write_bytes(b"".join(lines[:3]))
    (tmp_path / "results.json").unlink()
    code, out = _verify_cli(tmp_path, capsys)
    assert code == 1 and "results.json: missing" in out and "run 'a'" in out, out
    assert before.binding == "bound: results.json of run 'b', signed by the server's run_end"
    assert verify_run(tmp_path).binding.startswith("unbound: results.json missing")


def _failed_run(tmp: Path, client_run: str = "f") -> None:
    """Ledgers of a run that failed before writing results (the runner's and serve's failed run_end)."""
    keys = {p: Ed25519PrivateKey.generate() for p in ("server", "client-0")}
    d = tmp / LEDGER_DIR
    leds = {p: Ledger(d / f"{p}.jsonl", p, k) for p, k in keys.items()}
    for led in leds.values():
        led.append("run_start", run_id="f")
    leds["client-0"].message("sent", "server", "masked", b"x")
    leds["server"].message("received", "client-0", "masked", b"x")
    leds["server"].append("run_end", status="failed: OverflowRisk: refused before anything was revealed", run_id="f")
    leds["client-0"].append("run_end", status="failed: the server stopped", run_id=client_run)
    for led in leds.values():
        led.close()
    write_keys(tmp, {p: k.public_key() for p, k in keys.items()})


def test_a_run_whose_ledgers_say_it_failed_before_results_verifies_and_says_so(tmp_path, capsys):
    _failed_run(tmp_path / "failed")
    v = verify_run(tmp_path / "failed")
    assert v.ok and "failed before writing results" in v.binding and "'f'" in v.binding, v.binding
    assert v.summary()["binding"] == v.binding
    code, out = _verify_cli(tmp_path / "failed", capsys)
    assert code == 0, out
    # a client ledger of another run beside it is not this run's
    _failed_run(tmp_path / "mixed", client_run="other")
    text = [str(p) for p in verify_run(tmp_path / "mixed").problems]
    assert any(t.startswith("client-0.jsonl") and "not run 'f'" in t for t in text), text


def test_a_signed_history_the_accountant_refuses_does_not_verify(tmp_path):
    """A server that signs a history with a negative count (which the accountant used to skip, so the
    steps counted as never taken): valid signatures, refused by the accountant's range checks."""
    keys = {p: Ed25519PrivateKey.generate() for p in ("server", "client-0")}
    d = tmp_path / LEDGER_DIR
    leds = {p: Ledger(d / f"{p}.jsonl", p, k) for p, k in keys.items()}
    for led in leds.values():
        led.append("run_start", run_id="x")
    leds["server"].append("dp", round=1, noise_multiplier=2.0, delta=1e-5, epsilon={"0": 0.5},
                          history={"0": [[2.0, 1.0, 8, "release"], [2.0, 0.2, -40, "sgd"]]})
    leds["client-0"].append("dp", round=1, noise_multiplier=2.0, delta=1e-5, epsilon=0.5,
                            history=[[2.0, 1.0, 8, "release"]])
    for led in leds.values():
        led.append("run_end", status="failed: stopped", run_id="x")
        led.close()
    write_keys(tmp_path, {p: k.public_key() for p, k in keys.items()})
    text = [str(p) for p in verify_run(tmp_path).problems]
    assert text == ["server.jsonl:2: round 1: client 0's signed history refused by the accountant: step count -40 "
                    "is not an integer >= 0"], text
