"""When a training run has converged: the budget rule of the converged results.

A run is stopped once its validation metric has stopped improving: the best value of the last
``patience`` evaluations is less than ``min_delta`` points above the best value before them.
Points are percentage points of a metric kept as a fraction (top-1 0.395 is 39.5 points), so
``min_delta: 0.5`` reads as "less than half a point better". ``train.epochs`` stays the cap, and
the learning-rate schedule runs to the cap: a row that stops early stops on a plateau of its
schedule, and the same rule holds for every row of a table.

The decision is a pure function of the evaluation history (kept in the training checkpoint), so
a resumed run decides exactly as the uninterrupted one would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """``name`` is a '/'-separated path into an evaluation's metrics, e.g. ``overall/mAP``."""
    node: Any = metrics
    for part in name.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def available_metrics(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    names: list[str] = []
    for key, value in metrics.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        names.extend(available_metrics(value, path) if isinstance(value, dict) else [path])
    return names


def should_stop(values: Sequence[float], patience: int, min_delta_points: float) -> StopDecision:
    """``values``: the validation metric after each evaluation so far, oldest first (fractions)."""
    if len(values) <= patience:
        return StopDecision(False, f"{len(values)} of {patience + 1} evaluations needed")
    before, recent = max(values[:-patience]), max(values[-patience:])
    gain = 100.0 * (recent - before)
    if gain < min_delta_points:
        return StopDecision(True, f"the best of the last {patience} evaluations ({100 * recent:.2f}) is "
                                  f"{gain:+.2f} points against the best before them ({100 * before:.2f}), "
                                  f"less than {min_delta_points:g}")
    return StopDecision(False, f"still improving: {gain:+.2f} points over the last {patience} evaluations")
