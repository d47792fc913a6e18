"""Federated methods in the in-process simulation: FedDyMem (memory sharing) and the
parameter-sharing baselines FedAvg and FedProx of the memory generator.

The simulation drives client and server objects that hold no I/O; bytes are
counted from what would cross the network.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedsecmem.method.aggregation import Aggregated, average_states, make_aggregator, secure_sum_for
from fedsecmem.detector.backbone import resolve_device
from fedsecmem.errors import UserError
from fedsecmem.privacy.budget import RunPrivacy
from fedsecmem.method.client import GLOBAL_MEMORY_FILE, FedDyMemClient, save_global_memory
from fedsecmem.baselines.fedsm import FedSM
from fedsecmem.baselines.wsa import split_scope, with_scope
from fedsecmem.detector.evaluate import headline_auroc, mean_defined
from fedsecmem.progress import console, task
from fedsecmem.baselines.reference import MethodContext, MethodOutput, timed


def _round_metrics(ctx: MethodContext, scores) -> dict:
    rows = [{"image_patch_max": headline_auroc(c.test, s.image_patch), "image_knn": headline_auroc(c.test, s.image_knn)}
            for c, s in zip(ctx.clients, scores)]
    return {key: mean_defined(rows, key) for key in ("image_patch_max", "image_knn")}


def _make_clients(ctx: MethodContext, use_generator: bool) -> list[FedDyMemClient]:
    cfg = ctx.cfg
    device = resolve_device(cfg.backbone.device)
    return [FedDyMemClient(c.client, ctx.train_emb.subset(c.train_index), cfg.feddymem, cfg.seed + c.client,
                           cfg.memory.coreset_ratio, use_generator, device) for c in ctx.clients]


def _collect_timings(ctx: MethodContext, clients: list[FedDyMemClient]) -> None:
    """Add the clients' per-stage seconds (generator embedding, coreset, reduce) to the run's timings."""
    for cl in clients:
        for k, v in cl.timings.items():
            ctx.timings[k] = ctx.timings.get(k, 0.0) + v


def _record(ctx: MethodContext, agg: Aggregated, up: list, down: list) -> dict:
    """Bytes of the aggregation per client, its client/server seconds; returns the round's summary."""
    for i in range(len(up)):
        up[i].append(agg.bytes_up[i])
        down[i].append(agg.bytes_down[i])
    for side in ("client_s", "server_s"):
        if side in agg.info:
            key = f"aggregation_{side}"
            ctx.timings[key] = ctx.timings.get(key, 0.0) + agg.info[side]
    return {k: v for k, v in agg.info.items()
            if k in ("secure_sums", "kmeans_objective", "kmeans_updates", "global_items")}


def aggregation_summary(cfg, init: str | None, dp_noise: str | None = None) -> dict:
    """results.json's ``aggregation``: protocol, seeding, noise placement and protocol settings."""
    out = {"protocol": cfg.protocol, "kmeans_init": init}
    if dp_noise is not None:
        out["dp_noise"] = dp_noise
    if cfg.protocol == "secagg":
        out["secagg"] = cfg.secure.secagg.model_dump()
    elif cfg.protocol == "ckks":
        out["ckks"] = cfg.secure.ckks.model_dump()
    return out


def _tapped(ctx: MethodContext, ss):
    """The secure sum, with the run's ledgers recording its messages."""
    if ctx.ledgers is not None:
        ss.tap = ctx.ledgers.tap
    return ss


def _begin_round(ctx: MethodContext, r: int) -> None:
    if ctx.ledgers is not None:
        ctx.ledgers.begin_round(r)


