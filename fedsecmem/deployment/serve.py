"""The server of a networked FedDyMem run: ``fedsecmem serve CONFIG [--out DIR] [--resume]``.

It carries the round (``fedsecmem.method.round``: ``RoundServer`` here, ``RoundClient`` in each
``join``) to clients in other processes, as the simulator carries it in one: registration, then per
round a ``round`` task (clients train towards the last global memory and rebuild their banks),
federated k-means over the network (``protocols.network_sum``: the same requests and SecAgg+
machines), and a ``memory`` task (clients receive the global memory, score their own test images
and report the round's metrics); at the end a ``finish`` task, answered with each client's evaluation. The budget check, the charges and the round's record are the round
server's, the same code as in the simulator.

After every completed round it checkpoints (atomically) the global memory,
the per-round record, the bytes, which clients scored a global memory and the
privacy accountant; ``--resume`` continues from the last checkpoint with the same
run id, noise multiplier and spent budget. A client that misses a deadline is
dropped for the rest of that round and addressed again in the next one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Callable, Protocol
from pathlib import Path


from fedsecmem.method.aggregation import secure_sum_for
from fedsecmem.method.round import RoundServer
from fedsecmem.privacy.threat_model import threat_model
from fedsecmem.audits.ledger import (
    LEDGER_DIR, SERVER, key_fingerprint, ledger_head, remove_stale_plots, sha256, signed_files,
)
from fedsecmem.audits.accountant import PrivacyAccountant
from fedsecmem.config import RunConfig
from fedsecmem.crypto.pki import ProvisioningError, revoked
from fedsecmem.deployment.checks import check_deployable, crash_if_asked, max_bytes, party_tls
from fedsecmem.deployment.messages import WITHHELD, decode_bye, decode_ready, decode_scores, encode_task, get_json, put_memory, row_metrics
from fedsecmem.errors import UserError
from fedsecmem.method.client import GLOBAL_MEMORY_FILE, GlobalMemory, load_global_memory, save_global_memory
from fedsecmem.privacy.ledgers import (
    PartyLedgerHooks, begin, coordinator_observer, last_task, party_ledger, record_dp, write_party_keys,
)
from fedsecmem.run.plots import round_curve
from fedsecmem.privacy.budget import STATE_FILE, RunPrivacy, sgd_plan
from fedsecmem.progress import console, make_progress, task
from fedsecmem.protocols.coordinator import Coordinator
from fedsecmem.protocols.errors import CheatingDetected, ProtocolAbort
from fedsecmem.protocols.grpc_transport import start_server
from fedsecmem.protocols.network_sum import NetworkCollective
from fedsecmem.protocols.wire import Body, BodyBuilder
from fedsecmem.method.context import MethodOutput, timed
from fedsecmem.run.results import decisions_summary, results_document, write_results

__all__ = ["CHECKPOINT", "CHECKPOINT_MEMORY", "FINISH_TIMEOUT_S", "Server", "Transport", "serve"]

log = logging.getLogger("fedsecmem.server")
CHECKPOINT = "checkpoint.json"
CHECKPOINT_MEMORY = "checkpoint_memory.npz"
FINISH_TIMEOUT_S = 10.0
LEAKAGE_NOT_MEASURED = ("a served or Ray run cannot measure membership leakage at the server: the membership "
                        "inference needs each site's training images and withheld non-members, which stay at the "
                        "sites (run the same config in process to measure it)")


def _decode_hello(cid, env) -> dict:
    """A client's registration; under DP it holds no training counts (``n_train`` None, ``products``
    empty): they stay with the client."""
    b = Body(env.body, "hello")
    counted = b.has_int("n_train")
    return {"n_train": b.int("n_train", 1) if counted else None, "n_test": b.int("n_test", 0),
            "patch_dim": b.int("patch_dim", 1, 1 << 16), "image_dim": b.int("image_dim", 0, 1 << 16),
            "products": get_json(env.body, "products", "hello", 1 << 14) if counted else {}}


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


class Transport(Protocol):
    """What carries the coordinator's tasks and replies (gRPC, or Ray): stopped at the end."""

    def stop(self, grace: float) -> object: ...


