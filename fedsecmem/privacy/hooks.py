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

    def end_round(self, r: int, record: dict, epsilon: dict[int, float] | None, z: float | None) -> None:
        """Round ``r`` is done: its record, every client's epsilon after it (None without DP)."""
