"""One client of a networked FedDyMem run: ``fedsecmem join CONFIG --client-id I``.

The client loads only its own part of the benchmark (the configured partition,
client I), embeds its own images, and then does what the server's tasks ask:
register, train and rebuild its memory for a round, answer k-means requests
through SecAgg+ (adding its share of the DP noise in a private run), score
its own test images against the global memory and report its metrics. Its
images, patches, prototypes and generator never leave the process; what
leaves is listed per task in docs/deployment.md.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from fedsecmem.detector.backbone import BackboneInfo, build_embedder, resolve_device
from fedsecmem.config import RunConfig
from fedsecmem.crypto.errors import OverflowRisk
from fedsecmem.data.load import load_benchmark
from fedsecmem.run.runner import split_sites
from fedsecmem.crypto.pki import ProvisioningError, client_name, signing_key, verify_key
from fedsecmem.deployment.checks import check_deployable, client_tls, crash_if_asked, max_bytes
from fedsecmem.deployment.messages import WITHHELD, decode_task, encode_ready, get_memory, put_json
from fedsecmem.method.round import RoundClient
from fedsecmem.model.site import keep_model, site_threshold
from fedsecmem.model.store import model_dir
from fedsecmem.errors import UserError
from fedsecmem.audits.ledger import KEYS_FILE, LEDGER_DIR, SERVER, write_keys
from fedsecmem.detector.embedding_cache import images_digest
from fedsecmem.detector.evaluate import evaluate_client
from fedsecmem.privacy.ledgers import begin, party_ledger, record_client_dp
from fedsecmem.method.client import FedDyMemClient, patients_of
from fedsecmem.privacy.budget import ClientBudget, min_survivors, secagg_threshold
from fedsecmem.progress import console, make_progress, task
from fedsecmem.protocols.coordinator import ERROR_KIND
from fedsecmem.protocols.dp_release import NoisySum
from fedsecmem.protocols.errors import ProtocolError
from fedsecmem.protocols.grpc_transport import ServerConnection, TransportError
from fedsecmem.protocols.kmeans_party import KMeansParty
from fedsecmem.protocols.network_sum import CollectiveMember, JoinedTerms
from fedsecmem.protocols.secure_sum import PlainSum
from fedsecmem.protocols.wire import BodyBuilder, Envelope, WireError, parse_envelope

__all__ = ["ClientSession", "FedDyMemMember", "MAX_VECTOR", "join", "joined_terms"]

log = logging.getLogger("fedsecmem.client")
MAX_VECTOR = 1 << 28  # values in one k-means vector a client accepts to compute


class FedDyMemMember:
    """The client's side of the round (``RoundClient``) and its answer to every task kind."""

    def __init__(self, cfg: RunConfig, cid: int, progress=None, out: Path | None = None):
        self.cfg, self.cid, self.out = cfg, cid, out
        bench = load_benchmark(cfg.data, cfg.seed, patients=cfg.privacy.unit == "patient")
        clients, _, calibration = split_sites(cfg, bench)  # as in process: the same images, held-out, calibration
        mine = clients[cid]
        self.data = mine
        self.product_names = bench.train.product_names
        embedder = build_embedder(cfg.backbone)
        self.backbone = BackboneInfo.of(cfg.backbone, cfg.data.image_size, embedder)
        calib_images = bench.train.images[calibration[cid]]
        self.threshold = None
        bs = cfg.backbone.batch_size
        with task(progress, f"client {cid}: embed own images",
                  len(mine.train) + len(mine.test) + len(calib_images)) as advance:
            self.train_emb = embedder.embed(mine.train.images, bs, progress=advance)
            self.calib_emb = embedder.embed(calib_images, bs, progress=advance) if len(calib_images) else None
            # a client the split left without test images trains and shares, and is not scored
            self.test_emb = (embedder.embed(mine.test.images, bs, progress=advance) if len(mine.test) else
                             self.train_emb.subset(np.arange(0)))
        fc = cfg.feddymem
        self.client = FedDyMemClient(cid, self.train_emb, fc, cfg.seed + cid, cfg.memory.coreset_ratio,
                                     fc.use_generator, resolve_device(cfg.backbone.device),
                                     groups=patients_of(cfg, mine.train))
        self.side = RoundClient(cfg, self.client, mine.test, self.test_emb)
        self.scored = None  # the last global memory's scores (evaluated in full once, at the run's end)
        pv = cfg.privacy
        certs = Path(cfg.deploy.certs)
        try:  # its SecAgg+ key advertisements are signed with its provisioned key, its neighbours' checked
            signer = signing_key(certs, client_name(cid))
            verify_keys = {c: verify_key(certs, client_name(c)) for c in range(cfg.clients.n)}
        except ProvisioningError as exc:
            raise UserError(f"deploy.certs: {exc}") from None
        self.member = CollectiveMember(cid, cfg.secure.secagg.frac_bits, cfg.secure.secagg.rounding, MAX_VECTOR,
                                       {"patches": pv.clip_norm, "images": pv.image_clip_norm} if pv.dp else None,
                                       signer, verify_keys, joined_terms(cfg))

    @property
    def dims(self) -> tuple[int, int]:
        d = self.train_emb.patches.shape[-1]
        e = self.train_emb.images.shape[-1] if self.train_emb.images is not None else 0
        return d, e

    def handle(self, env: Envelope) -> tuple[str, object]:
        kind = env.kind
        if kind == "hello":
            return "hello", self._hello()
        if kind == "round":
            return "ready", self._round(env)
        if kind == "memory":
            return "scores", self._scores(env)
        if kind == "finish":
            return "bye", self._evaluation()
        return self.member.handle(env)

    def _hello(self):
        """Its dimensions and test-set size; its training counts only without DP (under DP an exact
        count would tell whether one image was added: it stays here, and the DP-SGD plan is public)."""
        d, e = self.dims
        b = BodyBuilder().int("n_test", len(self.data.test)).int("patch_dim", d).int("image_dim", e)
        if not self.cfg.privacy.dp:
            counts = np.bincount(self.data.train.products, minlength=len(self.product_names))
            b.int("n_train", len(self.data.train))
            put_json(b, "products", {self.product_names[p]: int(n) for p, n in enumerate(counts) if n})
        return b.build()

    def _round(self, env: Envelope):
        cfg, pv = self.cfg, self.cfg.privacy
        d, e = self.dims
        round_task = decode_task(env.body, env.round, pv.dp, d, e or None)
        if pv.dp and self.side.budget is None:  # this client's own accountant: every run of its data
            self.side.budget = ClientBudget(cfg, self.cid, self.side.plan, self.out, env.run_id, lifetime=True,
                                            data_sha256=images_digest(self.data.train.images))
            self.member.on_release = self.side.charge_release
        ready = self.side.on_task(round_task)
        parties = {kind: KMeansParty(*pts) for kind in ("patches", "images")
                   if (pts := self.side.points(kind)) is not None}
        noisy = (NoisySum(PlainSum(), round_task.z, pv.noise, min_survivors(cfg), cfg.secure.secagg.frac_bits)
                 if pv.dp else None)
        self.member.reset(parties, noisy)
        return encode_ready(ready, private=pv.dp)

    def _scores(self, env: Envelope):
        """Score the own test images against the round's global memory: the round's metrics."""
        d, e = self.dims
        self.scored = self.side.on_memory(get_memory(env.body, d, e or None))
        row = {"n_test": len(self.data.test), "bank_size": self.scored.bank_size,
               **{f"round_{k}": v for k, v in self.scored.metrics().items()}}
        if self.cfg.privacy.dp:  # no noise covers these figures: they stay with the client (docs/privacy.md)
            row = {WITHHELD: True}
        return put_json(BodyBuilder(), "row", row).build()

    def _evaluation(self):
        """At the run's end: the full evaluation (pixel metrics, PRO) of the last global memory this
        client scored, once, as the simulator evaluates after the last round; no row if it scored none."""
        b = BodyBuilder()
        if self.scored is None:
            return b.build()
        cfg = self.cfg
        self.threshold = site_threshold(cfg, self.side.detector(), self.calib_emb)
        row = evaluate_client(self.data.test, self.scored.scores, cfg.scoring.primary, cfg.scoring.smoothing_sigma,
                              cfg.scoring.pro, self.threshold)
        row["bank_size"] = self.scored.bank_size
        if cfg.privacy.dp:  # no noise covers these figures: they stay with the client (docs/privacy.md)
            self._keep(row)
            row = {WITHHELD: True}
        return put_json(b, "row", row).build()

    def keep_model(self, run_id: str) -> str | None:
        """This site's model folder (``OUT/models/client-<i>``); its manifest's SHA-256, or None when the
        client scored no global memory (or keeps no models)."""
        if self.out is None or self.scored is None or not self.cfg.predict.save_models:
            return None
        return keep_model(self.cfg, model_dir(Path(self.out), self.cid), self.cid, self.side.detector(), self.threshold,
                          self.backbone, run_id, len(self.data.train), self.client.global_memory)

    def _keep(self, row: dict) -> None:
        """This client's evaluation, in its own folder (a private run does not send it)."""
        if self.out is None:
            return
        path = Path(self.out) / f"evaluation-client-{self.cid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"client": self.cid, **row}, indent=2))
        os.replace(tmp, path)


