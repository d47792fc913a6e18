"""What each party of a run could see, in plain words: stated in the ledgers' ``run_start``, the
run summary and the privacy report (docs/secure_aggregation.md has the full table)."""

from __future__ import annotations

from fedsecmem.methods import METHODS
from fedsecmem.privacy.budget import min_survivors, secagg_threshold

__all__ = ["server_view", "threat_model"]

# What the server saw, in plain words (run summary; docs/secure_aggregation.md has the full table)
_PROTOCOL_VIEW = {
    "plain": "each client's {what}",
    "secagg": "only {what} summed over all clients (SecAgg+)",
    "ckks": "only ciphertexts of {what} (CKKS)",
}


def server_view(aggregation: dict) -> str:
    """One sentence: what the aggregator could see in a run with this ``aggregation`` record."""
    protocol, init, noise = aggregation["protocol"], aggregation.get("kmeans_init"), aggregation.get("dp_noise")
    if init == "kmeans++":
        return "the server saw every client's reduced memory"
    what = {"pca-partition": "per-cluster sums", None: "model updates"}.get(init, "per-cluster sums")
    if noise == "central":
        return f"the server saw {_PROTOCOL_VIEW[protocol].format(what=what)} and added the DP noise itself (trusted)"
    if noise is not None:
        what = f"noisy {what} ({noise} DP noise)"
    return f"the server saw {_PROTOCOL_VIEW[protocol].format(what=what)}"


def threat_model(cfg) -> dict:
    """Who could see what in a run of ``cfg``, in plain words (ledgers' run_start, privacy report)."""
    n, protocol = cfg.clients.n, cfg.protocol
    method = METHODS[cfg.method]
    if not method.federated:
        what = method.unaggregated
        return {"protocol": "none", "server_sees": what, "coalition_sees": what, "dp": "off"}
    if method.memory_sharing:
        agg = {"protocol": protocol, "kmeans_init": cfg.global_seeding, "dp_noise": cfg.privacy.noise if cfg.privacy.dp else None}
    else:
        agg = {"protocol": protocol, "kmeans_init": None}
    out = {"protocol": protocol, "server_sees": server_view(agg)}
    if protocol == "plain":
        out["coalition_sees"] = "everything the server sees: every client's contribution in the clear"
    elif protocol == "secagg":
        t = secagg_threshold(cfg)
        out["threshold"] = t
        out["coalition_sees"] = (f"the server with up to {t - 1} clients (t = {t} of {n}) learns only the sum "
                                 "of the honest clients' inputs")
    else:
        out["coalition_sees"] = ("any one client holds the CKKS secret key: the server with one client could "
                                 "decrypt every input it received")
    pv = cfg.privacy
    if pv.dp and method.dp:
        out["dp"] = f"(epsilon, delta) per client for one training {pv.unit}, {pv.noise} Gaussian noise"
        if pv.noise == "distributed" and protocol == "secagg":
            m = min_survivors(cfg)
            t = out["threshold"]
            # each client adds s^2/(m-1); its own config makes it refuse a sum of fewer than max(t, m)
            # (t only on a sparse graph, where it sees its neighbourhood alone), and a coalition of
            # t-1 subtracts its own shares: what is left in the worst case (audits.adversaries)
            a = cfg.secure.secagg
            fewest = t if a.neighbours is not None and a.neighbours < n - 1 else max(t, m)
            left = (fewest - t + 1) / (m - 1)
            out["noise_left_with_coalition"] = left
            out["coalition_sees"] += (f"; in the worst case (a sum of {fewest} uploads, the fewest every client "
                                      f"accepts) that sum still carries {left:.2f}x the calibrated noise variance")
    else:
        out["dp"] = "off"
    return out
