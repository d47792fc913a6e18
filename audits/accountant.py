"""Per-client privacy accounting: the privacy loss distribution (PLD) accountant of Google's
``dp_accounting`` (``pld``, the default: pessimistic estimates, a sound upper bound; within 2% of
Opacus' PRV and below RDP, tests/test_privacy.py), and Opacus' RDP and PRV accountants.

PLD is made cheap without giving up soundness: a history is first put in a canonical form
(identical steps merged into one count; all releases at rate 1 merged into one Gaussian with
1/z^2 = sum n_i/z_i^2, which is exactly their composition), each canonical history is computed
once, and the loss is discretized on a 1e-3 grid (``PLD_DISCRETIZATION``): with pessimistic
estimates any grid gives an upper bound, and 1e-3 moves epsilon by under 1e-4 relative to
dp_accounting's default 1e-4 grid at a tenth of the time (tests/test_privacy.py).

Every mechanism a client's data goes through is one entry of its history:
a DP-SGD step of the memory generator (noise multiplier z_sgd, Poisson
sampling rate q = expected batch / client images) and each Gaussian release
of aggregated statistics (noise multiplier z, sampling rate 1: every image
takes part). Opacus composes the history and converts it to (epsilon, delta).
The history is the whole state: it is saved with the run and loaded back, so a
restarted run continues from what was spent, never from zero.

``would_spend`` answers "what would epsilon be after these steps?" without
recording them, so a round is refused before anything is released.
``calibrate`` finds the noise multiplier that spends a target epsilon over a
planned run.

Fails closed: a noise multiplier, sampling rate or count that is not a number in range (NaN, an
infinity, a negative count) is a ``ValueError`` naming it wherever a step enters (``Step``,
``record``, ``from_json``, ``canonical``), never a step silently dropped (a NaN noise multiplier
once made the releases it sat among count as epsilon 0). Privacy state files are read with
``read_json_strict``, which refuses NaN and the infinities that Python's ``json`` accepts.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# kind -> Opacus' accountant class (imported when used; pld: dp_accounting's)
ACCOUNTANTS = {"pld": None, "rdp": "RDPAccountant", "prv": "PRVAccountant"}
DEFAULT_ACCOUNTANT = "pld"
# the PLD's privacy-loss grid: coarser is faster and, with pessimistic estimates, still an upper bound
PLD_DISCRETIZATION = 1e-3
# Opacus' default RDP orders stop at 63; heavily noised releases are tightest at higher orders
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256, 512, 1024]


SGD, RELEASE = "sgd", "release"


class StrictJSONError(ValueError):
    """A JSON file ``read_json_strict`` refuses: ``path`` and the ``reason`` without it."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def read_json_strict(path: Path):
    """A privacy state file's JSON, refusing what Python's ``json`` would let in: the constants
    NaN, Infinity and -Infinity, and numbers too large for a float (1e999 reads as infinity). A
    ``StrictJSONError`` (a ``ValueError``) names the file and the value; OSError as reading raises it."""

    def constant(name: str):
        raise ValueError(f"holds {name}, not a finite number (refused: a privacy state must hold finite numbers)")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"holds {text}, not a finite number (refused: a privacy state must hold finite numbers)")
        return value

    text = Path(path).read_text()
    try:
        return json.loads(text, parse_constant=constant, parse_float=finite)
    except ValueError as exc:  # json.JSONDecodeError is one
        reason = str(exc) if str(exc).startswith("holds ") else f"not valid JSON ({exc})"
        raise StrictJSONError(path, reason) from None


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def check_step(z, q, n) -> tuple[float, float, int]:
    """(noise multiplier, sampling rate, count) as numbers in range, or a one-line ``ValueError``
    naming the bad value: z finite and >= 0 (0: no noise, epsilon infinite), 0 < q <= 1, n an
    integer >= 0."""
    if not _real(z) or not _finite(z) or z < 0:
        raise ValueError(f"noise multiplier {z!r} is not a finite number >= 0")
    if not _real(q) or not _finite(q) or not 0 < q <= 1:
        raise ValueError(f"sampling rate {q!r} is not a number in (0, 1]")
    integral = isinstance(n, numbers.Integral) or (_real(n) and _finite(n) and float(n).is_integer())
    if isinstance(n, bool) or not integral or n < 0:
        raise ValueError(f"step count {n!r} is not an integer >= 0")
    return float(z), float(q), int(n)


