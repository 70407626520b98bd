"""RegMix's proposals: random data mixtures for the proxy runs, as in the paper's ``synthesize_mixture.py``.

Paper: "RegMix: Data Mixture as Regression for Language Model Pre-training" (Liu et al., ICLR 2025). The rest of
the recipe (fit, evaluate, search) is :mod:`mixtures.regmix`, which re-exports :func:`propose`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from mixtures.regmix_io import shares_vector
from native.rounding import largest_remainder

__all__ = ["DEFAULT_SCALES", "propose"]

#: Dirichlet concentration scales the proposals draw from (log-spaced, 0.1 to 5)
DEFAULT_SCALES = tuple(float(s) for s in np.logspace(np.log10(0.1), np.log10(5.0), 15))


def propose(token_shares, n: int, *, temperature: float = 0.5, scales: Sequence[float] = DEFAULT_SCALES,
            max_repeat: float | None = 15, target_tokens: float | None = None, min_weight: float = 2e-4,
            seed: int = 0, max_draws: int | None = None) -> NDArray[np.float64]:
    """Random mixtures for proxy runs, as in the paper's ``synthesize_mixture.py``.

    Each draw picks a scale uniformly from ``scales`` and samples ``Dirichlet(prior ** temperature / sum * scale)``
    where ``prior`` is the normalised ``token_shares``. A draw is rejected when a domain would be repeated more
    than ``max_repeat`` times: weight ``w_d > max_repeat * tokens_d / target_tokens`` (with ``target_tokens=None``
    the large run trains on as many tokens as all domains hold, so the bound is ``max_repeat * share_d``, the
    authors' rule). Weights below ``min_weight`` are zeroed, the rest rounded to multiples of ``min_weight`` by
    largest remainder so every row sums to 1 exactly (in units of ``min_weight``), and duplicates are dropped.

    Args:
        token_shares: tokens (or shares) per domain: array ``[D]`` or mapping domain -> tokens, all > 0.
        n: number of distinct mixtures to return.
        temperature: exponent on the prior (0.5 flattens it, as in the paper).
        scales: Dirichlet concentration scales (default 15 log-spaced values from 0.1 to 5.0).
        max_repeat: largest allowed number of passes over a domain's tokens, or None for no bound.
        target_tokens: tokens of the run the mixture is for, in the units of ``token_shares``.
        min_weight: smallest non-zero weight and rounding grid (``1 / min_weight`` must be an integer).
        seed: integer seed.
        max_draws: give up after this many draws (default ``2000 * n + 10000``).

    Returns:
        float64 ``[n, D]``, rows summing to 1, in ``token_shares`` order.

    Raises:
        ValueError: bad arguments, or fewer than ``n`` distinct mixtures pass the bound within ``max_draws``.
    """
    tokens = shares_vector(token_shares, None)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (got {n=})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature=})")
    scales = np.asarray(scales, dtype=np.float64).ravel()
    if len(scales) == 0 or np.any(~np.isfinite(scales)) or np.any(scales <= 0):
        raise ValueError(f"scales must be a non-empty list of positive numbers (got {scales.tolist()})")
    units = round(1.0 / min_weight) if min_weight > 0 else 0
    if not 0 < min_weight < 1 or abs(units * min_weight - 1.0) > 1e-9:
        raise ValueError(f"min_weight must be 1/k for an integer k >= 2 (got {min_weight=})")
    share = tokens / tokens.sum()
    if max_repeat is None:
        bound = np.ones_like(share)
    else:
        if not max_repeat > 0:
            raise ValueError(f"max_repeat must be > 0 or None (got {max_repeat=})")
        total = tokens.sum() if target_tokens is None else float(target_tokens)
        if not total > 0:
            raise ValueError(f"target_tokens must be > 0 (got {target_tokens=})")
        bound = np.minimum(max_repeat * tokens / total, 1.0)
        if bound.sum() < 1.0:
            raise ValueError(f"max_repeat={max_repeat} allows at most {bound.sum():.3f} of target_tokens in all: "
                             "no mixture can satisfy it; raise max_repeat or lower target_tokens")
    prior = share**temperature
    prior /= prior.sum()
    rng = np.random.default_rng(seed)
    max_draws = 2000 * n + 10000 if max_draws is None else int(max_draws)
    kept: dict[bytes, NDArray[np.int64]] = {}
    drawn = 0
    while len(kept) < n and drawn < max_draws:
        m = min(max(4 * (n - len(kept)), 256), max_draws - drawn)
        drawn += m
        alpha = prior[None, :] * rng.choice(scales, size=m)[:, None]
        g = rng.standard_gamma(alpha)
        s = g.sum(axis=1)
        ok = s > 0
        w = g[ok] / s[ok, None]
        w = w[np.all(w <= bound, axis=1)]
        w[w < min_weight] = 0.0
        w = w[w.sum(axis=1) > 0]
        w /= w.sum(axis=1, keepdims=True)
        q = largest_remainder(w, units, exact=True)
        q = q[np.all(q <= np.floor(bound * units + 1e-9), axis=1)]
        for row in q:
            kept.setdefault(row.tobytes(), row)
            if len(kept) == n:
                break
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} distinct mixtures out of {drawn} draws pass max_repeat={max_repeat}; "
                         "raise max_repeat or max_draws, or ask for fewer mixtures")
    return np.stack(list(kept.values())).astype(np.float64) / units


# ---- regressors -------------------------------------------------------------------------------------------------
