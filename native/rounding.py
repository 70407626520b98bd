"""Integer counts from proportions: Hamilton's largest-remainder method, the one implementation shared by the
mixture samplers (rows of a batch per domain) and RegMix (mixture weights on a grid)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["largest_remainder"]


def largest_remainder(weights: NDArray[np.float64], total: int, tie_keys: NDArray | None = None, *,
                      exact: bool = False) -> NDArray[np.int64]:
    """Integer counts summing to ``total`` closest to ``weights * total`` (Hamilton's largest remainder).

    Each row gets ``floor(w * total)``, then the rows' largest remainders get one more until the row sums to
    ``total``. By default the quotas are read through float noise (weights that sum to 1 only to rounding): a
    quota within 1e-9 below an integer counts as that integer, remainders equal to 9 decimals are ties, and ties
    go by ``tie_keys`` (default: lower index first). With ``exact=True`` the float quotas and remainders are taken
    as they are (ties: lower index first).

    Args:
        weights: float64 ``[B, D]`` (or ``[D]``) rows summing to 1.
        total: count per row.
        tie_keys: optional ``[B, D]`` floats in ``[0, 1)`` that break equal remainders (larger first); not with
            ``exact=True``.
        exact: compare the float remainders exactly.

    Returns:
        int64 ``[B, D]``, each row summing to ``total``.

    Raises:
        ValueError: ``tie_keys`` of another shape or outside ``[0, 1)``, or given with ``exact=True``.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    raw = w * total
    if exact:
        if tie_keys is not None:
            raise ValueError("tie_keys break ties of rounded remainders; pass exact=False with them")
        base = np.floor(raw).astype(np.int64)
        key = raw - base
    else:
        base = np.floor(raw + 1e-9).astype(np.int64)
        if tie_keys is None:
            tie = (w.shape[1] - 1 - np.arange(w.shape[1]))[None, :] / w.shape[1]
        else:
            tie = np.asarray(tie_keys, dtype=np.float64)
            if tie.shape != w.shape or np.any(tie < 0) or np.any(tie >= 1):
                raise ValueError(f"tie_keys must be floats in [0, 1) of shape {w.shape}")
        # remainders compared to 1e-9, ties (within that) broken by the key
        key = np.round(np.maximum(raw - base, 0.0), 9) + tie * 1e-10
    short = total - base.sum(axis=1)
    order = np.argsort(-key, axis=1, kind="stable")  # the top ``short`` remainders get one more
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(w.shape[1]), w.shape).copy(), axis=1)
    return base + (ranks < short[:, None])
