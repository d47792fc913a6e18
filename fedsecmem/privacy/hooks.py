"""What a run's bookkeeping plugs into around a FedDyMem round (``fedsecmem.method.round``), as
Opacus plugs accounting into an optimizer step: the ledgers record round starts, dropouts and
epsilon; the leakage measurement records what each adversary saw. Every method is a no-op
unless overridden."""

from __future__ import annotations

from typing import Any

__all__ = ["RoundHooks"]


class RoundHooks:
    def begin_round(self, r: int) -> None:
        """Round ``r`` starts (after the budget check, before anything is sent)."""

    def on_contributions(self, r: int, last: bool, clients: list[Any], contributions: list[Any],
                         z: float | None) -> None:
        """The clients' plaintext contributions of round ``r``: called by the in-process simulator
        only (a measurement's view, never a server's)."""

    def on_sum(self, which: str, request: Any, outcome: Any) -> None:
        """One secure sum of the round's k-means (``which``: "patches" | "images"); simulator only."""

    def privacy_plan(self, plan: dict) -> None:
        """The noise the run uses and what it was calibrated for, once known (before round 1)."""

    def end_round(self, r: int, record: dict, privacy: Any) -> None:
        """Round ``r`` is done: its record and the run's ``RunPrivacy`` (None without DP: every
        client's epsilon after the round, the noise and each client's whole history)."""
