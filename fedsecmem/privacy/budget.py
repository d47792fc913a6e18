"""A run's differential privacy: noise multiplier, per-client accountant, budget, results.

What is private and why (details in docs/privacy.md): each round releases the
private k-means' per-cell sums (``protocols.dp_release``: sensitivity sqrt(2)
per image) and, from the second round on, uses a generator trained by DP-SGD
with one image as the unit (``FedDyMemClient.train_towards_dp``). Both are
Gaussian mechanisms; every client's accountant composes its own DP-SGD steps
(its Poisson rate) and every release its data was in (rate 1).

A round is checked against ``epsilon_budget`` before its DP-SGD steps run and
before anything is released; if any client would go past the budget, the run
stops there and says who and by how much. Every DP-SGD round and every release
is recorded the moment it happens (an aborted round is still charged), and the
state is saved after every round and when a run fails.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from fedsecmem.audits.accountant import SGD, PrivacyAccountant, Step, calibrate
from fedsecmem.protocols.dp_release import SENSITIVITY, NoisySum
from fedsecmem.protocols.secagg import default_threshold
from fedsecmem.protocols.secure_kmeans import dp_kmeans_releases
from fedsecmem.protocols.secure_sum import SecureSum

__all__ = [
    "CLIENT_STATE_FILE", "ClientBudget", "RunPrivacy", "STATE_FILE", "min_survivors", "noise_floor", "releases_per_round",
    "run_plan", "secagg_threshold",
]

STATE_FILE = "privacy_state.json"
CLIENT_STATE_FILE = "privacy_state-client-{cid}.json"  # a client's own accountant, in its own folder


def secagg_threshold(cfg) -> int:
    """The SecAgg+ threshold t of a run of ``clients.n`` clients (configured, or the default majority)."""
    a, n = cfg.secure.secagg, cfg.clients.n
    return a.threshold or default_threshold(n - 1 if a.neighbours is None else min(a.neighbours, n - 1))


def min_survivors(cfg) -> int:
    """How many contributions distributed noise counts on (the sum is refused with fewer)."""
    pv, n = cfg.privacy, cfg.clients.n
    if pv.noise != "distributed":
        return 1
    if pv.min_survivors is not None:
        return pv.min_survivors
    if cfg.protocol == "secagg":
        return secagg_threshold(cfg)
    return n // 2 + 1


def releases_per_round(cfg) -> int:
    """Gaussian releases a private round makes at most: one private k-means of the patches, and one
    of the image embeddings when they are shared."""
    return dp_kmeans_releases(cfg.privacy.kmeans_iters) * (2 if cfg.feddymem.share_images else 1)


def run_plan(cfg, sgd_plan: tuple[float, int]) -> list[tuple[float, int]]:
    """A client's whole run as (sampling rate, steps): every release at rate 1, and its DP-SGD steps
    (every round but the first) at its Poisson rate."""
    q, steps = sgd_plan
    rounds = cfg.feddymem.rounds
    return [(1.0, releases_per_round(cfg) * rounds), (q, steps * (rounds - 1))]


def noise_floor(cfg, sgd_plan: tuple[float, int]) -> float:
    """The least noise multiplier a client with this DP-SGD plan accepts: what its own target
    epsilon needs over the whole run (or the configured ``noise_multiplier``). A client checks the
    server's request against it; the server's choice is the largest over its clients."""
    pv = cfg.privacy
    if pv.epsilon is None:
        return pv.noise_multiplier
    return _calibrated(pv.epsilon, pv.delta, tuple(run_plan(cfg, sgd_plan)), pv.accountant)


@functools.lru_cache(maxsize=256)
def _calibrated(epsilon: float, delta: float, plan: tuple[tuple[float, int], ...], kind: str) -> float:
    """``calibrate`` once per plan: the server and each in-process client ask for the same floors."""
    return calibrate(epsilon, delta, list(plan), kind)


class RunPrivacy:
    def __init__(self, cfg, sgd_plans: dict[int, tuple[float, int]], secure_sum: SecureSum, out: Path | None = None):
        """``sgd_plans``: client -> (Poisson rate, DP-SGD steps per round). ``out``: where the state is
        written, after every charge (write-ahead: before what is charged runs or leaves)."""
        self.cfg, self.out = cfg, None if out is None else Path(out)
        pv = cfg.privacy
        self.releases_per_round = releases_per_round(cfg)
        self.sgd_plans = sgd_plans
        # the strictest client (smallest data: highest DP-SGD sampling rate) sets the noise
        self.z = max(noise_floor(cfg, plan) for plan in sgd_plans.values())
        self.accountant = PrivacyAccountant(sgd_plans, pv.delta, pv.accountant)
        self.noisy = NoisySum(secure_sum, self.z, pv.noise, min_survivors(cfg), cfg.secure.secagg.frac_bits,
                              on_release=self.record_release)
        self.per_round: list[dict[int, float]] = []
        self.stopped: dict | None = None

    def round_steps(self, cid: int, first: bool) -> list[Step]:
        """What one round costs a client: its DP-SGD steps (not before the first round) and the releases."""
        q, steps = self.sgd_plans[cid]
        out = [] if first else [Step(self.z, q, steps, SGD)]
        return out + [Step(self.z, 1.0, self.releases_per_round)]

    def refuse(self, round_number: int) -> str | None:
        """A message if the round would take any client past the budget (nothing recorded)."""
        budget = self.cfg.privacy.epsilon_budget
        if budget is None:
            return None
        for cid in self.sgd_plans:
            after = self.accountant.would_spend(cid, self.round_steps(cid, round_number == 1))
            if after > budget:
                spent = self.accountant.epsilon(cid)
                self.stopped = {"round": round_number, "client": cid, "epsilon_spent": spent,
                                "epsilon_after_round": after, "budget": budget}
                return (f"privacy budget: round {round_number} would take client {cid} to epsilon {after:.2f} "
                        f"> budget {budget:g} (spent {spent:.2f}, {budget - spent:.2f} left); "
                        f"stopped after round {round_number - 1}")
        return None

    def record_release(self, clients) -> None:
        """One Gaussian release (sampling rate 1) for every client whose data may be in it, recorded
        and saved before the release is computed."""
        for cid in clients:
            self.accountant.record(cid, [Step(self.z, 1.0, 1)])
        self.save(self.out)

    def record_sgd(self, clients) -> None:
        """One round of DP-SGD of each of ``clients``, recorded and saved before they are asked to train."""
        for cid in clients:
            q, steps = self.sgd_plans[cid]
            if steps > 0:
                self.accountant.record(cid, [Step(self.z, q, steps, SGD)])
        self.save(self.out)

    def save(self, out: Path | None) -> None:
        if out is not None:
            self.accountant.save(Path(out) / STATE_FILE)

    def end_round(self, out: Path | None) -> float:
        """Epsilon of every client after the round, state saved; returns the max."""
        eps = {cid: self.accountant.epsilon(cid) for cid in self.sgd_plans}
        self.per_round.append(eps)
        self.save(out)
        return max(eps.values())

    def plan(self) -> dict:
        """What the run's noise is and what it was calibrated for (signed in the ledgers)."""
        pv = self.cfg.privacy
        return {"noise_multiplier": self.z, "delta": pv.delta, "accountant": pv.accountant,
                "epsilon_target": pv.epsilon, "epsilon_budget": pv.epsilon_budget, "noise": pv.noise,
                "min_survivors": self.noisy.min_survivors, "sensitivity": SENSITIVITY,
                "releases_per_round": self.releases_per_round, "rounds": self.cfg.feddymem.rounds,
                "unit": pv.unit,
                "dp_sgd": {str(c): {"sample_rate": q, "steps_per_round": s} for c, (q, s) in self.sgd_plans.items()}}

    def state_dict(self) -> dict:
        """What a resumed run needs to go on with the same noise and the budget already spent (as
        Opacus' accountants' ``state_dict``): JSON-able."""
        return {"z": self.z, "per_round": [{str(c): e for c, e in r.items()} for r in self.per_round],
                "accountant": self.accountant.to_json()}

    def load_state_dict(self, state: dict) -> None:
        self.z = self.noisy.z = float(state["z"])
        self.per_round = [{int(c): e for c, e in r.items()} for r in state["per_round"]]
        self.accountant = PrivacyAccountant.from_json(state["accountant"])

    def summary(self) -> dict:
        pv = self.cfg.privacy
        last = self.per_round[-1] if self.per_round else {c: 0.0 for c in self.sgd_plans}
        worst = max(last.values())
        finite = worst != float("inf")
        return {
            "dp": True, "delta": pv.delta,
            "epsilon": worst if finite else None,
            "epsilon_infinite": not finite,
            "per_client": [last[c] if last[c] != float("inf") else None for c in sorted(last)],
            "per_client_per_round": [[e[c] if e[c] != float("inf") else None for c in sorted(e)]
                                     for e in self.per_round],
            "noise_multiplier": self.z, "target_epsilon": pv.epsilon, "epsilon_budget": pv.epsilon_budget,
            "accountant": pv.accountant, "noise": pv.noise, "min_survivors": self.noisy.min_survivors,
            "sensitivity": SENSITIVITY, "clip_norm": pv.clip_norm, "image_clip_norm": pv.image_clip_norm,
            "releases_per_round": self.releases_per_round,
            "dp_sgd": {"clip": pv.sgd_clip, "batch_images": pv.sgd_batch_images,
                       "per_client": {str(c): {"sample_rate": q, "steps_per_round": s}
                                      for c, (q, s) in self.sgd_plans.items()}},
            "stopped": self.stopped, "state_file": STATE_FILE,
        }


