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
import math
from pathlib import Path

from fedsecmem.audits.accountant import SGD, PrivacyAccountant, Step, calibrate, epsilon_of, read_json_strict
from fedsecmem.protocols.dp_release import SENSITIVITY, NoisySum
from fedsecmem.protocols.secagg import default_threshold
from fedsecmem.protocols.secure_kmeans import dp_kmeans_releases
from fedsecmem.protocols.secure_sum import SecureSum

__all__ = [
    "CLIENT_STATE_FILE", "ClientBudget", "RunPrivacy", "STATE_FILE", "epsilon_limit", "min_survivors", "noise_floor",
    "read_client_state", "releases_per_round", "run_plan", "secagg_threshold", "sgd_plan",
]

STATE_FILE = "privacy_state.json"
CLIENT_STATE_FILE = "privacy_state-client-{cid}.json"  # a client's own accountant, in its own folder
CLIENT_STATE_FORMAT = 2  # every run of the site's data (format 1 held one run)
LIMIT_SLACK = 1e-9  # relative: the plan calibrated to the target spends it exactly, up to rounding


def epsilon_limit(cfg) -> float | None:
    """The most a client may spend: ``privacy.epsilon_budget``, else the target ``privacy.epsilon`` the
    noise was calibrated to (None: neither). Every client enforces it itself, and the server stops a
    run before a round that would pass it; a run that must survive a re-run round (a crash mid-round,
    a round retried without a cheater) needs a budget above the target."""
    pv = cfg.privacy
    return pv.epsilon_budget if pv.epsilon_budget is not None else pv.epsilon


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


def sgd_plan(cfg) -> tuple[float, int]:
    """A client's DP-SGD plan of one round, (Poisson rate, steps): from the configuration alone, the
    same at every site, so the rate the accountant is given (and the report shows) says nothing of
    how many images a site holds (``privacy.sgd_sample_rate``; ``local_epochs`` / rate steps)."""
    pv, fc = cfg.privacy, cfg.feddymem
    epochs = fc.local_epochs if fc.use_generator else 0
    q = float(pv.sgd_sample_rate)
    return q, epochs * max(1, math.ceil(1 / q)) if epochs > 0 else 0


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
        budget = epsilon_limit(self.cfg)
        if budget is None:
            return None
        for cid in self.sgd_plans:
            after = self.accountant.would_spend(cid, self.round_steps(cid, round_number == 1))
            if after > budget * (1 + LIMIT_SLACK):
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
    before it runs or leaves (saved first), and refuses what would take it past its own limit
    (``privacy.epsilon_budget``, else its target ``privacy.epsilon``), whatever the server's
    arithmetic says.

    ``lifetime`` (a site's own folder: ``join``, Ray): the state file keeps every run this site's
    data took part in, and the limit holds for all of them composed; a new run id starts no new
    budget, and only ``fedsecmem budget reset`` (an operator's act, written to the site's ledger)
    does. Without it (the simulator's run folder) the file holds this run only. ``epsilon`` is this
    run's (what the server's figure is checked against); ``lifetime_epsilon`` all runs'."""

    def __init__(self, cfg, cid: int, sgd_plan: tuple[float, int], out: Path | None = None,
                 run_id: str | None = None, lifetime: bool = False, data_sha256: str | None = None):
        pv = cfg.privacy
        self.cfg, self.cid, self.plan, self.run_id = cfg, cid, sgd_plan, run_id
        self.data_sha256 = data_sha256
        self.path = None if out is None else Path(out) / CLIENT_STATE_FILE.format(cid=cid)
        self.accountant = PrivacyAccountant([cid], pv.delta, pv.accountant)
        self.earlier: list[dict] = []  # the other runs' entries, kept as they are (lifetime)
        self._earlier_steps: list[Step] = []  # and what they spent
        if self.path is not None and self.path.is_file():
            for entry, acc in read_client_state(self.path, cid):
                if entry.get("run_id") == run_id:  # a restarted client of the same run keeps what it spent
                    self.accountant = acc
                elif lifetime:
                    self.earlier.append(entry)
                    self._earlier_steps += acc.history.get(cid, [])

    def training(self, z: float) -> list[Step]:
        q, steps = self.plan
        return [Step(z, q, steps, SGD)] if steps > 0 else []

    def releases(self, z: float) -> list[Step]:
        return [Step(z, 1.0, releases_per_round(self.cfg))]

    def refuse(self, steps: list[Step]) -> str | None:
        """Why this client will not spend ``steps`` (its own limit, over every run of its data when
        ``lifetime``), or None."""
        limit = epsilon_limit(self.cfg)
        if limit is None:
            return None
        after = epsilon_of([*self._earlier_steps, *self.accountant.history[self.cid], *steps],
                           self.accountant.delta, self.accountant.kind)
        if after > limit * (1 + LIMIT_SLACK):
            what = "its own budget" if self.cfg.privacy.epsilon_budget is not None else "its own target"
            runs = f" over {len(self.earlier) + 1} runs on its data" if self.earlier else ""
            return (f"client {self.cid}: this would take it to epsilon {after:.2f}{runs} > {what} {limit:g} "
                    f"(spent {self.lifetime_epsilon():.2f}); refused")
        return None

    def charge(self, steps: list[Step]) -> None:
        self.accountant.record(self.cid, steps)
        if self.path is not None:
            entry = {"run_id": self.run_id, "data_sha256": self.data_sha256, "accountant": self.accountant.to_json()}
            state = {"format": CLIENT_STATE_FORMAT, "client": self.cid, "runs": [*self.earlier, entry]}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.path)  # written before what it charges runs or leaves

    def epsilon(self) -> float:
        """This run's epsilon."""
        return self.accountant.epsilon(self.cid)

    def lifetime_epsilon(self) -> float:
        """Every run of this site's data composed (this run's alone without ``lifetime``)."""
        return epsilon_of([*self._earlier_steps, *self.accountant.history[self.cid]], self.accountant.delta,
                          self.accountant.kind)


def read_client_state(path: Path, cid: int) -> list[tuple[dict, PrivacyAccountant]]:
    """The runs a client's state file holds, each with its accountant (the one-run form of earlier
    versions read as one run); a malformed file is a ``ValueError`` naming it (never read as
    "nothing spent")."""
    try:
        state = read_json_strict(path)
        runs = state["runs"] if "runs" in state else [{"run_id": state["run_id"], "accountant": state["accountant"]}]
        if state.get("client", cid) != cid or not isinstance(runs, list):
            raise ValueError(f"not client {cid}'s state")
        return [(entry, PrivacyAccountant.from_json(entry["accountant"])) for entry in runs]  # refuses a bad one
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{Path(path).name} is unreadable or malformed ({exc}); it must not be read as "
                         "nothing spent: restore it, or reset the budget with `fedsecmem budget reset`") from None