@dataclass(frozen=True)
class Step:
    """``count`` compositions of a (subsampled) Gaussian mechanism. ``kind``: a DP-SGD step (its
    noise stays with the client) or a release (its noise may be shared out); the epsilon does not
    depend on it, who faces which noise does (``audits.adversaries``). Checked when made
    (``check_step``): a value out of range is a ``ValueError``."""

    noise_multiplier: float
    sample_rate: float
    count: int = 1
    kind: str = RELEASE

    def __post_init__(self):
        check_step(self.noise_multiplier, self.sample_rate, self.count)
        if self.kind not in (SGD, RELEASE):
            raise ValueError(f"unknown step kind {self.kind!r}")


def _steps(steps: Iterable[Step]) -> list[Step]:
    """``steps`` as a list, each a ``Step`` (checked when it was made: its values are in range)."""
    steps = list(steps)
    for s in steps:
        if not isinstance(s, Step):
            raise ValueError(f"not a Step: {s!r}")
    return steps


def epsilon_of(history: Iterable[Step], delta: float, kind: str = DEFAULT_ACCOUNTANT) -> float:
    """Epsilon at ``delta`` for a history of steps (0 for an empty history; infinite when a step
    has no noise). A step out of range is a ``ValueError``, never skipped."""
    if not _real(delta) or not 0 < delta < 1:
        raise ValueError(f"delta {delta!r} is not a number in (0, 1)")
    hist = [(s.noise_multiplier, s.sample_rate, s.count) for s in _steps(history) if s.count > 0]
    if not hist:
        return 0.0
    if any(z == 0 for z, _, _ in hist):
        return float("inf")
    if kind == "pld":
        return _pld_epsilon(canonical(hist), float(delta))
    import opacus.accountants

    acc = getattr(opacus.accountants, ACCOUNTANTS[kind])()
    acc.history = hist
    if kind == "rdp":
        return float(acc.get_epsilon(delta, alphas=RDP_ORDERS))
    return float(acc.get_epsilon(delta))