def joined_terms(cfg: RunConfig) -> JoinedTerms:
    """What a client of ``cfg`` joined, from its own configuration: it refuses tasks that would weaken it."""
    return JoinedTerms(cfg.protocol, cfg.clients.n, secagg_threshold(cfg) if cfg.protocol == "secagg" else 1,
                       cfg.secure.secagg.neighbours, min_survivors(cfg) if cfg.privacy.dp else 1)


class ClientSession:
    """One client's side of a served run, whatever carries the bytes (gRPC in ``join``, Ray in
    ``deployment.ray_backend``): each task envelope in, its reply envelope out, both recorded in the
    client's own ledger."""

    def __init__(self, cfg: RunConfig, cid: int, folder: Path, progress=None):
        self.cfg, self.cid = cfg, cid
        self.me = FedDyMemMember(cfg, cid, progress, folder)
        self.ledger = party_ledger(folder, client_name(cid), cfg.deploy.certs)
        # its epsilon signed at every release it makes, before the release leaves
        self.me.side.on_charged = lambda r: record_client_dp(self.ledger, r, self.me.side.budget, self.me.side.z)
        self.run_id: str | None = None
        self.done = (0, 0)  # (round, step) of the last task answered
        self.scored = 0
        self.finished = False

    def answer(self, data: bytes) -> bytes:
        """The reply to one task (an error envelope when this client cannot do it)."""
        cfg, cid = self.cfg, self.cid
        try:
            env = parse_envelope(data)
        except WireError as exc:
            raise UserError(f"client {cid}: the server sent a malformed task: {exc}") from None
        if self.run_id is None:
            self.run_id = env.run_id
            begin(self.ledger, cfg, self.run_id)
        elif env.run_id != self.run_id:
            raise UserError(f"client {cid}: the server started another run ({env.run_id}); rejoin to take part")
        self.ledger.message("received", SERVER, env.kind, data, round=env.round, step=env.step)
        crash_if_asked(client_name(cid), kind=env.kind, round=env.round)
        try:
            kind, body = self.me.handle(env)
        except (ProtocolError, WireError, OverflowRisk, ValueError) as exc:
            log.warning("client %d: cannot do %s: %s", cid, env.kind, exc)
            self.ledger.append("refused", round=env.round, step=env.step, task=env.kind, reason=str(exc)[:900])
            kind, body = ERROR_KIND, BodyBuilder().text("reason", str(exc)[:900]).build()
        return Envelope(env.run_id, cid, env.round, env.step, kind, body).to_bytes()

    def pushed(self, reply: bytes, ok: bool, reason: str = "") -> None:
        """The server took (or refused) ``reply``: recorded, and the round's bookkeeping done."""
        env = parse_envelope(reply)
        self.ledger.message("sent", SERVER, env.kind, reply, round=env.round, step=env.step, accepted=ok)
        if not ok and "second reply" not in reason:
            console.print(f"[yellow]client {self.cid}: server refused {env.kind} (round {env.round} step "
                          f"{env.step}): {reason}")
        self.done = (env.round, env.step)
        if env.kind == "scores":
            if self.me.side.budget is not None:  # what this client counted itself, beside the server's figure
                record_client_dp(self.ledger, env.round, self.me.side.budget, self.me.side.z)
            self.scored += 1
            console.print(f"client {self.cid}: round {env.round} scored")
        if env.kind == "bye":
            digest = self.me.keep_model(self.run_id)
            if digest is not None:  # the model stays here; its manifest is signed in this site's ledger
                self.ledger.append("model", manifest_sha256=digest,
                                   folder=str(model_dir(Path("."), self.cid)))
                self._pin_own_key()
                console.print(f"client {self.cid}: model kept in {model_dir(Path(self.me.out), self.cid)}")
            console.print(f"client {self.cid}: run {self.run_id} finished")
            self.finished = True

    def _pin_own_key(self) -> None:
        """A site with its own folder (not the server's) keeps its provisioned public key beside its
        ledger, so its model's signature can be checked where the model is."""
        folder = Path(self.me.out)
        if not (folder / LEDGER_DIR / KEYS_FILE).exists():
            party = client_name(self.cid)
            write_keys(folder, {party: verify_key(Path(self.cfg.deploy.certs), party)})

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.ledger.append("run_end", status=status, run_id=self.run_id)
        self.ledger.close()


