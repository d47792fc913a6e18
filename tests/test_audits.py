"""Audits: signed hash-chained ledgers (every kind of tampering caught with its line number), the
privacy report (rendered in headless Chromium), membership inference statistics against known
answers, and the leakage measurement and sweep on real runs."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsecmem.audits.ledger import (
    LEDGER_DIR, Ledger, cross_check, ledger_head, sha256, signed_files, verify_ledger, verify_run, write_keys,
)
from fedsecmem.audits.mia import evaluate_attack, lira_scores, shadow_splits, tpr_at_fpr
from fedsecmem.cli import main
from fedsecmem.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny-audit", "seed": 0, "method": "feddymem",
    "data": {"benchmark": "textures", "products": ["brick", "immunohistochemistry", "grass"],
             "train_per_product": 8, "test_normal_per_product": 4, "test_defect_per_product": 4,
             "image_size": 64, "crop_size": 64},
    "clients": {"n": 3, "alpha": 1.0},
    "protocol": "secagg",
    "privacy": {"dp": True, "epsilon": 8, "min_survivors": 2},
    "feddymem": {"rounds": 2, "global_k": 8, "global_k_images": 4},
    "audit": {"leakage": True, "shadows": 4, "bootstrap": 100},
    "output": {"embedding_cache": None, "map_examples_per_product": 0},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real simulated run (SecAgg+, DP, leakage on): its folder."""
    from fedsecmem.run.runner import run

    out = tmp_path_factory.mktemp("run") / "out"
    run(config_from_dict(json.loads(json.dumps(TINY))), out)
    return out


def _copy(run: Path, tmp: Path) -> Path:
    dst = tmp / "copy"
    shutil.copytree(run, dst)
    return dst


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _verify_cli(run: Path, capsys) -> tuple[int, str]:
    code = main(["audit", "verify", str(run)])
    return code, capsys.readouterr().out


# ---- ledgers ------------------------------------------------------------------------------------

def test_a_real_runs_ledgers_verify_and_record_what_happened(tiny_run, capsys):
    code, out = _verify_cli(tiny_run, capsys)
    assert code == 0 and "4 parties" in out, out
    v = verify_run(tiny_run)
    assert v.ok and v.messages_matched > 100
    server = [json.loads(x) for x in (tiny_run / LEDGER_DIR / "server.jsonl").read_text().splitlines()]
    assert server[0]["event"] == "run_start" and server[-1]["event"] == "run_end"
    assert server[0]["threat_model"]["protocol"] == "secagg" and server[0]["privacy"]["epsilon_target"] == 8
    results = json.loads((tiny_run / "results.json").read_text())
    dp = [e for e in server if e["event"] == "dp"]
    assert len(dp) == 2 and max(dp[-1]["epsilon"].values()) == pytest.approx(results["privacy"]["epsilon"])
    for name in ("results.json", "config.yaml", "privacy_state.json", "global_memory.npz", "leakage_roc.png"):
        assert server[-1]["files"][name] == sha256((tiny_run / name).read_bytes())
    plan = next(e for e in server if e["event"] == "dp_plan")  # the noise used, signed before round 1
    assert server[0]["privacy"]["noise_multiplier"] is None and plan["noise_multiplier"] == results["privacy"]["noise_multiplier"]
    assert server.index(plan) < next(i for i, e in enumerate(server) if e["event"] == "round_start")
    assert dp[-1]["history"]["0"] and dp[-1]["accountant"] == "pld"
    assert results["ledger"]["key_fingerprint"] == v.key_fingerprint
    # every SecAgg+ stage of every client is there, at both ends
    stages = {e["stage"] for e in server if e["event"] == "message" and e["dir"] == "received"}
    assert {"advertise", "share", "mask", "unmask"} <= stages


