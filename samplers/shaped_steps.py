"""Step planning of :class:`samplers.ShapedMixtureBatchSampler`: which shape (group) each step of the run has.

The curriculum side of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum"
(Pouransari et al., NeurIPS 2024), under a mixture schedule: the run is cut into segments (each phase of a
piecewise schedule, split into ``cycles``); in a segment, group ``g`` gets steps in proportion to the units the
segment's mean weights ask of it, and the steps are ordered by the curriculum draw of
``native.curriculum_order``. Pure functions of arrays and seeds; the sampler holds the configuration.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from native.curriculum import curriculum_order
from samplers.mixture import largest_remainder_counts

__all__ = ["present_groups", "run_segments", "step_groups"]


def present_groups(g: NDArray[np.int64]) -> list[int]:
    """The distinct groups ``>= 0`` of an array (a bincount for small group ids: no sort of the rows)."""
    g = g[g >= 0] if len(g) and g.min() < 0 else g
    if not len(g):
        return []
    if g.max() < 1 << 20:
        return np.flatnonzero(np.bincount(g)).tolist()
    return np.unique(g).tolist()


def run_segments(schedule, total_steps: int, cycles: int) -> list[tuple[int, int]]:
    """``[(first step, end step), ...]`` of the run: each phase of ``schedule`` (its ``phase_starts(T)``, when it
    has one) split into ``cycles`` equal segments; empty segments are left out."""
    T = total_steps
    starts = {0}
    phase = getattr(schedule, "phase_starts", None)
    if callable(phase):
        starts |= {int(s) for s in phase(T) if 0 < s < T}
    bounds = sorted(starts) + [T]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        cuts = [a + (b - a) * c // cycles for c in range(cycles + 1)]
        out.extend((x, y) for x, y in zip(cuts[:-1], cuts[1:]) if y > x)
    return out


def step_groups(units: NDArray[np.float64], odds: NDArray[np.float64], unit: NDArray[np.float64],
                weights: NDArray[np.float64], rows_step: NDArray[np.int64], segments: Sequence[tuple[int, int]],
                seeds: Sequence[int]) -> NDArray[np.int64]:
    """Dense group of every step: per segment, steps per group from the units the mean weights ask of
    each group, ordered by the curriculum draw.

    Args:
        units: float ``[D, G]`` units each domain holds in each group.
        odds: float ``[G]`` curriculum odds (0 leaves a group out).
        unit: float ``[D, G]`` mean units of one row.
        weights: float ``[T, D]`` schedule weights of every step.
        rows_step: int ``[G]`` rows of one step of each group, all ranks.
        segments: :func:`run_segments` of the run.
        seeds: one curriculum seed per segment.

    Returns:
        int64 ``[T]`` dense group (index into the sorted group ids) of every step.
    """
    usable = odds > 0
    units = units * usable[None, :]
    frac = units / np.maximum(units.sum(axis=1, keepdims=True), 1e-300)  # [D, G] share of d's units in g
    out = np.empty(len(weights), dtype=np.int64)
    for i, (a, b) in enumerate(segments):
        w = weights[a:b].mean(axis=0)
        demand = w @ frac  # [G] units asked of each group
        # units one step of each group delivers: its rows times the demand-weighted unit of its domains
        share = w[:, None] * frac
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_unit = (share * unit).sum(axis=0) / share.sum(axis=0)
        step_units = rows_step * np.where(np.isfinite(mean_unit), mean_unit, 0.0)
        want = np.where((demand > 0) & (step_units > 0), demand / np.where(step_units > 0, step_units, 1), 0.0)
        steps = largest_remainder_counts(want[None, :] / want.sum(), b - a)[0]
        pos = curriculum_order(steps, np.where(steps > 0, odds, 1.0), seeds[i])
        out[a:b] = pos
    return out