def run_feddymem(ctx: MethodContext) -> MethodOutput:
    cfg, fc, pv = ctx.cfg, ctx.cfg.feddymem, ctx.cfg.privacy
    clients = _make_clients(ctx, fc.use_generator)
    ss = _tapped(ctx, secure_sum_for(cfg))
    privacy = None
    if pv.dp:  # no generator, no DP-SGD: nothing to charge for it
        plans = {cl.cid: cl.dp_sgd_plan(pv.sgd_batch_images, fc.local_epochs if fc.use_generator else 0)
                 for cl in clients}
        privacy = RunPrivacy(cfg, plans, ss)
    try:
        return _feddymem_rounds(ctx, clients, ss, privacy)
    finally:
        if privacy is not None:  # whatever happened, what was spent is on disk
            privacy.save(ctx.out)


def _feddymem_rounds(ctx: MethodContext, clients: list[FedDyMemClient], ss, privacy) -> MethodOutput:
    cfg, fc, pv = ctx.cfg, ctx.cfg.feddymem, ctx.cfg.privacy
    aggregate = make_aggregator(cfg, ss, privacy.noisy if privacy else None,
                                ctx.leakage.on_sum if ctx.leakage is not None else None)
    up = [[] for _ in clients]
    down = [[] for _ in clients]
    per_round, scores = [], []
    label = f"feddymem rounds ({cfg.protocol}{', DP' if privacy else ''})"
    with task(ctx.progress, label, fc.rounds) as advance:
        for r in range(fc.rounds):
            if privacy is not None:
                message = privacy.refuse(r + 1)
                if message is not None:  # before any DP-SGD step or release of this round
                    console.print(f"[bold yellow]{message}")
                    break
            _begin_round(ctx, r + 1)
            if r > 0:  # train towards the last global memory, then rebuild
                with timed(ctx.timings, "generator_train_s"):
                    if privacy is not None and fc.use_generator:
                        targets = torch.from_numpy(clients[0].global_memory.patches)
                        loss = []
                        for cl in clients:
                            loss.append(cl.train_towards_dp(targets, privacy.z, pv.sgd_clip, pv.sgd_batch_images))
                            privacy.record_sgd(cl.cid)
                    else:
                        loss = [cl.train_generator() for cl in clients]
                per_round[-1]["loss"] = float(np.mean(loss))
            with timed(ctx.timings, "memory_rebuild_s"):
                contribs = [cl.rebuild() for cl in clients]
            last = r == fc.rounds - 1
            if ctx.leakage is not None and last:  # what the adversaries see in the final round
                ctx.leakage.arm(clients, contribs, privacy.z if privacy is not None else None)
            with timed(ctx.timings, "aggregation_s"):
                agg = aggregate(contribs)
            summary = _record(ctx, agg, up, down)
            if privacy is not None:
                summary["epsilon"] = privacy.end_round(ctx.out)
                if ctx.ledgers is not None:
                    ctx.ledgers.privacy(r + 1, privacy.per_round[-1], privacy.z, pv.delta)
            for cl in clients:
                cl.receive(agg.memory)
            if fc.global_near is not None:
                summary["global_items_used"] = float(np.mean([cl.global_used for cl in clients]))
            with timed(ctx.timings, "score_s"):
                scores = [cl.score(ctx.test_emb.subset(c.test_index), fc.score_with, cfg.scoring.image_k, cfg.scoring.reweight_k)
                          for cl, c in zip(clients, ctx.clients)]
            per_round.append({"round": r + 1, **_round_metrics(ctx, scores), **summary})
            eps = f", eps {summary['epsilon']:.2f}" if privacy is not None else ""
            advance(1, description=f"{label[:-1]}{eps})" if eps else None)
    if not per_round:
        raise UserError(message)
    if ctx.out is not None:
        save_global_memory(clients[0].global_memory, ctx.out / GLOBAL_MEMORY_FILE)
    _collect_timings(ctx, clients)
    init = "dp-random-partition" if privacy is not None else cfg.kmeans_init
    return MethodOutput(scores, up, down, len(per_round), cfg.protocol, [len(cl.bank) for cl in clients], per_round,
                        aggregation_summary(cfg, init, pv.noise if privacy is not None else None),
                        privacy.summary() if privacy is not None else None)


