"""What crossed the wire, all of it: a release inventory built from the server's signed ledger.

Every message a ledger records has a stage (the SecAgg+ stage of a simulated sum, the coordinator's
task or reply kind when deployed). ``STAGES`` says, once, what each stage carries, whether it is
derived from the clients' images, whether differential privacy covers it, and who sees it; the
inventory counts the ledger's messages and bytes per stage and direction. A stage the ledger holds
and ``STAGES`` does not describe is listed as such (never silently dropped).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

__all__ = ["STAGES", "Stage", "TO_CLIENTS", "inventory"]


@dataclass(frozen=True)
class Stage:
    carries: str
    from_images: bool  # derived from the clients' images (else: keys, control, or post-processing)
    dp: str  # "yes", "no", "n/a" (not derived from images) or "post-processing"
    seen_by: str


_MASKED = Stage("the client's k-means statistics (per-cell weighted sums), noised when DP is on, then masked "
                "by pairwise and self masks", True, "yes", "the server, only as the sum of at least t uploads")
_CLEAR = Stage("the client's k-means statistics (per-cell weighted sums) without masks, noised when DP is on",
               True, "yes", "the server, each upload")
_KEYS = Stage("X25519 public keys, a share-signing key, their Ed25519 signature and a commitment to the self-mask "
              "seed", False, "n/a",
              "the server and the client's neighbours")
_SHARES = Stage("Shamir shares of the client's mask keys, each signed by it, encrypted to each neighbour (AES-GCM)",
                False, "n/a",
                "only the addressed neighbour can decrypt")
_UNMASK = Stage("signed shares that remove dropped clients' pairwise masks and survivors' self masks", False, "n/a",
                "the server")
_REQUEST = Stage("the server's k-means request: cluster centres or a partition, computed from earlier releases",
                 False, "post-processing", "the addressed clients")

STAGES: dict[str, Stage] = {
    # a simulated sum's stages (protocols.secure_sum) ...
    "setup": Stage("the SecAgg+ session: neighbours and threshold", False, "n/a", "the addressed clients"),
    "advertise": _KEYS, "share": _SHARES, "mask": _MASKED, "unmask": _UNMASK, "plain": _CLEAR,
    "ckks": Stage("the client's k-means statistics encrypted under CKKS, noised when DP is on", True, "yes",
                  "the server sees ciphertexts; the key holder can decrypt"),
    # ... and a deployment's task and reply kinds (deployment.serve, protocols.network_sum)
    "hello": Stage("a registration: training and test image counts, per-category image counts, DP-SGD rate "
                   "and steps", True, "no", "the server"),
    "round": Stage("the round's task: round number, noise multiplier, the global memory", False, "post-processing",
                   "the addressed clients"),
    "ready": Stage("trained or not; how many prototypes and image embeddings it holds (which tells its image "
                   "count); the mean training loss (only without DP)", True, "no", "the server"),
    "compute": _REQUEST, "advertise_keys": _KEYS, "shares": _SHARES, "secagg_keys": _KEYS,
    "secagg_relay": _SHARES, "masked": _MASKED, "secagg_unmask": _UNMASK, "vector": _CLEAR,
    "memory": Stage("the final global memory", False, "post-processing", "every client"),
    "scores": Stage("the client's test metrics (only without DP; 'withheld' under DP)", True,
                    "no (withheld under DP)", "the server"),
    "finish": Stage("the end of the run", False, "n/a", "every client"),
    "bye": Stage("acknowledgement", False, "n/a", "the server"),
    "refused": Stage("a client's refusal with its reason (e.g. its own budget)", False, "n/a", "the server"),
}


# a simulated SecAgg+ sum records the server's answer to a stage under that stage's name
TO_CLIENTS: dict[str, Stage] = {
    "advertise": Stage("the neighbours' advertised keys, signatures and seed commitments, relayed", False, "n/a",
                       "the addressed clients"),
    "share": Stage("the encrypted key shares addressed to this client, relayed", False, "n/a",
                   "only the addressed client can decrypt"),
    "mask": Stage("which clients' masked inputs arrived: the request for unmasking shares", False, "n/a",
                  "the addressed clients"),
}


def _stage(name: str, to_clients: bool) -> Stage | None:
    if name.startswith("request:"):
        return _REQUEST
    if to_clients and name in TO_CLIENTS:
        return TO_CLIENTS[name]
    return STAGES.get(name)


def inventory(server_events: list[dict], dp: bool) -> list[dict]:
    """One row per (stage, direction) of the server's ledger messages: counts, bytes, and what the
    stage is (``STAGES``). ``dp``: whether the run was private (without it nothing is covered)."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for e in server_events:
        if e.get("event") != "message":
            continue
        key = (str(e.get("stage")), "to clients" if e.get("dir") == "sent" else "from clients")
        counts[key][0] += 1
        counts[key][1] += int(e.get("bytes") or 0)
    rows = []
    for (name, direction), (n, size) in sorted(counts.items()):
        st = _stage(name, direction == "to clients")
        rows.append({"stage": name, "direction": direction, "messages": n, "bytes": size,
                     "carries": st.carries if st else "undescribed stage",
                     "from_images": st.from_images if st else None,
                     "dp": ("unknown" if st is None else st.dp if dp or st.dp == "n/a" else "no (DP off)"),
                     "seen_by": st.seen_by if st else "unknown"})
    return rows
