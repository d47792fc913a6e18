"""The server of a networked FedDyMem run: ``fedsecmem serve CONFIG [--out DIR] [--resume]``.

It drives the same rounds as the in-process simulator (``federated.run_feddymem``)
with the clients in other processes: registration, then per round a ``round``
task (clients train towards the last global memory and rebuild their banks),
federated k-means over the network (``protocols.network_sum``: the same
requests and SecAgg+ machines), and a ``memory`` task (clients receive the
global memory, score their own test images and report their metrics). The
privacy budget is checked and charged here, as in the simulator.

After every completed round it checkpoints (atomically) the global memory,
the per-round record, the bytes, the clients' last reports and the privacy
accountant; ``--resume`` continues from the last checkpoint with the same
run id, noise multiplier and spent budget. A client that misses a deadline is
dropped for the rest of that round and addressed again in the next one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np

from fedsecmem.method.aggregation import global_memory_over, kmeans_for, secure_sum_for, threat_model
from fedsecmem.audits.ledger import LEDGER_DIR, SERVER, key_fingerprint, sha256
from fedsecmem.audits.accountant import PrivacyAccountant
from fedsecmem.config import RunConfig
from fedsecmem.crypto.pki import ProvisioningError, revoked
from fedsecmem.deployment.checks import check_deployable, crash_if_asked, get_json, max_bytes, party_tls, put_memory
from fedsecmem.errors import UserError
from fedsecmem.detector.evaluate import mean_defined
from fedsecmem.method.simulate import aggregation_summary
from fedsecmem.method.client import GLOBAL_MEMORY_FILE, GlobalMemory, load_global_memory, save_global_memory
from fedsecmem.privacy.ledgers import begin, coordinator_observer, file_digest, party_ledger, record_dp, write_party_keys
from fedsecmem.run.plots import round_curve
from fedsecmem.privacy.budget import STATE_FILE, RunPrivacy, secagg_threshold
from fedsecmem.progress import console, make_progress, task
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.errors import ProtocolAbort
from fedsecmem.protocols.grpc_transport import start_server
from fedsecmem.protocols.network_sum import NetworkCollective
from fedsecmem.protocols.wire import Body, BodyBuilder
from fedsecmem.baselines.reference import MethodOutput, timed
from fedsecmem.run.runner import results_document, write_results

log = logging.getLogger("fedsecmem.server")
CHECKPOINT = "checkpoint.json"
CHECKPOINT_MEMORY = "checkpoint_memory.npz"
FINISH_TIMEOUT_S = 10.0


def _decode_hello(cid, env) -> dict:
    b = Body(env.body, "hello")
    return {"n_train": b.int("n_train", 1), "n_test": b.int("n_test", 0), "patch_dim": b.int("patch_dim", 1, 1 << 16),
            "image_dim": b.int("image_dim", 0, 1 << 16), "sgd_rate": b.float("sgd_rate", 0.0, 1.0),
            "sgd_steps": b.int("sgd_steps", 0, 1 << 30), "products": get_json(env.body, "products", "hello", 1 << 14)}


def _decode_ready(cid, env) -> dict:
    b = Body(env.body, "ready")
    return {"n_prototypes": b.int("n_prototypes", 1, 1 << 31), "n_images": b.int("n_images", 0, 1 << 31),
            "trained": b.int("trained", 0, 1), "loss": b.float("loss")}


def _decode_scores(cid, env) -> dict:
    row = get_json(env.body, "row", "scores")
    if not isinstance(row, dict) or not {"auroc_patch", "auroc_image", "n_test"} <= set(row):
        raise ValueError("scores: row lacks the evaluation fields")
    return row


def _save_checkpoint(out: Path, state: dict, memory: GlobalMemory) -> None:
    save_global_memory(memory, out / CHECKPOINT_MEMORY)
    tmp = out / (CHECKPOINT + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / CHECKPOINT)  # last: a checkpoint names a round only once all of it is on disk


def _load_checkpoint(out: Path) -> tuple[dict, GlobalMemory]:
    path = out / CHECKPOINT
    if not path.exists():
        raise UserError(f"--resume: no checkpoint in {out} (nothing to resume)")
    return json.loads(path.read_text()), load_global_memory(out / CHECKPOINT_MEMORY)


class _Server:
    def __init__(self, cfg: RunConfig, out: Path, resume: bool):
        self.cfg, self.out = cfg, out
        self.t_start = time.perf_counter()
        self.ckpt, self.memory = _load_checkpoint(out) if resume else ({}, None)
        n = cfg.clients.n
        try:
            bad = revoked(Path(cfg.deploy.certs))
        except ProvisioningError as exc:
            raise UserError(f"deploy.certs: {exc}") from None
        self.coord = Coordinator(self.ckpt.get("run_id") or secrets.token_hex(8), set(range(n)), bad)
        self.hello: dict[int, dict] = {int(c): h for c, h in self.ckpt.get("hello", {}).items()}
        self.rows: dict[int, dict] = {int(c): r for c, r in self.ckpt.get("rows", {}).items()}
        self.per_round: list[dict] = self.ckpt.get("per_round", [])
        self.up = {int(c): v for c, v in self.ckpt.get("bytes_up", {}).items()}
        self.down = {int(c): v for c, v in self.ckpt.get("bytes_down", {}).items()}
        self.wire = self.ckpt.get("wire", {"up": {}, "down": {}})
        self.timings: dict[str, float] = self.ckpt.get("timings", {})
        self.has_memory: set[int] = set()  # clients known to hold the current global memory
        self.privacy: RunPrivacy | None = None
        self.ss = secure_sum_for(cfg)  # the protocol and its settings (SecAgg+ graph, threshold, fixed point)
        self.keys = write_party_keys(out, cfg.deploy.certs, n)
        self.ledger = party_ledger(out, SERVER, cfg.deploy.certs)
        self.coord.observer = coordinator_observer(self.ledger)
        if resume:
            self._check_ledger(self.ckpt.get("ledger"))

    # ---- exchanges ------------------------------------------------------------------------------

    def _register(self, round_number: int) -> None:
        dp = self.cfg.deploy
        self.coord.begin_round(round_number)
        console.print(f"server: run {self.coord.run_id} waiting for {self.cfg.clients.n} clients on {dp.address}")
        got = self.coord.exchange("hello", {c: BodyBuilder().build() for c in range(self.cfg.clients.n)},
                                  "hello", _decode_hello, dp.register_timeout_s)
        for c, h in got.items():
            self.hello[c] = h
        if len(self.hello) < self._need():
            raise UserError(f"serve: only {len(self.hello)} of {self.cfg.clients.n} clients registered within "
                            f"{dp.register_timeout_s:g} s, at least {self._need()} needed")
        console.print(f"server: clients {sorted(got)} registered")

    def _need(self) -> int:
        """Clients a round needs: the SecAgg+ threshold, and the survivors DP noise counts on."""
        need = secagg_threshold(self.cfg) if self.cfg.protocol == "secagg" else 1
        return max(need, self.privacy.noisy.need if self.privacy is not None else 1)

    def _setup_privacy(self) -> None:
        cfg = self.cfg
        if not cfg.privacy.dp:
            return
        plans = {c: (h["sgd_rate"], h["sgd_steps"]) for c, h in sorted(self.hello.items())}
        self.privacy = RunPrivacy(cfg, plans, self.ss)
        saved = self.ckpt.get("privacy")
        if saved:  # resume: the same noise, and the budget already spent
            self.privacy.z = self.privacy.noisy.z = float(saved["z"])
            self.privacy.per_round = [{int(c): e for c, e in r.items()} for r in saved["per_round"]]
            self.privacy.accountant = PrivacyAccountant.load(self.out / STATE_FILE)

    def _round(self, r: int) -> dict:
        cfg, dp, fc = self.cfg, self.cfg.deploy, self.cfg.feddymem
        self.coord.begin_round(r)
        self.ledger.append("round_start", round=r)
        wire_up0, wire_down0 = dict(self.coord.wire_up), dict(self.coord.wire_down)
        targets = sorted(self.hello)
        resend = put_memory(BodyBuilder(), self.memory).build() if self.memory is not None else None
        bodies = {}
        for c in targets:
            b = BodyBuilder().int("train", int(r > 1)).float("z", self.privacy.z if self.privacy else 0.0).build()
            if resend is not None and c not in self.has_memory:
                b.MergeFrom(resend)  # a client that missed the last memory (rejoined, or resumed server)
            bodies[c] = b
        with timed(self.timings, "client_round_s"):
            ready = self.coord.exchange("round", bodies, "ready", _decode_ready, dp.round_timeout_s)
        if self.privacy is not None:
            for c, info in ready.items():
                if info["trained"]:
                    self.privacy.record_sgd(c)
        participants = set(ready)
        if len(participants) < self._need():
            raise ProtocolAbort(f"round {r}: only {len(participants)} clients ready, at least {self._need()} needed")
        noisy = self.privacy.noisy if self.privacy else None

        def collective(name: str, dim: int, counts: dict[int, int], alive: set[int]) -> NetworkCollective:
            return NetworkCollective(self.coord, name, alive, dim, sum(counts[c] for c in alive), self.ss,
                                     dp.stage_timeout_s, noisy)

        patches = collective("patches", self.hello[targets[0]]["patch_dim"],
                             {c: ready[c]["n_prototypes"] for c in participants}, participants)
        last = [patches]  # the image k-means runs after the patches, over the clients still there

        def images() -> NetworkCollective:
            last.append(collective("images", self.hello[targets[0]]["image_dim"],
                                   {c: ready[c]["n_images"] for c in participants}, patches.participants))
            return last[-1]

        share_images = fc.share_images and all(ready[c]["n_images"] > 0 for c in participants)
        with timed(self.timings, "aggregation_s"):
            memory, cost, info = global_memory_over(kmeans_for(cfg, self.privacy.z if self.privacy else None),
                                                    patches, images if share_images else None)
        self.memory = memory
        final = last[-1].participants
        body = put_memory(BodyBuilder(), memory).build()
        with timed(self.timings, "client_score_s"):
            rows = self.coord.exchange("memory", {c: body for c in sorted(final)}, "scores", _decode_scores,
                                       dp.round_timeout_s)
        self.has_memory = set(rows)
        self.rows.update(rows)
        for c in range(cfg.clients.n):
            self.up.setdefault(c, []).append(cost.bytes_up.get(c, 0))
            self.down.setdefault(c, []).append(cost.bytes_down.get(c, 0))  # as the simulator counts
            for side, now, before in (("up", self.coord.wire_up, wire_up0), ("down", self.coord.wire_down, wire_down0)):
                self.wire[side].setdefault(str(c), []).append(now.get(c, 0) - before.get(c, 0))
        summary = {"round": r,
                   "image_patch_max": mean_defined([rows[c] for c in rows], "round_image_patch_max"),
                   "image_knn": mean_defined([rows[c] for c in rows], "round_image_knn"),
                   **{k: v for k, v in info.items() if k in ("secure_sums", "kmeans_objective", "kmeans_updates",
                                                             "global_items")},
                   "participants": sorted(final), "dropped": sorted(set(targets) - set(final))}
        losses = [ready[c]["loss"] for c in ready if ready[c]["trained"]]
        if losses:
            summary["loss"] = float(np.mean(losses))
        if summary["dropped"]:
            self.ledger.append("dropout", round=r, clients=summary["dropped"])
        if self.privacy is not None:
            summary["epsilon"] = self.privacy.end_round(self.out)
            record_dp(self.ledger, r, self.privacy.per_round[-1], self.privacy.z, cfg.privacy.delta)
        self.ledger.sync()
        return summary

    def _check_ledger(self, position: dict | None) -> None:
        """On resume: the server's ledger still holds the line the checkpoint was taken at."""
        if not position:
            return
        lines = self.ledger.path.read_bytes().splitlines() if self.ledger.path.exists() else []
        seq, prev = int(position["seq"]), position["prev"]
        if len(lines) < seq or (seq > 0 and sha256(lines[seq - 1]) != prev):
            raise UserError(f"--resume: {self.ledger.path} does not match the checkpoint (it had {seq} lines "
                            f"ending in {prev[:16]}...; now {len(lines)}): the ledger was cut or edited")

    def _checkpoint(self, r: int) -> None:
        self.ledger.sync()
        state = {"run_id": self.coord.run_id, "round_done": r, "hello": self.hello, "rows": self.rows,
                 "ledger": {"seq": self.ledger.seq, "prev": self.ledger.prev},
                 "per_round": self.per_round, "bytes_up": self.up, "bytes_down": self.down, "wire": self.wire,
                 "timings": self.timings}
        if self.privacy is not None:
            self.privacy.save(self.out)
            state["privacy"] = {"z": self.privacy.z, "per_round": self.privacy.per_round}
        _save_checkpoint(self.out, state, self.memory)

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, dp, fc = self.cfg, self.cfg.deploy, self.cfg.feddymem
        first = int(self.ckpt.get("round_done", 0)) + 1
        n = cfg.clients.n
        server = start_server(self.coord, dp.address, party_tls(cfg, "server"), dp.poll_s, max_bytes(cfg),
                              workers=2 * n + 8)
        begin(self.ledger, cfg, self.coord.run_id)
        status = "failed"
        try:
            self._register(first)
            self._setup_privacy()
            label = f"feddymem rounds over gRPC ({cfg.protocol}{', DP' if self.privacy else ''})"
            stopped = None
            with make_progress() as progress, task(progress, label, fc.rounds) as advance:
                advance(first - 1)
                for r in range(first, fc.rounds + 1):
                    if self.privacy is not None:
                        stopped = self.privacy.refuse(r)
                        if stopped is not None:
                            console.print(f"[bold yellow]{stopped}")
                            break
                    try:
                        self.per_round.append(self._round(r))
                    except ProtocolAbort as exc:
                        raise UserError(f"aggregation ({cfg.protocol}): {exc}") from None
                    self._checkpoint(r)
                    crash_if_asked("server", after_round=r)
                    advance(1)
            if not self.per_round:
                raise UserError(stopped or "serve: no round completed")
            self.coord.begin_round(fc.rounds + 1)
            self.coord.exchange("finish", {c: BodyBuilder().build() for c in sorted(self.hello)}, "bye",
                                lambda c, env: True, FINISH_TIMEOUT_S)
            status = "completed"
        except UserError as exc:
            status = f"failed: {exc}"
            raise
        finally:
            if self.privacy is not None:
                self.privacy.save(self.out)
            self.coord.close()
            server.stop(grace=1.0)
            if status != "completed":
                self.ledger.append("run_end", status=status)
                self.ledger.close()
        return self._results()

    def _results(self) -> dict:
        cfg = self.cfg
        per_client = []
        for c in sorted(self.rows):
            row = {k: v for k, v in self.rows[c].items() if not k.startswith("round_")}
            per_client.append({"client": c, "n_train": self.hello[c]["n_train"], "products": self.hello[c]["products"],
                               **row})
        n = cfg.clients.n
        privacy = self.privacy.summary() if self.privacy is not None else None
        init = "dp-random-partition" if self.privacy is not None else cfg.kmeans_init
        output = MethodOutput(None, [self.up.get(c, []) for c in range(n)], [self.down.get(c, []) for c in range(n)],
                              len(self.per_round), cfg.protocol, [r.get("bank_size") for r in per_client],
                              self.per_round, {**aggregation_summary(cfg, init, cfg.privacy.noise if privacy else None),
                                               "transport": "grpc"}, privacy)
        curve = round_curve(self.per_round, self.out / "auroc_per_round.png") if len(self.per_round) > 1 else None
        extra = {"deployment": {"run_id": self.coord.run_id, "address": cfg.deploy.address,
                                "refused_messages": dict(self.coord.rejected),
                                "wire_bytes_up": [self.wire["up"].get(str(c), []) for c in range(n)],
                                "wire_bytes_down": [self.wire["down"].get(str(c), []) for c in range(n)],
                                "resumed_after_round": self.ckpt.get("round_done")},
                 "run_id": self.coord.run_id, "threat_model": threat_model(cfg),
                 "ledger": {"dir": LEDGER_DIR, "key_fingerprint": key_fingerprint(self.keys),
                            "parties": len(self.keys)}}
        results = results_document(cfg, cfg.data.benchmark, per_client, output, self.timings, self.t_start, "cpu",
                                   {"anomaly_maps": None, "auroc_per_round": curve.name if curve else None},
                                   extra=extra)
        save_global_memory(self.memory, self.out / GLOBAL_MEMORY_FILE)
        self.ledger.append("run_end", status="completed",
                           global_memory_sha256=file_digest(self.out / GLOBAL_MEMORY_FILE),
                           auroc_image=results["auroc"]["image"], epsilon=results["privacy"].get("epsilon"))
        self.ledger.close()
        write_results(cfg, results, self.out)
        return results


def serve(cfg: RunConfig, out: Path, resume: bool = False) -> dict:
    check_deployable(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return _Server(cfg, out, resume).run()