def test_a_ledger_written_from_several_threads_at_once_still_chains(tmp_path):
    """A transport's threads and the round's hooks may append to the server's ledger at the same
    time: every line keeps its own sequence number and chains to the one before."""
    import threading

    key = Ed25519PrivateKey.generate()
    led = Ledger(tmp_path / "server.jsonl", "server", key)
    led.append("run_start", run_id="r")
    threads = [threading.Thread(target=lambda i=i: [led.append("tick", writer=i, n=k) for k in range(150)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    led.append("run_end", status="completed")
    led.close()
    entries, problems = verify_ledger(tmp_path / "server.jsonl", "server", key.public_key())
    assert not problems and len(entries) == 602 and led.position()["seq"] == 602


def test_an_edited_line_is_caught_with_its_line_number(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = run / LEDGER_DIR / "client-1.jsonl"
    lines = _lines(path)
    i = next(k for k, line in enumerate(lines) if b'"dir":"sent"' in line)
    rec = json.loads(lines[i])
    rec["bytes"] += 1
    lines[i] = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(b"".join(lines))
    code, out = _verify_cli(run, capsys)
    assert code == 1
    assert f"client-1.jsonl:{i + 1}: signature does not verify" in out
    assert f"client-1.jsonl:{i + 2}: hash chain broken" in out  # the next line's prev no longer matches


def test_a_deleted_line_is_caught(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = run / LEDGER_DIR / "server.jsonl"
    lines = _lines(path)
    del lines[10]
    path.write_bytes(b"".join(lines))
    code, out = _verify_cli(run, capsys)
    assert code == 1
    assert "server.jsonl:11: hash chain broken" in out and "server.jsonl:11: sequence number 11, expected 10" in out


def test_reordered_lines_are_caught(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = run / LEDGER_DIR / "client-0.jsonl"
    lines = _lines(path)
    lines[5], lines[6] = lines[6], lines[5]
    path.write_bytes(b"".join(lines))
    code, out = _verify_cli(run, capsys)
    assert code == 1 and "client-0.jsonl:6: hash chain broken" in out and "client-0.jsonl:6: sequence number 6" in out


def test_a_cut_end_is_caught(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    path = run / LEDGER_DIR / "client-2.jsonl"
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:-1]))
    code, out = _verify_cli(run, capsys)
    assert code == 1 and f"client-2.jsonl:{len(lines) - 1}: does not end with run_end" in out


def test_a_missing_ledger_and_foreign_keys_are_caught(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    (run / LEDGER_DIR / "client-2.jsonl").unlink()
    code, out = _verify_cli(run, capsys)
    assert code == 1 and "client-2.jsonl: missing" in out
    run2 = _copy(tiny_run, tmp_path / "b")
    write_keys(run2, {p: Ed25519PrivateKey.generate().public_key() for p in ("server", "client-0", "client-1",
                                                                             "client-2")})
    v = verify_run(run2)
    assert not v.ok and all("signature does not verify" in p.message for p in v.problems)


def _signed_pair(tmp: Path, client_digest: bytes, server_digest: bytes):
    """A server and a client ledger, each validly signed, recording one upload each."""
    keys = {p: Ed25519PrivateKey.generate() for p in ("server", "client-0")}
    d = tmp / LEDGER_DIR
    s = Ledger(d / "server.jsonl", "server", keys["server"])
    c = Ledger(d / "client-0.jsonl", "client-0", keys["client-0"])
    for led in (s, c):
        led.append("run_start", run_id="x")
    c.message("sent", "server", "mask", client_digest)
    s.message("received", "client-0", "mask", server_digest)
    (tmp / "results.json").write_text(json.dumps({"run_id": "x"}))  # a completed run's results, which run_end signs
    s.append("run_end", status="completed", run_id="x", files=signed_files(tmp))
    c.append("run_end", status="completed", run_id="x")
    for led in (s, c):
        led.close()
    write_keys(tmp, {p: k.public_key() for p, k in keys.items()})


def test_a_message_the_two_sides_record_differently_is_a_mismatch_with_line_numbers(tmp_path):
    _signed_pair(tmp_path / "same", b"masked vector", b"masked vector")
    ok = verify_run(tmp_path / "same")
    assert ok.ok and ok.messages_matched == 1
    _signed_pair(tmp_path / "diff", b"masked vector", b"another vector")  # both signatures are valid
    v = verify_run(tmp_path / "diff")
    text = [str(p) for p in v.problems]
    assert "client-0.jsonl:2: message" in text[0] and "no record of receiving it" in text[0]
    assert any(t.startswith("server.jsonl:2: message") and "no record of sending it" in t for t in text)


def test_a_restarted_party_continues_its_chain(tmp_path):
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "client-0.jsonl"
    first = Ledger(path, "client-0", key)
    first.append("run_start", run_id="r")
    first.close()
    again = Ledger(path, "client-0", key)
    again.append("resume", run_id="r")
    again.append("run_end", status="completed")
    again.close()
    entries, problems = verify_ledger(path, "client-0", key.public_key())
    assert problems == [] and [e.record["seq"] for e in entries] == [0, 1, 2]


def _two_runs(tmp: Path) -> tuple[Path, dict]:
    """Deployed ledgers that continue across runs: runs "a" then "b" in one folder, results.json of "b"
    (written with the server's head before its run_end, which then signs it and the memory)."""
    keys = {p: Ed25519PrivateKey.generate() for p in ("server", "client-0")}
    d = tmp / LEDGER_DIR
    memory = tmp / "global_memory.npz"
    for run in ("a", "b"):
        memory.write_bytes(b"memory of run " + run.encode())
        s = Ledger(d / "server.jsonl", "server", keys["server"])
        c = Ledger(d / "client-0.jsonl", "client-0", keys["client-0"])
        for led in (s, c):
            led.append("run_start", run_id=run)
        c.message("sent", "server", "masked", run.encode())
        s.message("received", "client-0", "masked", run.encode())
        results = {"run_id": run, "ledger": {"heads": {"server": ledger_head(d / "server.jsonl")}}}
        (tmp / "results.json").write_text(json.dumps(results))
        s.append("run_end", status="completed", run_id=run, files=signed_files(tmp))
        c.append("run_end", status="completed", run_id=run)
        for led in (s, c):
            led.close()
    write_keys(tmp, {p: k.public_key() for p, k in keys.items()})
    return d, results


def test_ledgers_cut_back_to_an_earlier_runs_end_do_not_verify(tmp_path):
    d, _ = _two_runs(tmp_path)
    assert verify_run(tmp_path).ok
    for party in ("server", "client-0"):  # cut both back to run a's run_end: every chain still holds
        lines = (d / f"{party}.jsonl").read_bytes().splitlines(keepends=True)
        (d / f"{party}.jsonl").write_bytes(b"".join(lines[:3]))
    v = verify_run(tmp_path)
    text = [str(p) for p in v.problems]
    assert not v.ok
    assert any(t.startswith("server.jsonl") and "not run 'b'" in t for t in text), text
    assert any(t.startswith("client-0.jsonl") and "not run 'b'" in t for t in text), text
    assert any(t.startswith("server.jsonl") and "recorded line 5" in t for t in text), text
    assert not any("does not end with run_end" in t or "hash chain" in t for t in text)  # each chain holds


def test_a_swapped_global_memory_does_not_verify(tmp_path):
    _two_runs(tmp_path)
    (tmp_path / "global_memory.npz").write_bytes(b"another memory")
    assert [str(p) for p in verify_run(tmp_path).problems] == [
        "global_memory.npz: differs from the file the server signed at the run's end (changed after the run)"]


def test_a_server_that_records_less_epsilon_than_a_client_counted_is_caught(tmp_path):
    """Both sides keep their own accountant; the server's figure is the reported one and may not be
    lower than what the client itself counted."""
    keys = {p: Ed25519PrivateKey.generate() for p in ("server", "client-0", "client-1")}
    d = tmp_path / LEDGER_DIR
    leds = {p: Ledger(d / f"{p}.jsonl", p, k) for p, k in keys.items()}
    for led in leds.values():
        led.append("run_start", run_id="x")
    leds["server"].append("dp", round=1, noise_multiplier=2.0, delta=1e-5, epsilon={"0": 1.5, "1": 1.2})
    leds["client-0"].append("dp", round=1, noise_multiplier=2.0, delta=1e-5, epsilon=1.5)
    leds["client-1"].append("dp", round=1, noise_multiplier=2.0, delta=1e-5, epsilon=1.4)  # more than the server says
    (tmp_path / "results.json").write_text(json.dumps({"run_id": "x"}))  # a completed run's results, signed below
    for party, led in leds.items():
        led.append("run_end", status="completed", run_id="x", **({"files": signed_files(tmp_path)}
                                                                  if party == "server" else {}))
        led.close()
    write_keys(tmp_path, {p: k.public_key() for p, k in keys.items()})
    text = [str(p) for p in verify_run(tmp_path).problems]
    assert text == ["client-1.jsonl:2: round 1: the client counted epsilon 1.4, the server recorded only 1.2 "
                    "(under-counted)"]


def test_cross_check_needs_the_server_ledger():
    problems, matched = cross_check({"client-0": []})
    assert matched == 0 and "server ledger missing" in problems[0].message


# ---- the privacy report ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_local(tiny_run, tmp_path_factory):
    """The same data and split with each client alone (method local): the report's comparison."""
    from fedsecmem.run.runner import run

    cfg = json.loads(json.dumps(TINY))
    cfg["method"], cfg["privacy"] = "local", {"dp": False}
    cfg["audit"]["leakage"] = True  # the same withheld images as the DP run (like-for-like)
    out = tmp_path_factory.mktemp("local") / "out"
    run(config_from_dict(cfg), out)
    return out


def test_report_has_every_section_and_its_numbers_come_from_the_signed_records(tiny_run, tiny_local, tmp_path, capsys):
    from fedsecmem.audits.accountant import epsilon_of, step_of
    from fedsecmem.audits.report import SECTIONS
    from fedsecmem.audits.report_schema import Report

    run = _copy(tiny_run, tmp_path)
    assert main(["audit", "report", str(run), "--compare", str(tiny_local)]) == 0
    assert "ledgers verified" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    Report.model_validate(report)  # the versioned contract
    results = json.loads((run / "results.json").read_text())
    server = [json.loads(x) for x in (run / LEDGER_DIR / "server.jsonl").read_text().splitlines()]
    last_dp = [e for e in server if e["event"] == "dp"][-1]
    dp = report["dp"]
    assert dp["epsilon_per_client"] == [last_dp["epsilon"][str(c)] for c in range(3)]
    assert dp["epsilon_max"] == pytest.approx(results["privacy"]["epsilon"]) and dp["unit"] == "image"
    assert dp["epsilon_per_client_signed_by_client"] == pytest.approx(dp["epsilon_per_client"])  # each site's own
    assert dp["per_patient"][0] == {"images": 2, "epsilon": pytest.approx(2 * dp["epsilon_max"]),
                                    "delta": pytest.approx(2 * np.exp(dp["epsilon_max"]) * 1e-5)}
    # epsilon per adversary: the signed history with the noise each faces (m = 2, t = 2 here)
    adv = {a["adversary"].split(" (")[0]: a for a in report["adversaries"]}
    history = [step_of(entry) for entry in last_dp["history"]["0"]]
    assert max(last_dp["history"], key=lambda c: last_dp["epsilon"][c])  # non-empty
    memory = adv["anyone who sees the global memory"]
    assert memory["noise_share"] == 1.0 and memory["epsilon"] == pytest.approx(dp["epsilon_max"], rel=1e-6)
    colluders = adv["the server with up to 1 colluding client"]
    # one colluder removes its share of a 2-upload sum: the victim's own share (z^2 / (m - 1) = z^2) is left
    assert colluders["noise_share"] == 1.0 and colluders["epsilon"] == pytest.approx(dp["epsilon_max"], rel=1e-6)
    alone = adv["the server alone"]
    assert alone["noise_share"] == 2.0 and alone["epsilon"] < dp["epsilon_max"]
    assert alone["measured_attack"]["view"] == "secagg_server" and alone["dp_bound_auc"] < 1
    assert "raise its odds that a given image was used at most" in memory["in_words"]
    assert epsilon_of(history, 1e-5) <= dp["epsilon_max"] + 1e-9
    # the release inventory, from the ledger: every stage, what DP covers
    stages = {(r["stage"], r["direction"]): r for r in report["releases"]}
    assert stages[("mask", "from clients")]["dp"] == "yes" and stages[("mask", "from clients")]["from_images"]
    assert stages[("advertise", "from clients")]["dp"] == "n/a"
    assert not any(r["carries"] == "undescribed stage" for r in report["releases"])
    # utility beside each site alone, per site, and who did worse by joining
    u = report["utility"]
    local = json.loads((tiny_local / "results.json").read_text())
    assert u["compared_with"][0]["label"] == "each site alone"
    for row, mine, theirs in zip(u["per_site"], results["per_client"], local["per_client"]):
        assert row["this_run"] == mine["auroc_image"] and row["each site alone"] == theirs["auroc_image"]
    assert u["sites_worse_by_joining"] == [r["client"] for r in u["per_site"] if r["gain_over_alone"] < 0]
    # reproducibility, signed files, small cells
    rp = report["reproducibility"]
    assert rp["config_sha256"] == server[0]["config_sha256"] and rp["seed"] == 0 and "cannot" not in (rp["noise"] or "x")
    assert set(report["files"]) == {"results.json", "config.yaml", "privacy_state.json", "global_memory.npz",
                                    "auroc_per_round.png", "leakage_roc.png"}  # every plot the report embeds
    for p in report["participants"]:  # a DP run: every count coarsened, none exact (an exact n tells one image)
        values = list(p["products"].values())
        assert str(p["n_train"])[0] in "<~" and all(str(v)[0] in "<~" for v in values)
    html = (run / "report.html").read_text()
    for _, heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in html.replace("&#x27;", "'"), heading
    assert html.count("data:image/png;base64,") >= 2 and "src=\"http" not in html  # self-contained


def test_a_forged_results_file_is_refused_by_the_report(tiny_run, tmp_path, capsys):
    """The issue's attack: client 1's epsilon set to 3.0 and the attack AUC to 0.50 in results.json."""
    run = _copy(tiny_run, tmp_path)
    path = run / "results.json"
    doc = json.loads(path.read_text())
    doc["privacy"]["per_client"][1] = 3.0
    for atks in doc["leakage"]["views"].values():
        for res in atks.values():
            res["auc"] = 0.5
    path.write_text(json.dumps(doc, indent=2))
    assert main(["audit", "report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json: differs from the file the server signed" in err, err
    assert not (run / "report.json").exists()
    # a ledger cut short is refused too
    run2 = _copy(tiny_run, tmp_path / "cut")
    ledger = run2 / LEDGER_DIR / "server.jsonl"
    ledger.write_bytes(b"".join(_lines(ledger)[:-1]))
    assert main(["audit", "report", str(run2)]) == 2
    assert "the ledgers do not verify" in capsys.readouterr().err


def test_unsigned_results_or_plots_and_unverified_comparisons_are_refused(tiny_run, tiny_local, tmp_path, capsys):
    """A results file the server's run_end does not sign (e.g. written after a failed run), a plot
    swapped after the run, and a comparison run without signed records or with another split."""
    from fedsecmem.audits.ledger import LEDGER_DIR as LD

    run = _copy(tiny_run, tmp_path / "png")
    (run / "leakage_roc.png").write_bytes((run / "auroc_per_round.png").read_bytes())
    assert any(str(p).startswith("leakage_roc.png: differs") for p in verify_run(run).problems)
    run = _copy(tiny_run, tmp_path / "unsigned")
    server = run / LD / "server.jsonl"
    lines = _lines(server)
    end = json.loads(lines[-1])
    assert end["event"] == "run_end" and "results.json" in end["files"]
    # a failed run's end (re-signed with the folder's own key is beyond reach; simulate an unsigned file
    # by a ledger whose last run_end names no files): the binding check reports the results as unsigned
    from fedsecmem.audits.ledger import KEYS_FILE, check_run_binding, read_keys, verify_ledger

    entries, _ = verify_ledger(server, "server", read_keys(run / LD / KEYS_FILE)["server"])
    entries[-1].record["files"] = None
    assert any("not signed by the server's run_end" in str(p) for p in check_run_binding(run, {"server": entries}))
    # comparisons: no ledgers, or another holdout (other training images)
    fake = tmp_path / "fake_local"
    fake.mkdir()
    for name in ("results.json", "config.yaml"):
        shutil.copy(tiny_local / name, fake / name)
    run = _copy(tiny_run, tmp_path / "cmp")
    assert main(["audit", "report", str(run), "--compare", str(fake)]) == 2
    assert "--compare" in capsys.readouterr().err
    other = _copy(tiny_local, tmp_path / "other_split")
    cfg_path = other / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("holdout_fraction: 0.25", "holdout_fraction: 0.5"))
    from fedsecmem.audits.report import ReportError, build_report

    with pytest.raises(ReportError, match="config.yaml: differs|holdout_fraction differs"):
        build_report(run, None, [other])


def test_figures_that_disagree_with_the_signed_dp_events_are_refused(tiny_run, tmp_path):
    """Even with a results.json the server signed, a figure the dp events contradict is refused
    (here the signed events are rewritten and re-signed with the folder's own keys: simulation)."""
    from fedsecmem.audits.report import ReportError, signed_privacy

    results = json.loads((tiny_run / "results.json").read_text())
    server = [json.loads(x) for x in (tiny_run / LEDGER_DIR / "server.jsonl").read_text().splitlines()]
    forged = json.loads(json.dumps(server))
    next(e for e in reversed(forged) if e["event"] == "dp")["epsilon"]["1"] = 0.1
    with pytest.raises(ReportError, match=r"privacy.per_client\[1\] = .* but the server's signed ledger says 0.1"):
        signed_privacy(results, forged)
    plan = next(e for e in forged if e["event"] == "dp_plan")
    plan["noise_multiplier"] = 99.0
    with pytest.raises(ReportError, match="noise_multiplier"):
        signed_privacy(results, forged)


def test_audit_check_recomputes_every_figure_and_catches_an_edited_report(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    assert main(["audit", "report", str(run)]) == 0
    capsys.readouterr()
    assert main(["audit", "check", str(run / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "independent prv gives" in out and "0 failed" in out
    path = run / "report.json"
    report = json.loads(path.read_text())
    report["dp"]["epsilon_per_client"][2] = 0.5
    report["adversaries"][0]["epsilon"] = 0.01
    path.write_text(json.dumps(report))
    assert main(["audit", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL client 2: epsilon 0.5000 in the report" in out and "adversaries[0].epsilon" in out
    path.write_text(json.dumps({**report, "schema_version": 99}))
    assert main(["audit", "check", str(path)]) == 2
    assert "schema_version" in capsys.readouterr().err
    # a sentence edited in the page only, with report.json left as built
    assert main(["audit", "report", str(run)]) == 0
    html = run / "report.html"
    html.write_text(html.read_text().replace("verified:", "verified (and approved):", 1))
    capsys.readouterr()
    assert main(["audit", "check", str(path)]) == 1
    assert "FAIL report.html is not the page rendered from them" in capsys.readouterr().out


def test_the_checked_in_json_schemas_are_the_models(tmp_path):
    assert main(["schema", "--out", str(tmp_path)]) == 0
    for name in ("results", "report"):
        assert (tmp_path / f"{name}.schema.json").read_text() == (ROOT / "docs" / "schemas" / f"{name}.schema.json").read_text(), \
            f"docs/schemas/{name}.schema.json is stale: run `fedsecmem schema`"


def test_adversary_epsilons_on_known_answers():
    from fedsecmem.audits.accountant import Step, epsilon_of
    from fedsecmem.audits.adversaries import adversaries, in_words

    hist = {"0": [[4.0, 0.2, 10], [4.0, 1.0, 6]]}

    def eps(z_release):
        return epsilon_of([Step(4.0, 0.2, 10), Step(z_release, 1.0, 6)], 1e-5)

    rows = adversaries(hist, protocol="secagg", noise="distributed", min_survivors=4, threshold=3, clients=6,
                       delta=1e-5, kind="pld")
    # each contributor adds 1/3 of z^2; on the complete graph every client refuses a sum of fewer than
    # max(t, m) = 4 uploads, whatever the server says: the server alone faces 4/3, with two colluders 2/3
    assert [r["noise_share"] for r in rows] == pytest.approx([4 / 3, 2 / 3, 1.0])
    assert [r["epsilon"] for r in rows] == pytest.approx([eps(4.0 * (4 / 3) ** 0.5), eps(4.0 * (2 / 3) ** 0.5),
                                                          eps(4.0)])
    # on a sparse graph a client sees only its neighbourhood: only t = 3 holds, the victim's 1/3 is left
    sparse = adversaries(hist, protocol="secagg", noise="distributed", min_survivors=4, threshold=3, clients=6,
                         delta=1e-5, kind="pld", neighbours=2)
    assert [r["noise_share"] for r in sparse] == pytest.approx([1.0, 1 / 3, 1.0])
    assert "draws the graph at random" in sparse[1]["assumes"]
    # a DP-SGD step at rate 1 is not a release: its noise is the client's alone, whoever colludes
    sgd_at_one = adversaries({"0": [[4.0, 1.0, 10, "sgd"], [4.0, 1.0, 6, "release"]]}, protocol="secagg",
                             noise="distributed", min_survivors=4, threshold=3, clients=6, delta=1e-5, kind="pld")
    assert sgd_at_one[1]["epsilon"] == pytest.approx(epsilon_of(
        [Step(4.0, 1.0, 10), Step(4.0 * (2 / 3) ** 0.5, 1.0, 6)], 1e-5))
    plain = adversaries(hist, protocol="plain", noise="distributed", min_survivors=4, threshold=None, clients=6,
                        delta=1e-5, kind="pld")
    assert plain[0]["noise_share"] == pytest.approx(1 / 3)  # the plain server sees each upload with its share
    central = adversaries(hist, protocol="secagg", noise="central", min_survivors=4, threshold=3, clients=6,
                          delta=1e-5, kind="pld")
    assert central[0]["epsilon"] is None and central[2]["epsilon"] == pytest.approx(eps(4.0))
    local = adversaries(hist, protocol="plain", noise="local", min_survivors=4, threshold=None, clients=6,
                        delta=1e-5, kind="pld")
    assert all(r["epsilon"] == pytest.approx(eps(4.0)) for r in local)
    assert "7.4-fold" in in_words(2.0, 1e-5) and in_words(None, 1e-5).startswith("no guarantee")


def test_the_release_inventory_names_what_it_does_not_know():
    from fedsecmem.audits.inventory import inventory

    rows = inventory([{"event": "message", "dir": "received", "stage": "mask", "bytes": 10},
                      {"event": "message", "dir": "received", "stage": "mask", "bytes": 5},
                      {"event": "message", "dir": "sent", "stage": "request:dp_cells", "bytes": 3},
                      {"event": "message", "dir": "received", "stage": "telemetry", "bytes": 1},
                      {"event": "dp"}], dp=True)
    by = {r["stage"]: r for r in rows}
    assert by["mask"]["messages"] == 2 and by["mask"]["bytes"] == 15 and by["mask"]["dp"] == "yes"
    assert by["request:dp_cells"]["dp"] == "post-processing" and by["request:dp_cells"]["direction"] == "to clients"
    assert by["telemetry"]["carries"] == "undescribed stage" and by["telemetry"]["dp"] == "unknown"
    off = {r["stage"]: r for r in inventory([{"event": "message", "dir": "received", "stage": "mask", "bytes": 1},
                                             {"event": "message", "dir": "received", "stage": "advertise",
                                              "bytes": 1}], dp=False)}
    assert off["mask"]["dp"] == "no (DP off)" and off["advertise"]["dp"] == "n/a"


def test_clean_removes_only_the_embedding_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("emb-abc.npz", "emb-abc.json"):
        (cache / name).write_bytes(b"x" * 100)
    (cache / "notes.txt").write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output:\n  embedding_cache: {cache}\n")
    assert main(["clean", str(cfg)]) == 0
    assert "removed 2 cache files" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium_with_every_section_and_image(tiny_run, tiny_local, tmp_path):
    from fedsecmem.audits.report import SECTIONS

    browser = _chromium()
    assert browser is not None, "the report check needs chromium: apt-get install chromium (make test installs it when run as root)"
    run = _copy(tiny_run, tmp_path)
    assert main(["audit", "report", str(run), "--compare", str(tiny_local)]) == 0
    page = (run / "report.html").as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    n = (run / "report.html").read_text().count("data:image/png")
    assert f'data-images="{n} ok"' in dom, dom[-500:]
    shown = dom.split('data-sections="')[1].split('"')[0].split()
    assert shown == [key for key, _ in SECTIONS], shown  # every section laid out, in order
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,6000", page], capture_output=True,
                   timeout=120)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (6000, 1200)
    rows_with_ink = (img < 200).any(axis=1)
    assert rows_with_ink.mean() > 0.3  # text and tables down the page, not a blank render


def test_audit_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    assert main(["audit", "verify", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: audit: no run folder {tmp_path / 'nope'}"
    assert main(["audit", "report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["audit", "verify", str(tmp_path)]) == 1  # a folder without ledgers does not verify
    assert "no ledger folder" in capsys.readouterr().out


# ---- membership inference statistics ---------------------------------------------------------------

def test_attack_metrics_on_known_answers():
    labels = np.r_[np.ones(4), np.zeros(4)]
    assert tpr_at_fpr(labels, np.r_[5, 6, 7, 8, 1, 2, 3, 4.0], 0.01) == 1.0
    assert tpr_at_fpr(labels, np.r_[1, 2, 3, 8, 4, 5, 6, 7.0], 0.01) == 0.25  # one member above every non-member
    sep = evaluate_attack(np.arange(10.0) + 100, np.arange(10.0), bootstrap=200)
    assert sep.auc == 1.0 and sep.tpr == 1.0 and sep.auc_ci == pytest.approx((1.0, 1.0))
    same = evaluate_attack(np.zeros(50), np.zeros(50), bootstrap=200)
    assert same.auc == 0.5 and same.tpr == 0.0
    rng = np.random.default_rng(1)
    r = evaluate_attack(rng.normal(1, 1, 400), rng.normal(0, 1, 400), bootstrap=300)
    assert 0.70 < r.auc < 0.80  # Phi(1/sqrt 2) = 0.760
    assert r.auc_ci[0] < r.auc < r.auc_ci[1] and r.auc_ci[1] - r.auc_ci[0] < 0.1
    with pytest.raises(ValueError, match="members and non-members"):
        evaluate_attack(np.zeros(0), np.zeros(3))


def test_lira_separates_members_when_the_shadows_say_how():
    rng = np.random.default_rng(0)
    n, shadows = 200, 16
    inc = shadow_splits(n, shadows, 0)
    assert (inc.sum(0) == shadows // 2).all()  # each candidate in exactly half
    difficulty = rng.normal(0, 3, n)  # per-image offsets a plain threshold cannot see past
    effect = 1.0
    stats = difficulty + effect * inc + rng.normal(0, 0.3, (shadows, n))
    member = rng.random(n) < 0.5
    observed = difficulty + effect * member + rng.normal(0, 0.3, n)
    lira = lira_scores(observed, stats, inc)
    plain = evaluate_attack(observed[member], observed[~member], bootstrap=100).auc
    calibrated = evaluate_attack(lira[member], lira[~member], bootstrap=100).auc
    assert calibrated > 0.9 and calibrated > plain + 0.2
    with pytest.raises(ValueError, match="even"):
        shadow_splits(10, 3, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        lira_scores(observed[:5], stats, inc)


def test_distance_attack_sees_members_of_a_memory_and_nothing_in_an_independent_one():
    from fedsecmem.run.leakage import _mean_nn

    rng = np.random.default_rng(0)
    members = rng.normal(size=(60, 16, 8)).astype(np.float32)
    nonmembers = rng.normal(size=(60, 16, 8)).astype(np.float32)
    other = rng.normal(size=(60, 16, 8)).astype(np.float32)
    memory = members.reshape(-1, 8)[::2]  # half of the members' patches, as a coreset would keep
    inside = evaluate_attack(-_mean_nn(memory, members), -_mean_nn(memory, nonmembers), bootstrap=100)
    assert inside.auc > 0.95
    unrelated = other.reshape(-1, 8)[::2]
    outside = evaluate_attack(-_mean_nn(unrelated, members), -_mean_nn(unrelated, nonmembers), bootstrap=100)
    assert 0.35 < outside.auc < 0.65


def test_cell_centres_decodes_what_a_cell_release_reveals():
    from fedsecmem.run.leakage import cell_centres
    from fedsecmem.protocols.kmeans_party import CellStats, PrivateCells, local_cell_stats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    w = rng.random(30)
    labels = rng.integers(0, 3, 30)
    labels[:3] = [0, 1, 2]
    vec = local_cell_stats(x, w, labels, 4)  # cell 3 is empty
    got = cell_centres(CellStats(4), vec, 4, 1e-9)
    want = np.stack([(x[labels == c] * w[labels == c, None]).sum(0) / w[labels == c].sum() for c in range(3)])
    assert np.allclose(got, want)
    scaled = cell_centres(PrivateCells(10.0), local_cell_stats(
        x, w, np.zeros(30, np.int64), 1), 4, 1e-9)
    assert np.allclose(scaled[0], 10 * (x * w[:, None]).sum(0) / w.sum())


# ---- leakage on a real run, and the sweep -----------------------------------------------------------

def test_leakage_of_a_real_run_uses_withheld_training_images_as_non_members(tiny_run):
    r = json.loads((tiny_run / "results.json").read_text())
    lk = r["leakage"]
    assert set(lk["views"]) == {"secagg_server", "global_memory"}  # a secagg server never sees one client
    n_train = sum(c["n_train"] for c in r["per_client"])
    n_calibration = sum(c["n_calibration"] for c in r["per_client"])  # each site's threshold images: neither
    for view in lk["views"].values():
        for atk in ("distance", "lira"):
            res = view[atk]  # 3 products x 8 images
            assert res["members"] == n_train and res["nonmembers"] == 24 - n_train - n_calibration
            assert 0 <= res["auc_ci"][0] <= res["auc"] <= res["auc_ci"][1] <= 1
    assert (tiny_run / "leakage_roc.png").stat().st_size > 1000
    bound = lk["dp_bound"]
    assert bound["epsilon"] == r["privacy"]["epsilon"] and 0.5 < bound["auc"] <= 1 and 0.01 < bound["tpr"] <= 1


def test_plain_server_view_leaks_membership(tmp_path):
    """Without DP, the faithful plain server holds every client's prototypes: members stand out."""
    from fedsecmem.run.runner import run

    cfg = json.loads(json.dumps(TINY))
    cfg.update(protocol="plain", privacy={"dp": False})
    cfg["feddymem"].update(global_k=32, rounds=1)
    r = run(config_from_dict(cfg), tmp_path / "plain")
    views = r["leakage"]["views"]
    assert {"plain_server", "plain_server_images", "global_memory"} <= set(views)
    assert views["plain_server"]["distance"]["auc"] > 0.9
    assert views["plain_server_images"]["distance"]["auc"] == 1.0  # raw image embeddings: exact matches


def test_sweep_writes_table_plot_and_rows(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    tiny = json.loads(json.dumps(TINY))
    tiny["feddymem"]["rounds"] = 1
    cfg.write_text(json.dumps(tiny))
    out = tmp_path / "sweep"
    assert main(["sweep", str(cfg), "--epsilons", "8,inf", "--protocols", "secagg", "--out", str(out),
                 "--inf-set", "feddymem.global_k=16"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["protocol"], r["epsilon_target"]) for r in rows] == [("secagg", 8.0), ("secagg", None)]
    assert rows[0]["epsilon_spent"] <= 8.0 and rows[1]["epsilon_spent"] is None
    assert all(0 <= r["mia_auc_server"] <= 1 and 0 <= r["mia_auc_global"] <= 1 for r in rows)
    assert json.loads((out / "secagg_epsinf" / "results.json").read_text())["leakage"]
    assert load_config(out / "secagg_epsinf" / "config.yaml").feddymem.global_k == 16  # --inf-set: no-DP run only
    assert load_config(out / "secagg_eps8" / "config.yaml").feddymem.global_k == 8
    assert "| secagg | 8 |" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--epsilons", "1,abc"], "--epsilons: 'abc' is not a number or inf"),
    (["--epsilons", "-1"], "--epsilons: '-1' must be a positive number"),
    (["--protocols", "plain,https"], "--protocols: unknown ['https']"),
])
def test_sweep_refuses_bad_arguments_in_one_line(args, message, capsys):
    assert main(["sweep", str(ROOT / "configs/quickstart.yaml"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err


def test_dp_bounds_on_any_attack():
    from fedsecmem.audits.mia import dp_auc_bound, dp_tpr_bound

    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5)
    for eps in (0.5, 1.0, 4.0):
        assert dp_auc_bound(eps, 0.0) == pytest.approx(np.exp(eps) / (1 + np.exp(eps)), abs=1e-6)
    assert dp_tpr_bound(1.0, 1e-5, 0.01) == pytest.approx(np.e * 0.01 + 1e-5)
    assert dp_tpr_bound(0.0, 0.0, 0.3) == pytest.approx(0.3) and dp_tpr_bound(20.0, 0.0, 0.01) == pytest.approx(1.0)
    # a measured attack on a DP run never beats the bound
    rng = np.random.default_rng(0)
    r = evaluate_attack(rng.normal(0.2, 1, 300), rng.normal(0, 1, 300), bootstrap=50)
    assert r.auc < dp_auc_bound(1.0, 1e-5)


def test_the_tap_sees_every_secagg_message_as_the_network_would_carry_it():
    from fedsecmem.protocols import federation_pb2 as pb
    from fedsecmem.protocols.secagg_messages import MaskedInput
    from fedsecmem.protocols.secure_sum import SecAggSum
    from fedsecmem.protocols.wire import decode_secagg

    ss = SecAggSum()
    seen = []
    ss.tap = lambda direction, cid, stage, data: seen.append((direction, cid, stage, data()))
    inputs = {c: np.full(6, float(c)) for c in range(3)}
    assert np.allclose(ss.sum(inputs).total, sum(inputs.values()))
    ups = sorted((c, s) for d, c, s, _ in seen if d == "up")
    assert ups == sorted((c, s) for c in range(3) for s in ("advertise", "share", "mask", "unmask"))
    assert sorted(c for d, c, s, _ in seen if s == "setup") == [0, 1, 2]
    for d, c, s, data in seen:
        if d == "up" and s == "mask":  # the exact bytes decode to the masked input the server summed
            msg = decode_secagg(MaskedInput, pb.Payload.FromString(data), c, -1, 6)
            assert msg.vector.shape == (6,) and msg.vector.dtype == np.uint64


def test_a_view_drowned_in_noise_is_still_measured():
    """Under DP every cell of a release can fall under the noise cut: the view is then empty, and it
    must be reported (as telling the attacker nothing), not dropped from the results."""
    from fedsecmem.config import RunConfig
    from fedsecmem.run.leakage import LeakageViews

    v = LeakageViews(RunConfig(protocol="secagg", method="feddymem"))
    v.aggregate = [np.zeros((0, 4))]
    views = v.views(np.ones((2, 4)))
    assert set(views) == {"secagg_server", "global_memory"} and len(views["secagg_server"]) == 0
