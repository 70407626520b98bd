"""Per-step domain counts of a mixture inside shaped batches, with the error carried forward.

A step of a shaped plan takes ``rows_per_step[g]`` rows of one group ``g`` (a sequence-length bucket, a
duration bucket) and fills them from the domains that have rows in that group, so that the *measured* share of
each domain (tokens, seconds) follows the schedule's weights over any window. Domain ``d``'s target grows by
``w[s, d] * U_s`` at step ``s`` (``U_s`` the units the step delivered); its rows at the step are the
largest-remainder rounding (Hamilton) of its outstanding need, so a domain that has no rows in a step's group is
made up for by the others and catches up at the next steps where it has rows.

This is the counting kernel of ``samplers.ShapedMixtureBatchSampler``; a sequential pass over the steps
(each step depends on the error left by the earlier ones), O(T * D) time, no allocation per step.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import rand_uniform

__all__ = ["shaped_counts"]


@njit
def _shaped_counts(step_group, weights, unit, avail, rows_per_step, seed):
    T, D = weights.shape
    counts = np.zeros((T, D), dtype=np.int64)
    target = np.zeros(D, dtype=np.float64)  # units each domain should have received so far
    got = np.zeros(D, dtype=np.float64)  # units it did receive
    x = np.zeros(D, dtype=np.float64)
    key = np.zeros(D, dtype=np.float64)
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    fallback = 0
    for s in range(T):
        g = step_group[s]
        n = rows_per_step[g]
        # expected units of the step: rows times the weight-averaged unit of the eligible domains
        wsum = 0.0
        usum = 0.0
        for d in range(D):
            if avail[d, g] > 0:
                wsum += weights[s, d]
                usum += weights[s, d] * unit[d, g]
        est = n * (usum / wsum) if wsum > 0 else 0.0
        tot = 0.0
        for d in range(D):
            x[d] = 0.0
            if avail[d, g] > 0:
                v = (target[d] - got[d] + weights[s, d] * est) / unit[d, g]
                if v > 0:
                    x[d] = v
                    tot += v
        if tot <= 0:  # nobody eligible is owed anything: the step's own weights, else evenly
            fallback += 1
            for d in range(D):
                if avail[d, g] > 0:
                    x[d] = weights[s, d] if wsum > 0 else 1.0
                    tot += x[d]
        # scale the eligible needs to the step's rows, then Hamilton with random tie keys
        given = 0
        for d in range(D):
            x[d] = x[d] * n / tot
            c = np.int64(np.floor(x[d] + 1e-9))
            counts[s, d] = c
            given += c
            key[d] = -1.0
            if avail[d, g] > 0:
                key[d] = np.round(max(x[d] - c, 0.0), 9) + rand_uniform(state) * 1e-10
        for _ in range(n - given):
            best = -1
            for d in range(D):
                if key[d] >= 0 and (best < 0 or key[d] > key[best]):
                    best = d
            counts[s, best] += 1
            key[best] = -1.0
        delivered = 0.0
        for d in range(D):
            u = counts[s, d] * unit[d, g]
            got[d] += u
            delivered += u
        for d in range(D):
            target[d] += weights[s, d] * delivered
    return counts, fallback


def shaped_counts(step_group: NDArray[np.int64], weights: NDArray[np.float64], unit: NDArray[np.float64],
                  avail: NDArray[np.int64], rows_per_step: NDArray[np.int64], seed: int
                  ) -> tuple[NDArray[np.int64], int]:
    """Rows of each domain at each step of a shaped plan.

    Args:
        step_group: int64 ``[T]`` the group (bucket) of every step, in ``[0, G)``.
        weights: float64 ``[T, D]`` schedule weights per step (rows sum to 1).
        unit: float64 ``[D, G]`` mean units (tokens, seconds) of a row of domain ``d`` in group ``g`` (``> 0``
            where ``avail > 0``).
        avail: int64 ``[D, G]`` rows of domain ``d`` in group ``g``; domains with 0 get no rows there.
        rows_per_step: int64 ``[G]`` rows of a step of each group (all ranks together), ``>= 1``.
        seed: integer seed of the tie-breaking keys.

    Returns:
        ``(counts, fallback_steps)``: int64 ``[T, D]`` with ``counts[s].sum() == rows_per_step[step_group[s]]``,
        and the number of steps whose group held no domain still owed units (filled by the step's weights).

    Raises:
        ValueError: shapes disagree, a step's group has no rows in any domain, or a unit is not positive.
    """
    g = np.ascontiguousarray(step_group, dtype=np.int64)
    w = np.ascontiguousarray(weights, dtype=np.float64)
    u = np.ascontiguousarray(unit, dtype=np.float64)
    a = np.ascontiguousarray(avail, dtype=np.int64)
    r = np.ascontiguousarray(rows_per_step, dtype=np.int64)
    if w.ndim != 2 or g.shape != (w.shape[0],) or u.shape != a.shape or u.shape[0] != w.shape[1] or \
            r.shape != (u.shape[1],):
        raise ValueError(f"shapes disagree: step_group {g.shape}, weights {w.shape}, unit {u.shape}, avail {a.shape}, "
                         f"rows_per_step {r.shape}; expected [T], [T, D], [D, G], [D, G], [G]")
    if len(g) and (g.min() < 0 or g.max() >= len(r)):
        raise ValueError(f"step_group must lie in [0, {len(r)}) (got {g.min()}..{g.max()})")
    if (r < 1).any():
        raise ValueError(f"rows_per_step must be >= 1 (got {r.tolist()})")
    if ((a > 0) & ~(u > 0)).any():
        raise ValueError("unit must be > 0 wherever avail > 0")
    empty = np.flatnonzero(a.sum(axis=0)[g] == 0) if len(g) else np.zeros(0, np.int64)
    if len(empty):
        raise ValueError(f"step {int(empty[0])} takes group {int(g[empty[0]])}, which no domain has rows in")
    counts, fallback = _shaped_counts(g, w, u, a, r, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
    return counts, int(fallback)
