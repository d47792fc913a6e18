"""Epsilon per adversary: the same signed history, re-composed with the noise each adversary faces.

A client's history (``PrivacyAccountant.compact``: [z, rate, count] per step) mixes two kinds of
Gaussian mechanism: DP-SGD steps (rate < 1), whose noise the client adds to its own gradients and no
one else sees, and releases (rate 1), whose noise is shared out as the run's ``noise`` placement says
(``protocols.dp_release``). Who can remove some of a release's noise, and how much:

- ``distributed``: each of the s >= m contributors (m = ``min_survivors``) adds variance z^2/(m - 1)
  (sensitivity units); whoever knows c of the shares (colluding clients know their own) is left with
  (s - c)/(m - 1). The worst case a protocol allows is s = m. Seeing one contribution alone (plain
  protocol, or CKKS once a client has decrypted it) leaves 1/(m - 1).
- ``local``: each contribution carries z^2 by itself: nobody removes any.
- ``central``: the server adds z^2 to the clean sum itself: the server sees the sum without noise.

An adversary's epsilon is the history with each release's z replaced by the z it faces (DP-SGD steps
unchanged); facing no noise at all is epsilon infinite: what the released statistics reveal is then
bounded by nothing. Everything here is post-processing of signed figures: no data is needed.
"""

from __future__ import annotations

import math

from fedsecmem.audits.accountant import RELEASE, Step, epsilon_of, step_of

__all__ = ["adversaries", "in_words", "odds_factor"]


def _faced(z: float, share_left: float) -> float:
    """The noise multiplier left when ``share_left`` of the calibrated variance z^2 remains."""
    return z * math.sqrt(share_left) if share_left > 0 else 0.0


def _epsilon(history: list[list], share_left: float | None, delta: float, kind: str) -> float:
    """Epsilon of ``history`` when releases carry ``share_left`` x z^2 (None: as calibrated)."""
    steps = []
    for entry in history:
        s = step_of(entry)
        if s.kind == RELEASE and share_left is not None:  # DP-SGD noise stays with the client
            s = Step(_faced(s.noise_multiplier, share_left), s.sample_rate, s.count, s.kind)
        steps.append(s)
    return epsilon_of(steps, delta, kind)


def odds_factor(epsilon: float | None) -> float | None:
    """e^epsilon: how much any attacker's odds on "this image was used" can grow (None: unbounded)."""
    if epsilon is None or math.isinf(epsilon) or epsilon > 700:
        return None
    return math.exp(epsilon)


def in_words(epsilon: float | None, delta: float, unit: str = "image") -> str:
    """What (epsilon, delta) allows, in one plain sentence."""
    if epsilon is None or math.isinf(epsilon):
        return (f"no guarantee: this adversary can see released statistics without noise, so a {unit} "
                "may be recognisable from them")
    factor = math.exp(epsilon)
    strength = ("strong" if epsilon <= 1 else "moderate" if epsilon <= 4 else "weak" if epsilon <= 10
                else "nominal")
    return (f"{strength}: whatever the adversary knew before, seeing the results can raise its odds that a "
            f"given {unit} was used at most {factor:,.1f}-fold, up to a small slack of probability {delta:g} "
            "where the bound may fail")


def adversaries(histories: dict[str, list[list]], *, protocol: str, noise: str, min_survivors: int,
                threshold: int | None, clients: int, delta: float, kind: str,
                neighbours: int | None = None, unit: str = "image") -> list[dict]:
    """One row per adversary: who, how much of the calibrated release noise it faces (worst case the
    protocol allows), the largest epsilon over clients, and what the protocol assumes.

    Every figure is what the clients enforce from their own configuration, so it holds against a
    server that deviates from the protocol too: a SecAgg+ client refuses another protocol, a threshold
    below t, another graph degree, and a sum over fewer than max(t, m) participants (m =
    ``min_survivors``); on the complete graph it sees every survivor and refuses to unmask fewer. On a
    sparse graph a client sees only its neighbourhood, so only t holds there: a sum of t. Hence, with
    distributed noise and s the fewest uploads a sum can have (max(t, m), or t on a sparse graph):
    the server alone faces s/(m - 1), the server with t - 1 colluders (s - t + 1)/(m - 1); a client,
    or anyone shown the global memory, faces (s - 1)/(m - 1) >= 1 for the s >= m sums released."""
    m = max(int(min_survivors), 2)
    t = max(int(threshold or 2), 2)
    sparse = protocol == "secagg" and neighbours is not None and neighbours < clients - 1
    fewest = t if sparse else max(t, m)
    if protocol == "secagg":
        colluders = t - 1
        assumes_alone = (f"every client refuses a sum of fewer than {fewest} uploads, another protocol, a lower "
                         "threshold or another graph: holds whether or not the server follows the protocol")
        assumes_coalition = (f"fewer than t = {t} collude (t - 1 can remove their own shares of a sum of {fewest}); "
                             "more would break SecAgg+ itself")
    elif protocol == "ckks":
        colluders = 1
        assumes_alone = ("the server follows the protocol and has only sums of at least m uploads decrypted "
                         "(a server that has one upload decrypted faces that upload's share alone)")
        assumes_coalition = "one client holds the CKKS secret key: the server with it decrypts each upload"
    else:
        colluders = clients - 1
        assumes_alone = "the plain protocol: the server sees each client's upload"
        assumes_coalition = "the server already sees each upload"
    if noise == "distributed":
        alone = {"secagg": fewest / (m - 1), "ckks": m / (m - 1)}.get(protocol, 1 / (m - 1))
        with_clients = (fewest - t + 1) / (m - 1) if protocol == "secagg" else 1 / (m - 1)
        memory = 1.0
    elif noise == "local":
        alone = with_clients = memory = 1.0
    else:  # central: the server adds the noise to a clean sum
        alone = with_clients = 0.0
        memory = 1.0
    if not histories:
        raise ValueError("no client history to compose")

    def worst(share: float | None) -> float | None:
        eps = max(_epsilon(h, share, delta, kind) for h in histories.values())
        return None if math.isinf(eps) else eps

    rows = [
        {"adversary": "the server alone", "assumes": assumes_alone, "noise_share": alone, "epsilon": worst(alone)},
        {"adversary": f"the server with up to {colluders} colluding client{'' if colluders == 1 else 's'}",
         "assumes": assumes_coalition, "noise_share": with_clients, "epsilon": worst(with_clients)},
        {"adversary": "anyone who sees the global memory (a client, or an outsider it is shown to)",
         "assumes": "post-processing of the released sums; a client knows its own noise share",
         "noise_share": memory, "epsilon": worst(memory)},
    ]
    if sparse:
        rows[1]["assumes"] += (f"; sparse graph of degree {neighbours}: holds only within Bell et al.'s bounds "
                               "the config was checked against (a failure probability, not zero), and only if "
                               "the server draws the graph at random (a client checks its degree, not the draw)")
    for row in rows:
        row["odds_factor"] = odds_factor(row["epsilon"])
        row["in_words"] = in_words(row["epsilon"], delta, unit)
    return rows
