"""Parameter sharing of the memory generator, the federated baselines FedDyMem is measured
against: FedAvg (mu = 0), FedProx (mu > 0), either with Weight Scope Alignment
(``fl.wsa_weight > 0``), and FedSM (personalized generators and a federated model selector).
Each client scores with its own bank in the shared generator's space; the model average goes
through the configured secure sum."""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedsecmem.baselines.fedsm import FedSM
from fedsecmem.baselines.wsa import ScopeTerm, split_scope, with_scope
from fedsecmem.method.client import LossTerm
from fedsecmem.method.aggregation import aggregation_summary, average_states, secure_sum_for
from fedsecmem.method.context import MethodContext, MethodOutput, timed
from fedsecmem.method.simulate import collect_timings, make_clients, record_bytes, round_metrics, tapped
from fedsecmem.progress import task

__all__ = ["ProxTerm", "run_fedavg", "run_fedprox", "run_fedsm", "run_param_sharing"]


class ProxTerm(LossTerm):
    """FedProx' proximal term ``mu / 2 * ||w - w_start||^2`` (``w_start``: the weights local
    training starts from)."""

    def __init__(self, mu: float):
        self.mu = mu
        self.anchor: dict[str, torch.Tensor] = {}

    def start(self, generator: torch.nn.Module) -> None:
        self.anchor = {n: p.detach().clone() for n, p in generator.named_parameters()}

    def penalty(self, generator: torch.nn.Module) -> torch.Tensor:
        return 0.5 * self.mu * sum(((p - self.anchor[n]) ** 2).sum() for n, p in generator.named_parameters())


def run_param_sharing(ctx: MethodContext, mu: float, name: str, personalize: bool = False) -> MethodOutput:
    """FedAvg (mu = 0) / FedProx (mu > 0) of the generator, with Weight Scope Alignment when
    ``fl.wsa_weight > 0``; scoring with each client's own bank. ``personalize``: FedSM on top
    (personalized generators by SoftPull and a federated model selector, ``fedsecmem.baselines.fedsm``)."""
    cfg, fc = ctx.cfg, ctx.cfg.feddymem
    clients = make_clients(ctx, True)
    ss = tapped(ctx, secure_sum_for(cfg, plain_wire="float32"))
    global_state = copy.deepcopy(clients[0].generator.state_dict())
    weights = [len(c.train_index) for c in ctx.clients]
    fedsm = FedSM(ctx, make_clients(ctx, True), ss, weights) if personalize else None
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
            if ctx.ledgers is not None:
                ctx.ledgers.begin_round(r + 1)
            with timed(ctx.timings, "generator_train_s"):
                for cl in clients:
                    # no global memory in parameter sharing: the loss pulls towards the client's own bank
                    terms = ([ProxTerm(mu)] if mu > 0 else []) + ([ScopeTerm(wsa, scope)] if scope is not None else [])
                    cl.train_towards(torch.from_numpy(cl.bank.items), terms)
            with timed(ctx.timings, "aggregation_s"):
                states = [cl.generator.state_dict() for cl in clients]
                if wsa > 0:  # the layers' scopes travel with the models, through the same secure sum
                    global_state, agg = average_states([with_scope(s) for s in states], weights, ss)
                    global_state, scope = split_scope(global_state)
                else:
                    global_state, agg = average_states(states, weights, ss)
            summary = record_bytes(ctx, agg, up, down)
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
            per_round.append({"round": r + 1, **round_metrics(ctx, scores), **summary,
                              "loss": float(np.mean([cl.losses[-1] for cl in clients]))})
            advance(1)
    collect_timings(ctx, clients)
    return MethodOutput(scores=scores, bytes_up=up, bytes_down=down, rounds=fc.rounds, protocol=cfg.protocol,
                        bank_sizes=[len(cl.bank) for cl in clients], per_round=per_round,
                        # FedSM's selector picks a personalized generator per image; a saved model keeps the
                        # global generator and the site's bank (docs/predict.md)
                        detectors=[cl.detector("local", cfg.scoring.image_k, cfg.scoring.reweight_k) for cl in clients],
                        detectors_scored=fedsm is None,
                        aggregation={**aggregation_summary(cfg, None), "wsa_weight": wsa,
                                     **({"softpull": cfg.fl.softpull} if personalize else {})})


def run_fedavg(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, 0.0, "fedavg")


def run_fedprox(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, ctx.cfg.feddymem.prox_mu, "fedprox")


def run_fedsm(ctx: MethodContext) -> MethodOutput:
    return run_param_sharing(ctx, 0.0, "fedsm", personalize=True)

