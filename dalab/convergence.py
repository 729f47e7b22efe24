"""Is a number still moving at its step budget? The one definition every table and study reads.

A run's *drift* is its target-test accuracy at the last checkpoint minus at the checkpoint halfway
through (points, signed). Over the runs of a table cell (its seeds):

- the *plateau* is the mean |drift|: how far the cell's runs still move in their second half;
- the *trend* is the mean drift: a trend as large as the plateau means the runs still rise (or
  fall) at the budget; a trend near 0 under a large plateau means their checkpoints swing.

A cell whose plateau is above :data:`PLATEAU_POINTS` is budget-bound and gets a mark: still rising
(``↗``), still falling (``↘``) when the trend itself is beyond the threshold, else swinging
between checkpoints (``↕``). results/protocol.md uses the same threshold to read its studies.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from dalab.tasks import score

PLATEAU_POINTS = 2.0
MARKS = {"rising": "↗", "falling": "↘", "swinging": "↕"}
RULE_TEXT = (f"↗/↘: still rising/falling at the budget, ↕: swinging between checkpoints (the target test metric "
             f"moves > {PLATEAU_POINTS:g} points from the halfway checkpoint to the last, mean over seeds)")


def drift(rec: dict) -> float | None:
    """Target-test accuracy at the last checkpoint minus at the checkpoint halfway through (points,
    signed); None for an unfinished or diverged run, or one without an evaluation at the halfway step."""
    if not rec or not rec.get("final") or not rec.get("evals"):
        return None
    half = rec["config"]["steps"] // 2
    mid = next((e for e in rec["evals"] if e["step"] == half), None)
    return None if mid is None else (score(rec, rec["final"]) - score(rec, mid)) * 100


def mean_drift(drifts: list[float] | None) -> tuple[float | None, float | None]:
    """(plateau, trend) of a list of signed drifts: mean of |d|, mean of d."""
    if not drifts:
        return None, None
    return statistics.mean(abs(d) for d in drifts), statistics.mean(drifts)


@dataclass(frozen=True)
class Convergence:
    plateau: float | None
    trend: float | None

    @property
    def state(self) -> str:
        """"" (on its plateau, or unknown), "rising", "falling" or "swinging"."""
        if self.plateau is None or self.plateau <= PLATEAU_POINTS:
            return ""
        if abs(self.trend) > PLATEAU_POINTS:
            return "rising" if self.trend > 0 else "falling"
        return "swinging"

    @property
    def mark(self) -> str:
        return MARKS.get(self.state, "")


def of_runs(records: list[dict]) -> Convergence:
    """The convergence of a cell from its runs' records."""
    return Convergence(*mean_drift([d for d in map(drift, records) if d is not None]))
