"""Curriculum order of dataset-decomposition steps: which bucket each step of a cycle takes, drawn with
probability proportional to odds x remaining steps per bucket ("Dataset Decomposition", Pouransari et al., 2024).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import rand_uniform

__all__ = ["curriculum_order"]


@njit
def _curriculum_order(counts, odds, seed):
    K = counts.shape[0]
    rem = counts.copy()
    total = np.int64(0)
    for k in range(K):
        total += rem[k]
    out = np.empty(total, dtype=np.int64)
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    w = np.empty(K, dtype=np.float64)
    for s in range(total):
        tw = 0.0
        for k in range(K):
            w[k] = odds[k] * rem[k]
            tw += w[k]
        u = rand_uniform(state) * tw
        pick = -1
        acc = 0.0
        for k in range(K):
            if rem[k] > 0:
                pick = k  # the last non-empty bucket catches rounding at the top end
                acc += w[k]
                if u < acc:
                    break
        out[s] = pick
        rem[pick] -= 1
    return out


def curriculum_order(counts, odds, seed: int) -> NDArray[np.int64]:
    """The bucket of every step of a cycle: at each step bucket ``i`` is drawn with probability
    ``odds[i] * remaining[i] / sum_j odds[j] * remaining[j]`` (the paper's sampling rule; ``remaining`` counts
    the bucket's steps not yet taken), so every bucket is used up by the end of the cycle.

    Args:
        counts: int ``[K]`` steps per bucket, ``>= 0``.
        odds: float ``[K]`` odds per bucket, ``> 0`` where ``counts > 0``.
        seed: integer seed.

    Returns:
        int64 ``[sum(counts)]`` bucket positions ``0..K-1``, each ``i`` exactly ``counts[i]`` times.
    """
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    odds = np.ascontiguousarray(odds, dtype=np.float64)
    if counts.shape != odds.shape or counts.ndim != 1:
        raise ValueError(f"counts and odds must be 1-D of one shape (got {counts.shape} and {odds.shape})")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    if ((odds <= 0) & (counts > 0)).any() or not np.isfinite(odds).all():
        raise ValueError(f"odds must be finite and > 0 for every non-empty bucket (got {odds.tolist()})")
    return _curriculum_order(counts, odds, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