def join(cfg: RunConfig, cid: int, out: Path | None = None) -> int:
    """Take part in the run served at ``cfg.deploy.address`` as client ``cid``, keeping this
    client's ledger in ``out/ledger`` (default ``runs/<name>``); returns the rounds it scored."""
    check_deployable(cfg)
    if not 0 <= cid < cfg.clients.n:
        raise UserError(f"--client-id: {cid} is not one of this run's clients 0..{cfg.clients.n - 1}")
    tls = client_tls(cfg, cid)
    dp = cfg.deploy
    folder = out if out is not None else Path("runs") / cfg.name
    with make_progress() as progress:
        session = ClientSession(cfg, cid, folder, progress)
    conn = ServerConnection(dp.address, tls, max_bytes(cfg), dp.poll_s, dp.reconnect_s)
    status = "failed"
    console.print(f"client {cid}: connecting to {dp.address}")
    try:
        while not session.finished:
            data = conn.pull(*session.done)
            if data is None:
                continue
            reply = session.answer(data)
            ok, reason = conn.push(reply)
            session.pushed(reply, ok, reason)
        status = "completed"
        return session.scored
    except TransportError as exc:
        status = f"failed: {exc}"
        raise UserError(f"client {cid}: {exc}") from None
    finally:
        conn.close()
        session.close(status)