class Server:
    """Carries the round (``RoundServer``) to the clients through a transport (gRPC by default),
    checkpoints and resumes."""

    def __init__(self, cfg: RunConfig, out: Path, resume: bool,
                 transport: Callable[[Coordinator], Transport] | None = None, name: str = "grpc",
                 timeout_scale: float = 1.0):
        """``timeout_scale``: the deploy timeouts are per client; a transport that carries several
        clients' tasks in one call (Ray actors holding several clients) scales them by that number."""
        self.cfg, self.out = cfg, out
        # the deploy settings with the deadlines this transport needs (the signed config keeps cfg's)
        self.dp = cfg.deploy.model_copy(update={k: getattr(cfg.deploy, k) * timeout_scale for k in
                                                ("register_timeout_s", "round_timeout_s", "stage_timeout_s")})
        self.transport, self.transport_name = transport, name
        self.t_start = time.perf_counter()
        self.ckpt, memory = _load_checkpoint(out) if resume else ({}, None)
        n = cfg.clients.n
        try:
            bad = revoked(Path(cfg.deploy.certs))
        except ProvisioningError as exc:
            raise UserError(f"deploy.certs: {exc}") from None
        self.coord = Coordinator(self.ckpt.get("run_id") or secrets.token_hex(8), set(range(n)), bad, max_bytes(cfg))
        self.hello: dict[int, dict] = {int(c): h for c, h in self.ckpt.get("hello", {}).items()}
        self.rows: dict[int, dict] = {}  # each client's evaluation row, from its goodbye
        self.wire = self.ckpt.get("wire", {"up": {}, "down": {}})
        self.timings: dict[str, float] = self.ckpt.get("timings", {})
        self.has_memory: set[int] = set()  # clients known to hold the current global memory (resent otherwise)
        self.scored: set[int] = {int(c) for c in self.ckpt.get("scored", [])}  # clients that scored a global memory
        self.excluded: dict[int, str] = {int(c): w for c, w in self.ckpt.get("excluded", {}).items()}  # cheaters
        self.ss = secure_sum_for(cfg)  # the protocol and its settings (SecAgg+ graph, threshold, fixed point)
        self.keys = write_party_keys(out, cfg.deploy.certs, n)
        self.ledger = party_ledger(out, SERVER, cfg.deploy.certs)
        self.coord.observer = coordinator_observer(self.ledger)
        self.round = RoundServer(cfg, None, [PartyLedgerHooks(self.ledger, cfg.privacy.delta)], out)
        self.round.memory = memory
        self.round.per_round = self.ckpt.get("per_round", [])
        for c in range(n):
            self.round.bytes_up[c] = list(self.ckpt.get("bytes_up", {}).get(str(c), []))
            self.round.bytes_down[c] = list(self.ckpt.get("bytes_down", {}).get(str(c), []))
        if resume:
            self._check_ledger(self.ckpt.get("ledger"))
            position = last_task(self.ledger)
            if position is not None and position[0] > int(self.ckpt.get("round_done", 0)):
                self.coord.resume_after(*position)  # a round cut short: its new tasks come after the old

    @property
    def privacy(self) -> RunPrivacy | None:
        return self.round.privacy

    # ---- exchanges ------------------------------------------------------------------------------

    def _register(self, round_number: int) -> None:
        dp = self.dp
        self.coord.begin_round(round_number)
        where = dp.address if self.transport is None else self.transport_name
        console.print(f"server: run {self.coord.run_id} waiting for {self.cfg.clients.n} clients on {where}")
        got = self.coord.exchange("hello", {c: BodyBuilder().build() for c in range(self.cfg.clients.n)},
                                  "hello", _decode_hello, dp.register_timeout_s)
        for c, h in got.items():
            self.hello[c] = h
        if len(self.hello) < self.round.need():
            raise UserError(f"serve: only {len(self.hello)} of {self.cfg.clients.n} clients registered within "
                            f"{dp.register_timeout_s:g} s, at least {self.round.need()} needed")
        console.print(f"server: clients {sorted(got)} registered")

    def _setup_privacy(self) -> None:
        cfg = self.cfg
        if not cfg.privacy.dp:
            return
        plans = {c: sgd_plan(cfg) for c in sorted(self.hello)}  # public: the same at every site
        self.round.privacy = RunPrivacy(cfg, plans, self.ss, self.out)
        saved = self.ckpt.get("privacy")
        if saved:  # resume: the same noise, and the budget already spent (the state file holds every
            # charge, those of a round cut short by the crash too)
            self.round.privacy.load_state_dict({**saved, "accountant": PrivacyAccountant.load(
                self.out / STATE_FILE).to_json()})

    def _round(self, r: int) -> dict:
        cfg, dp, fc = self.cfg, self.dp, self.cfg.feddymem
        self.coord.begin_round(r)
        wire_up0, wire_down0 = dict(self.coord.wire_up), dict(self.coord.wire_down)
        targets = self._targets()
        bodies = {c: encode_task(self.round.task(r, resend=c not in self.has_memory)) for c in targets}
        with timed(self.timings, "client_round_s"):
            ready = self.coord.exchange("round", bodies, "ready", decode_ready, dp.round_timeout_s)
        participants = set(self.round.on_ready(r, ready))
        noisy = self.privacy.noisy if self.privacy else None

        def collective(name: str, dim: int, counts: dict[int, int], alive: set[int]) -> NetworkCollective:
            return NetworkCollective(self.coord, name, alive, dim, sum(counts[c] for c in alive), self.ss,
                                     dp.stage_timeout_s, noisy)

        patches = collective("patches", self.hello[targets[0]]["patch_dim"],
                             {c: ready[c].n_prototypes for c in participants}, participants)
        last = [patches]  # the image k-means runs after the patches, over the clients still there

        def images() -> NetworkCollective:
            last.append(collective("images", self.hello[targets[0]]["image_dim"],
                                   {c: ready[c].n_images for c in participants}, patches.participants))
            return last[-1]

        share_images = fc.share_images and all(ready[c].n_images > 0 for c in participants)
        with timed(self.timings, "aggregation_s"):
            memory, cost, info = self.round.aggregate(patches, images if share_images else None)
        crash_if_asked("server", round=r, stage="aggregated")  # fault drills: mid-round, after the releases
        for col in last:
            self._exclude(r, col.cheaters)
        final = last[-1].participants - set(self.excluded)
        body = put_memory(BodyBuilder(), memory).build()
        with timed(self.timings, "client_score_s"):
            rows = self.coord.exchange("memory", {c: body for c in sorted(final)}, "scores", decode_scores,
                                       dp.round_timeout_s)
        self.has_memory = set(rows)
        self.scored |= set(rows)
        for c in range(cfg.clients.n):
            for side, now, before in (("up", self.coord.wire_up, wire_up0), ("down", self.coord.wire_down, wire_down0)):
                self.wire[side].setdefault(str(c), []).append(now.get(c, 0) - before.get(c, 0))
        return self.round.close(r, memory, cost.bytes_up, cost.bytes_down, info, ready,
                                {c: row_metrics(rows[c]) for c in rows}, targets)

    def _targets(self) -> list[int]:
        return sorted(set(self.hello) - set(self.excluded))

    def _exclude(self, r: int, caught: dict[int, str]) -> None:
        """Clients caught cheating take no further part in the run; the ledger names them."""
        for c, what in sorted(caught.items()):
            if c not in self.excluded:
                self.excluded[c] = what
                self.ledger.append("cheating", round=r, client=c, evidence=what)
                console.print(f"[bold red]server: client {c} {what}; excluded from the run")

    def _run_round(self, r: int) -> str | None:
        """Round ``r``; retried without the clients caught cheating (a round they made fail); the
        reason the round may not run, or None."""
        while True:
            stopped = self.round.open(r, self._targets())
            if stopped is not None:
                return stopped
            try:
                self._round(r)
                return None
            except CheatingDetected as exc:
                self._exclude(r, {c: f"proved to have cheated in secure aggregation (signed evidence): {exc}"
                                  for c in exc.clients})
                if len(self._targets()) < self.round.need():
                    raise UserError(f"aggregation ({self.cfg.protocol}): {exc}; too few honest clients left") from None
                console.print(f"[bold yellow]server: round {r} retried without clients {sorted(exc.clients)}")
            except ProtocolAbort as exc:
                raise UserError(f"aggregation ({self.cfg.protocol}): {exc}") from None

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
        n = self.cfg.clients.n
        state = {"run_id": self.coord.run_id, "round_done": r, "hello": self.hello,
                 "scored": sorted(self.scored),
                 "ledger": self.ledger.position(),
                 "per_round": self.round.per_round,
                 "bytes_up": {str(c): self.round.bytes_up[c] for c in range(n)},
                 "bytes_down": {str(c): self.round.bytes_down[c] for c in range(n)}, "wire": self.wire,
                 "excluded": {str(c): w for c, w in self.excluded.items()},
                 "timings": self.timings}
        if self.privacy is not None:
            self.privacy.save(self.out)
            state["privacy"] = {k: v for k, v in self.privacy.state_dict().items() if k != "accountant"}
        _save_checkpoint(self.out, state, self.round.memory)

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, dp, fc = self.cfg, self.dp, self.cfg.feddymem
        first = int(self.ckpt.get("round_done", 0)) + 1
        n = cfg.clients.n
        server = (self.transport(self.coord) if self.transport is not None else
                  start_server(self.coord, dp.address, party_tls(cfg, "server"), dp.poll_s, max_bytes(cfg),
                               workers=2 * n + 8))
        begin(self.ledger, cfg, self.coord.run_id)
        status = "failed"
        try:
            self._register(first)
            self._setup_privacy()
            label = f"feddymem rounds over {self.transport_name} ({cfg.protocol}{', DP' if self.privacy else ''})"
            stopped = None
            with make_progress() as progress, task(progress, label, fc.rounds) as advance:
                advance(first - 1)
                for r in range(first, fc.rounds + 1):
                    stopped = self._run_round(r)
                    if stopped is not None:
                        console.print(f"[bold yellow]{stopped}")
                        break
                    self._checkpoint(r)
                    crash_if_asked("server", after_round=r)
                    advance(1)
            if not self.round.per_round:
                raise UserError(stopped or "serve: no round completed")
            self._finish()
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
                self._sign_charged()
                self.ledger.append("run_end", status=status, run_id=self.coord.run_id)
                self.ledger.close()
        return self._results()

    def _sign_charged(self) -> None:
        """A round cut short after its charges: every client's epsilon as charged, signed for that round
        (each client signs its own at every release; the cross-check compares them)."""
        r = self.coord.round
        if self.privacy is None or not 1 <= r <= self.cfg.feddymem.rounds:
            return
        if any(rec.get("round") == r for rec in self.round.per_round):
            return
        self.privacy.end_round(self.out)
        record_dp(self.ledger, r, self.privacy)

    def _finish(self) -> None:
        """Goodbyes, each with the client's evaluation of the last global memory it scored (evaluated
        once, as the simulator does after its last round). Time for it: a round's for the clients that
        scored the last memory (alive just now), a stage's for those that scored an earlier one (they
        may have crashed since), a short while for the others (nothing to evaluate). A cheater's row
        is not counted."""
        dp, excluded = self.dp, set(self.excluded)
        self.coord.begin_round(self.cfg.feddymem.rounds + 1)
        last = self.has_memory - excluded
        earlier = self.scored - last - excluded
        groups = ((last, dp.round_timeout_s), (earlier, dp.stage_timeout_s),
                  (set(self.hello) - last - earlier, FINISH_TIMEOUT_S))
        rows: dict[int, dict | None] = {}
        for clients, timeout in groups:
            if clients:
                rows.update(self.coord.exchange("finish", {c: BodyBuilder().build() for c in sorted(clients)}, "bye",
                                                decode_bye, timeout))
        self.rows = {c: row for c, row in sorted(rows.items()) if row is not None and c not in excluded}
        lost = sorted((self.scored - excluded) - set(self.rows))
        if lost:
            console.print(f"[yellow]server: clients {lost} scored a global memory but sent no evaluation at the end "
                          "(not in per_client)")

    def _results(self) -> dict:
        cfg, rnd = self.cfg, self.round
        per_client = []
        for c in sorted(self.rows):
            row = {k: v for k, v in self.rows[c].items() if not k.startswith("round_")}
            if row.get(WITHHELD):  # a private run's client keeps its figures (evaluation-client-<c>.json)
                row = {"n_test": self.hello[c]["n_test"], "auroc_image": None, "bank_size": None, WITHHELD: True}
            per_client.append({"client": c, "n_train": self.hello[c]["n_train"], "products": self.hello[c]["products"],
                               **row})
        n = cfg.clients.n
        privacy = self.privacy.summary() if self.privacy is not None else None
        output = MethodOutput(scores=None, bytes_up=rnd.bytes_up, bytes_down=rnd.bytes_down,
                              rounds=len(rnd.per_round), protocol=cfg.protocol,
                              bank_sizes=[r.get("bank_size") for r in per_client], per_round=rnd.per_round,
                              aggregation=rnd.aggregation(transport=self.transport_name), privacy=privacy)
        measured = [r for r in rnd.per_round if r.get("image_patch_max") is not None]  # none when clients withhold
        curve = round_curve(rnd.per_round, self.out / "auroc_per_round.png") if len(measured) > 1 else None
        extra = {"deployment": {"run_id": self.coord.run_id, "address": cfg.deploy.address,
                                "refused_messages": dict(self.coord.rejected),
                                "wire_bytes_up": [self.wire["up"].get(str(c), []) for c in range(n)],
                                "wire_bytes_down": [self.wire["down"].get(str(c), []) for c in range(n)],
                                "resumed_after_round": self.ckpt.get("round_done"),
                                "excluded": {str(c): w for c, w in sorted(self.excluded.items())}},
                 "run_id": self.coord.run_id, "threat_model": threat_model(cfg),
                 "decisions": decisions_summary(cfg, per_client),
                 "ledger": {"dir": LEDGER_DIR, "key_fingerprint": key_fingerprint(self.keys),
                            "parties": len(self.keys)}}
        if cfg.audit.leakage:  # said, not omitted: the candidates to attack (members, non-members) stay at the sites
            extra["leakage"] = {"measured": False, "views": {}, "reason": LEAKAGE_NOT_MEASURED}
        results = results_document(cfg, cfg.data.benchmark, per_client, output, self.timings, self.t_start, "cpu",
                                   {"anomaly_maps": None, "auroc_per_round": curve.name if curve else None},
                                   extra=extra)
        save_global_memory(rnd.memory, self.out / GLOBAL_MEMORY_FILE)
        self.ledger.sync()
        results.ledger["heads"] = {SERVER: ledger_head(self.ledger.path)}  # run_end follows it and signs results.json
        doc = write_results(cfg, results, self.out)
        self.ledger.append("run_end", status="completed", run_id=self.coord.run_id, files=signed_files(self.out),
                           auroc_image=results.auroc.image, epsilon=results.privacy.epsilon)
        self.ledger.close()
        return doc


def serve(cfg: RunConfig, out: Path, resume: bool = False) -> dict:
    check_deployable(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        remove_stale_plots(out)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    return Server(cfg, out, resume).run()