def run_param_sharing(ctx: MethodContext, mu: float, name: str, personalize: bool = False) -> MethodOutput:
    """FedAvg (mu = 0) / FedProx (mu > 0) of the generator, with Weight Scope Alignment when
    ``fl.wsa_weight > 0``; scoring with each client's own bank. ``personalize``: FedSM on top
    (personalized generators by SoftPull and a federated model selector, ``fedsecmem.baselines.fedsm``)."""
    cfg, fc = ctx.cfg, ctx.cfg.feddymem
    clients = _make_clients(ctx, True)
    ss = _tapped(ctx, secure_sum_for(cfg, plain_wire="float32"))
    global_state = copy.deepcopy(clients[0].generator.state_dict())
    weights = [len(c.train_index) for c in ctx.clients]
    fedsm = FedSM(ctx, _make_clients(ctx, True), ss, weights) if personalize else None
    wsa = cfg.fl.wsa_weight  # config validation: 0 unless fedavg / fedprox
    up = [[] for _ in clients]
    down = [[] for _ in clients]
    per_round, scores = [], []
    scope = None  # WSA's target: the fused scope of the last round's client models
    with timed(ctx.timings, "memory_rebuild_s"):
        for cl in clients:  # every client starts from the same generator
            cl.start_from(global_state)
            cl.rebuild_bank()
        if fedsm is not None:
            fedsm.start(global_state)
    with task(ctx.progress, f"{name} rounds ({cfg.protocol})", fc.rounds) as advance:
        for r in range(fc.rounds):
            _begin_round(ctx, r + 1)
            with timed(ctx.timings, "generator_train_s"):
                for cl in clients:
                    # no global memory in parameter sharing: the loss pulls towards the client's own bank
                    cl.train_towards(torch.from_numpy(cl.bank.items), prox_mu=mu,
                                     wsa=(wsa, scope) if scope is not None else None)
            with timed(ctx.timings, "aggregation_s"):
                states = [cl.generator.state_dict() for cl in clients]
                if wsa > 0:  # the layers' scopes travel with the models, through the same secure sum
                    global_state, agg = average_states([with_scope(s) for s in states], weights, ss)
                    global_state, scope = split_scope(global_state)
                else:
                    global_state, agg = average_states(states, weights, ss)
            summary = _record(ctx, agg, up, down)
            with timed(ctx.timings, "memory_rebuild_s"):
                for cl in clients:  # the bank in the new global space serves scoring and the next round
                    cl.generator.load_state_dict(global_state)
                    cl.rebuild_bank()
            if fedsm is not None:
                with timed(ctx.timings, "personalize_s"):
                    sel = fedsm.round(global_state)
                for i in range(len(clients)):  # the selector's parameters travel too
                    up[i][-1] += sel.bytes_up[i]
                    down[i][-1] += sel.bytes_down[i]
            with timed(ctx.timings, "score_s"):
                scores = [cl.score(ctx.test_emb.subset(c.test_index), "local", cfg.scoring.image_k, cfg.scoring.reweight_k)
                          for cl, c in zip(clients, ctx.clients)]
                if fedsm is not None:
                    scores, summary["selector_accuracy"] = fedsm.score(scores)
            per_round.append({"round": r + 1, **_round_metrics(ctx, scores), **summary,
                              "loss": float(np.mean([cl.losses[-1] for cl in clients]))})
            advance(1)
    _collect_timings(ctx, clients)
    return MethodOutput(scores, up, down, fc.rounds, cfg.protocol, [len(cl.bank) for cl in clients], per_round,
                        {**aggregation_summary(cfg, None), "wsa_weight": wsa,
                         **({"softpull": cfg.fl.softpull} if personalize else {})})


def run_fedavg(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, 0.0, "fedavg")


def run_fedprox(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, ctx.cfg.feddymem.prox_mu, "fedprox")


def run_fedsm(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, 0.0, "fedsm", personalize=True)


FEDERATED_METHODS = {"feddymem": run_feddymem, "fedavg": run_fedavg, "fedprox": run_fedprox, "fedsm": run_fedsm}
