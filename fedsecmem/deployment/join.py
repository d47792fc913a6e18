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

import logging
from pathlib import Path

import numpy as np
import torch

from fedsecmem.detector.backbone import build_embedder, resolve_device
from fedsecmem.config import RunConfig
from fedsecmem.crypto.errors import OverflowRisk
from fedsecmem.data.load import load_benchmark
from fedsecmem.data.partition import partition
from fedsecmem.crypto.pki import client_name
from fedsecmem.deployment.checks import check_deployable, client_tls, crash_if_asked, get_memory, max_bytes, put_json
from fedsecmem.errors import UserError
from fedsecmem.audits.ledger import SERVER
from fedsecmem.detector.evaluate import evaluate_client
from fedsecmem.privacy.ledgers import begin, party_ledger
from fedsecmem.method.client import FedDyMemClient
from fedsecmem.privacy.budget import min_survivors
from fedsecmem.progress import console, make_progress, task
from fedsecmem.protocols.coordinator import ERROR_KIND
from fedsecmem.protocols.dp_release import NoisySum
from fedsecmem.protocols.errors import ProtocolError
from fedsecmem.protocols.grpc_transport import ServerConnection, TransportError
from fedsecmem.protocols.kmeans_party import KMeansParty
from fedsecmem.protocols.network_sum import CollectiveMember
from fedsecmem.protocols.secure_sum import PlainSum
from fedsecmem.protocols.wire import Body, BodyBuilder, Envelope, WireError, parse_envelope

log = logging.getLogger("fedsecmem.client")
MAX_VECTOR = 1 << 28  # values in one k-means vector a client accepts to compute


class FedDyMemMember:
    """The client's state and its answer to every task kind."""

    def __init__(self, cfg: RunConfig, cid: int, progress=None):
        self.cfg, self.cid = cfg, cid
        bench = load_benchmark(cfg.data, cfg.seed)
        try:
            mine = partition(bench, cfg.clients.n, cfg.clients.alpha, cfg.seed, cfg.clients.min_train)[cid]
        except ValueError as exc:
            raise UserError(f"clients.n: {exc}") from None
        self.data = mine
        self.product_names = bench.train.product_names
        embedder = build_embedder(cfg.backbone)
        bs = cfg.backbone.batch_size
        with task(progress, f"client {cid}: embed own images", len(mine.train) + len(mine.test)) as advance:
            self.train_emb = embedder.embed(mine.train.images, bs, progress=advance)
            self.test_emb = embedder.embed(mine.test.images, bs, progress=advance)
        fc = cfg.feddymem
        self.client = FedDyMemClient(cid, self.train_emb, fc, cfg.seed + cid, cfg.memory.coreset_ratio,
                                     fc.use_generator, resolve_device(cfg.backbone.device))
        pv = cfg.privacy
        self.member = CollectiveMember(cid, cfg.secure.secagg.frac_bits, cfg.secure.secagg.rounding, MAX_VECTOR,
                                       {"patches": pv.clip_norm, "images": pv.image_clip_norm} if pv.dp else None)
        self.z: float | None = None

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
            return "bye", BodyBuilder().build()
        return self.member.handle(env)

    def _hello(self):
        pv, fc = self.cfg.privacy, self.cfg.feddymem
        q, steps = self.client.dp_sgd_plan(pv.sgd_batch_images, fc.local_epochs if fc.use_generator else 0)
        d, e = self.dims
        counts = np.bincount(self.data.train.products, minlength=len(self.product_names))
        b = BodyBuilder().int("n_train", len(self.data.train)).int("n_test", len(self.data.test))
        b.int("patch_dim", d).int("image_dim", e).float("sgd_rate", q).int("sgd_steps", steps)
        put_json(b, "products", {self.product_names[p]: int(n) for p, n in enumerate(counts) if n})
        return b.build()

    def _take_memory(self, env: Envelope) -> None:
        d, e = self.dims
        memory = get_memory(env.body, d, e or None)
        if memory is not None:
            self.client.receive(memory)

    def _round(self, env: Envelope):
        cfg, pv = self.cfg, self.cfg.privacy
        body = Body(env.body, "round")
        self._take_memory(env)
        train = body.int("train", 0, 1) == 1
        self.z = body.float("z", 0.0) if pv.dp else None
        loss, trained = 0.0, 0
        if train and self.client.global_memory is not None and self.client.generator is not None:
            if pv.dp:
                targets = torch.from_numpy(self.client.global_memory.patches)
                loss = self.client.train_towards_dp(targets, self.z, pv.sgd_clip, pv.sgd_batch_images)
            else:
                loss = self.client.train_generator()
            trained = 1
        elif train:
            raise ProtocolError("asked to train without a global memory")
        contrib = self.client.rebuild()
        parties = {"patches": KMeansParty(contrib.prototypes, contrib.weights)}
        if contrib.images is not None:
            parties["images"] = KMeansParty(contrib.images, np.ones(len(contrib.images)))
        noisy = (NoisySum(PlainSum(), self.z, pv.noise, min_survivors(cfg), cfg.secure.secagg.frac_bits)
                 if pv.dp else None)
        self.member.reset(parties, noisy)
        b = BodyBuilder().int("n_prototypes", len(contrib.prototypes)).int("trained", trained).float("loss", loss)
        b.int("n_images", 0 if contrib.images is None else len(contrib.images))
        return b.build()

    def _scores(self, env: Envelope):
        cfg = self.cfg
        self._take_memory(env)
        if self.client.global_memory is None:
            raise ProtocolError("asked to score without a global memory")
        scores = self.client.score(self.test_emb, cfg.feddymem.score_with, cfg.scoring.image_k, cfg.scoring.reweight_k)
        test = self.data.test
        row = evaluate_client(test, scores, cfg.scoring.primary, cfg.scoring.smoothing_sigma, cfg.scoring.pro)
        row["round_image_patch_max"] = row["auroc_patch"]
        row["round_image_knn"] = row["auroc_knn"]
        row["bank_size"] = len(self.client.bank)
        return put_json(BodyBuilder(), "row", row).build()


