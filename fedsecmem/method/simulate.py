"""FedDyMem in one process: the simulator carries the round's messages (``fedsecmem.method.round``)
between in-process clients and the server side; bytes are counted from what would cross the
network. The helpers here are shared with the parameter-sharing baselines.
"""

from __future__ import annotations


from fedsecmem.detector.backbone import resolve_device
from fedsecmem.detector.evaluate import headline_auroc, mean_defined
from fedsecmem.detector.scoring import Scores
from fedsecmem.errors import UserError
from fedsecmem.method.aggregation import Aggregated, RoundInfo, make_aggregator, secure_sum_for
from fedsecmem.method.client import GLOBAL_MEMORY_FILE, FedDyMemClient, patients_of, save_global_memory
from fedsecmem.method.context import MethodContext, MethodOutput, timed
from fedsecmem.method.round import RoundClient, RoundServer
from fedsecmem.privacy.budget import ClientBudget, RunPrivacy, sgd_plan
from fedsecmem.progress import console, task
from fedsecmem.protocols.secure_sum import SecureSum

__all__ = ["make_clients", "run_feddymem"]


def round_metrics(ctx: MethodContext, scores: list[Scores]) -> dict:
    """The round's image AUROC (patch max, kNN), mean over clients."""
    rows = [{"image_patch_max": headline_auroc(c.test, s.image_patch), "image_knn": headline_auroc(c.test, s.image_knn)}
            for c, s in zip(ctx.clients, scores)]
    return {key: mean_defined(rows, key) for key in ("image_patch_max", "image_knn")}


def make_clients(ctx: MethodContext, use_generator: bool) -> list[FedDyMemClient]:
    cfg = ctx.cfg
    device = resolve_device(cfg.backbone.device)
    return [FedDyMemClient(c.client, ctx.train_emb.subset(c.train_index), cfg.feddymem, cfg.seed + c.client,
                           cfg.memory.coreset_ratio, use_generator, device, groups=patients_of(cfg, c.train))
            for c in ctx.clients]


def collect_timings(ctx: MethodContext, clients: list[FedDyMemClient]) -> None:
    """Add the clients' per-stage seconds (generator embedding, coreset, reduce) to the run's timings."""
    for cl in clients:
        for k, v in cl.timings.items():
            ctx.timings[k] = ctx.timings.get(k, 0.0) + v


def aggregation_seconds(ctx: MethodContext, info: RoundInfo) -> None:
    """The aggregation's client and server seconds, added to the run's timings."""
    for side, seconds in (("client_s", info.client_s), ("server_s", info.server_s)):
        if seconds is not None:
            key = f"aggregation_{side}"
            ctx.timings[key] = ctx.timings.get(key, 0.0) + seconds


def record_bytes(ctx: MethodContext, agg: Aggregated, up: list, down: list) -> dict:
    """Bytes of the aggregation per client, its client/server seconds; returns the round's summary."""
    for i in range(len(up)):
        up[i].append(agg.bytes_up[i])
        down[i].append(agg.bytes_down[i])
    aggregation_seconds(ctx, agg.info)
    return agg.info.record()


def tapped(ctx: MethodContext, ss: SecureSum) -> SecureSum:
    """The secure sum, with the run's ledgers recording its messages."""
    if ctx.ledgers is not None:
        ss.tap = ctx.ledgers.tap
    return ss


def run_feddymem(ctx: MethodContext) -> MethodOutput:
    cfg, fc, pv = ctx.cfg, ctx.cfg.feddymem, ctx.cfg.privacy
    clients = make_clients(ctx, fc.use_generator)
    ss = tapped(ctx, secure_sum_for(cfg))
    privacy = None
    if pv.dp:  # no generator, no DP-SGD: nothing to charge for it
        plans = {cl.cid: sgd_plan(cfg) for cl in clients}  # public: the same at every site
        privacy = RunPrivacy(cfg, plans, ss, ctx.out)
    try:
        return _rounds(ctx, clients, ss, privacy)
    finally:
        if privacy is not None:  # whatever happened, what was spent is on disk
            privacy.save(ctx.out)


def _rounds(ctx: MethodContext, clients: list[FedDyMemClient], ss: SecureSum, privacy: RunPrivacy | None) -> MethodOutput:
    cfg, fc = ctx.cfg, ctx.cfg.feddymem
    server = RoundServer(cfg, privacy, ctx.hooks, ctx.out)
    members = [RoundClient(cfg, cl, c.test, ctx.test_emb.subset(c.test_index)) for cl, c in zip(clients, ctx.clients)]
    # private k-means over the noisy sum (its releases charged as they happen), the faithful upload,
    # or federated k-means over the secure sum; the leakage measurement observes every sum
    aggregate = make_aggregator(cfg, ss, privacy.noisy if privacy is not None else None,
                                ctx.leakage.on_sum if ctx.leakage is not None else None)
    if privacy is not None:  # every client keeps its own accountant too, charged as the server's is
        by_id = {m.cid: m for m in members}
        for m in members:
            m.budget = ClientBudget(cfg, m.cid, m.plan, ctx.out, ctx.run_id)  # this run's: a new run starts over
        server_charge = privacy.noisy.on_release

        def charge(clients) -> None:
            server_charge(clients)
            for c in clients:
                by_id[c].charge_release()

        privacy.noisy.on_release = charge
    scored: list = []
    stopped = None
    label = f"feddymem rounds ({cfg.protocol}{', DP' if privacy else ''})"
    with task(ctx.progress, label, fc.rounds) as advance:
        for r in range(1, fc.rounds + 1):
            stopped = server.open(r, [m.cid for m in members])
            if stopped is not None:  # before any DP-SGD step or release of this round
                console.print(f"[bold yellow]{stopped}")
                break
            ready = {m.cid: m.on_task(server.task(r)) for m in members}  # train, rebuild, reduce
            server.on_ready(r, ready)
            contribs = [m.contribution for m in members]
            for h in ctx.hooks:  # what the adversaries see in the final round (leakage measurement)
                h.on_contributions(r, r == fc.rounds, clients, contribs, server.z)
            with timed(ctx.timings, "aggregation_s"):
                agg = aggregate(contribs)
            aggregation_seconds(ctx, agg.info)
            with timed(ctx.timings, "score_s"):
                scored = [m.on_memory(agg.memory) for m in members]
            record = server.close(r, agg.memory, dict(enumerate(agg.bytes_up)), dict(enumerate(agg.bytes_down)),
                                  agg.info, ready, {m.cid: s.metrics() for m, s in zip(members, scored)},
                                  [m.cid for m in members])
            if privacy is not None and ctx.ledgers is not None:
                for m in members:
                    ctx.ledgers.client_privacy(r, m.budget, privacy.z)
            eps = f", eps {record['epsilon']:.2f}" if privacy is not None else ""
            advance(1, description=f"{label[:-1]}{eps})" if eps else None)
    if not server.per_round:
        raise UserError(stopped)
    if ctx.out is not None:
        save_global_memory(server.memory, ctx.out / GLOBAL_MEMORY_FILE)
    collect_timings(ctx, clients)
    return MethodOutput(scores=[s.scores for s in scored], bytes_up=server.bytes_up, bytes_down=server.bytes_down,
                        rounds=len(server.per_round), protocol=cfg.protocol, bank_sizes=[s.bank_size for s in scored],
                        per_round=server.per_round, aggregation=server.aggregation(),
                        privacy=privacy.summary() if privacy is not None else None,
                        detectors=[m.detector() for m in members], memory=server.memory)