def canonical(hist: list[tuple[float, float, int]]) -> tuple[tuple[float, float, int], ...]:
    """The same composition in fewest steps: the releases at rate 1 (Gaussian mechanisms) as one
    Gaussian whose 1/z^2 is the sum of theirs (their exact composition), identical subsampled
    steps as one count; sorted, so equal histories give equal keys. Every step must be in range
    (``check_step``; a NaN used to drop the releases it sat among) and have noise (z > 0)."""
    hist = [check_step(z, q, n) for z, q, n in hist]
    if any(z == 0 and n > 0 for z, _, n in hist):
        raise ValueError("a step without noise (noise multiplier 0) has no finite epsilon to compose")
    hist = [(z, q, n) for z, q, n in hist if n > 0]
    inverse_square = sum(n / z ** 2 for z, q, n in hist if q >= 1.0)
    counts: dict[tuple[float, float], int] = {}
    for z, q, n in hist:
        if q < 1.0:
            counts[(z, q)] = counts.get((z, q), 0) + n
    steps = sorted((z, q, n) for (z, q), n in counts.items())
    if inverse_square > 0:
        steps.append((inverse_square ** -0.5, 1.0, 1))
    return tuple(steps)


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(hist: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """dp_accounting's PLD accountant over a canonical history: each step a Gaussian mechanism,
    Poisson-subsampled at its rate, composed ``count`` times."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for z, q, n in hist:
        event = dp_event.GaussianDpEvent(z)
        if q < 1.0:
            event = dp_event.PoissonSampledDpEvent(q, event)
        acc.compose(event, n)
    return float(acc.get_epsilon(delta))


def step_of(entry: list) -> Step:
    """A ``Step`` from its JSON form [z, rate, count(, kind)] (without a kind: rate 1 is a release);
    anything else, or a value out of range, is a ``ValueError`` naming it."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
        raise ValueError(f"step {entry!r} is not [noise multiplier, sampling rate, count(, kind)]")
    z, q, n = check_step(*entry[:3])
    kind = entry[3] if len(entry) > 3 else (RELEASE if q >= 1.0 else SGD)
    if kind not in (SGD, RELEASE):
        raise ValueError(f"unknown step kind {kind!r}")
    return Step(z, q, n, kind)


class PrivacyAccountant:
    """The histories of every client of a run, and the (epsilon, delta) each has spent."""

    def __init__(self, clients: Iterable[int], delta: float, kind: str = DEFAULT_ACCOUNTANT):
        if kind not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {kind!r}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.kind = kind
        self.delta = delta
        self.history: dict[int, list[Step]] = {int(c): [] for c in clients}

    def record(self, client: int, steps: Iterable[Step]) -> None:
        """Charge ``steps`` to ``client``: all of them checked first, so a bad one records nothing."""
        self.history[int(client)].extend(s for s in _steps(steps) if s.count > 0)

    def epsilon(self, client: int) -> float:
        return epsilon_of(self.history[int(client)], self.delta, self.kind)

    def compact(self, client: int) -> list[list]:
        """``client``'s history with identical (z, rate, kind) steps merged: [[z, rate, count, kind],
        ...] in the order first charged. What a ledger signs, and all an auditor needs to recompute
        epsilon (and, by kind, each adversary's)."""
        counts: dict[tuple[float, float, str], int] = {}
        for s in self.history[int(client)]:
            key = (float(s.noise_multiplier), float(s.sample_rate), s.kind)
            counts[key] = counts.get(key, 0) + int(s.count)
        return [[z, q, n, kind] for (z, q, kind), n in counts.items()]

    def would_spend(self, client: int, steps: Iterable[Step]) -> float:
        return epsilon_of([*self.history[int(client)], *steps], self.delta, self.kind)

    def to_json(self) -> dict:
        return {"kind": self.kind, "delta": self.delta,
                "history": {str(c): [[s.noise_multiplier, s.sample_rate, s.count, s.kind] for s in h]
                            for c, h in self.history.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "PrivacyAccountant":
        """The accountant ``to_json`` wrote; a malformed one, or a step out of range, is a one-line
        ``ValueError`` naming the client and the value (never read as less spent)."""
        if not isinstance(data, dict) or not isinstance(data.get("history"), dict):
            raise ValueError("not a privacy accountant's state (no history)")
        delta = data.get("delta")
        if not _real(delta):
            raise ValueError(f"delta {delta!r} is not a number")
        acc = cls([int(c) for c in data["history"]], float(delta), data.get("kind"))
        for c, h in data["history"].items():
            if not isinstance(h, list):
                raise ValueError(f"client {c}: history {h!r} is not a list of steps")
            try:
                acc.history[int(c)] = [step_of(entry) for entry in h]
            except ValueError as exc:
                raise ValueError(f"client {c}: {exc}") from None
        return acc

    def save(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        tmp.replace(path)  # atomic: a crash never leaves half a state

    @classmethod
    def load(cls, path: Path) -> "PrivacyAccountant":
        """``save``'s file, read strictly (``read_json_strict``); a ``ValueError`` names the file."""
        data = read_json_strict(path)
        try:
            return cls.from_json(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def calibrate(target_epsilon: float, delta: float, plan: list[tuple[float, int]], kind: str = DEFAULT_ACCOUNTANT,
              low: float = 0.05, high: float = 500.0, tolerance: float = 0.01) -> float:
    """Smallest noise multiplier z such that the planned history spends at most ``target_epsilon``.

    ``plan`` lists (sample_rate, count) of every mechanism the run will compose, all at the same
    noise multiplier z (releases have sample rate 1, DP-SGD steps their Poisson rate)."""
    if target_epsilon <= 0:
        raise ValueError("target epsilon must be positive")

    def eps(z: float) -> float:
        return epsilon_of([Step(z, q, n) for q, n in plan], delta, kind)

    if eps(high) > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon} cannot be reached with noise multipliers up to {high}")
    while high - low > tolerance * low:  # bisection on a monotone function
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