def join(cfg: RunConfig, cid: int, out: Path | None = None) -> int:
    """Take part in the run served at ``cfg.deploy.address`` as client ``cid``, keeping this
    client's ledger in ``out/ledger`` (default ``runs/<name>``); returns the rounds it scored."""
    check_deployable(cfg)
    if not 0 <= cid < cfg.clients.n:
        raise UserError(f"--client-id: {cid} is not one of this run's clients 0..{cfg.clients.n - 1}")
    tls = client_tls(cfg, cid)
    dp = cfg.deploy
    with make_progress() as progress:
        me = FedDyMemMember(cfg, cid, progress)
    ledger = party_ledger(out if out is not None else Path("runs") / cfg.name, client_name(cid), dp.certs)
    conn = ServerConnection(dp.address, tls, max_bytes(cfg), dp.poll_s, dp.reconnect_s)
    run_id, done, scored = None, (0, 0), 0
    status = "failed"
    console.print(f"client {cid}: connecting to {dp.address}")
    try:
        while True:
            data = conn.pull(*done)
            if data is None:
                continue
            try:
                env = parse_envelope(data)
            except WireError as exc:
                raise UserError(f"client {cid}: the server sent a malformed task: {exc}") from None
            if run_id is None:
                run_id = env.run_id
                begin(ledger, cfg, run_id)
            elif env.run_id != run_id:
                raise UserError(f"client {cid}: the server started another run ({env.run_id}); rejoin to take part")
            ledger.message("received", SERVER, env.kind, data, round=env.round, step=env.step)
            crash_if_asked(client_name(cid), kind=env.kind, round=env.round)
            try:
                kind, body = me.handle(env)
            except (ProtocolError, WireError, OverflowRisk, ValueError) as exc:
                log.warning("client %d: cannot do %s: %s", cid, env.kind, exc)
                kind, body = ERROR_KIND, BodyBuilder().text("reason", str(exc)[:900]).build()
            reply = Envelope(env.run_id, cid, env.round, env.step, kind, body).to_bytes()
            ok, reason = conn.push(reply)
            ledger.message("sent", SERVER, kind, reply, round=env.round, step=env.step, accepted=ok)
            if not ok and "second reply" not in reason:
                console.print(f"[yellow]client {cid}: server refused {kind} (round {env.round} step {env.step}): {reason}")
            done = (env.round, env.step)
            if kind == "scores":
                scored += 1
                console.print(f"client {cid}: round {env.round} scored")
            if env.kind == "finish":
                console.print(f"client {cid}: run {run_id} finished")
                status = "completed"
                return scored
    except TransportError as exc:
        status = f"failed: {exc}"
        raise UserError(f"client {cid}: {exc}") from None
    finally:
        conn.close()
        if run_id is not None:
            ledger.append("run_end", status=status)
        ledger.close()