class ClientBudget:
    """A client's own accountant: it charges every DP-SGD round and every release it makes itself,
    before it runs or leaves (saved first), and refuses a round that would take it past its own
    ``privacy.epsilon_budget``, whatever the server's arithmetic says."""

    def __init__(self, cfg, cid: int, sgd_plan: tuple[float, int], out: Path | None = None,
                 run_id: str | None = None):
        pv = cfg.privacy
        self.cfg, self.cid, self.plan, self.run_id = cfg, cid, sgd_plan, run_id
        self.path = None if out is None else Path(out) / CLIENT_STATE_FILE.format(cid=cid)
        self.accountant = PrivacyAccountant([cid], pv.delta, pv.accountant)
        if self.path is not None and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("run_id") == run_id:  # a restarted client of the same run keeps what it spent
                self.accountant = PrivacyAccountant.from_json(saved["accountant"])

    def training(self, z: float) -> list[Step]:
        q, steps = self.plan
        return [Step(z, q, steps, SGD)] if steps > 0 else []

    def releases(self, z: float) -> list[Step]:
        return [Step(z, 1.0, releases_per_round(self.cfg))]

    def refuse(self, steps: list[Step]) -> str | None:
        """Why this client will not spend ``steps`` (its own budget), or None."""
        budget = self.cfg.privacy.epsilon_budget
        if budget is None:
            return None
        after = self.accountant.would_spend(self.cid, steps)
        if after > budget:
            return (f"client {self.cid}: the round would take it to epsilon {after:.2f} > its own budget "
                    f"{budget:g} (spent {self.epsilon():.2f}); refused")
        return None

    def charge(self, steps: list[Step]) -> None:
        self.accountant.record(self.cid, steps)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"run_id": self.run_id, "accountant": self.accountant.to_json()}))
            tmp.replace(self.path)  # written before what it charges runs or leaves

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.cid)
