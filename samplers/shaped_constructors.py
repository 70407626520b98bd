"""The ``from_*`` constructors of :class:`samplers.ShapedMixtureBatchSampler`: groups, sizes and batch sizes
derived from metadata (a decomposition's ``2^k`` buckets, duration or length buckets, plain rows).

"Dataset Decomposition" (Pouransari et al., NeurIPS 2024) for :meth:`~ShapedMixtureConstructors.from_decomposed`;
duration bucketing with Lhotse's names (Żelasko et al., 2025) for
:meth:`~ShapedMixtureConstructors.from_durations`; a token budget per length bucket for
:meth:`~ShapedMixtureConstructors.from_lengths`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from samplers.shaped_steps import present_groups

if TYPE_CHECKING:
    from samplers.shaped_mixture import ShapedMixtureBatchSampler

__all__ = ["ShapedMixtureConstructors"]


class ShapedMixtureConstructors:
    """Constructors of :class:`samplers.ShapedMixtureBatchSampler`, as a mixin of that class.

    Each builds per-domain groups (``-1``: left out), sizes and per-group batch sizes, calls ``cls(groups,
    schedule, batch_sizes=..., sizes=..., **kwargs)`` and then sets what the sampler reports: ``unit_name``,
    ``group_labels``, ``shape_units`` (padded units of one row of each group) and, where rows are shorter than
    their shape, ``real_unit``. Rows left out for a reason are named in ``dropped_by_reason`` before
    ``__init__`` runs, so its warning names them. The host's ``__init__`` sets ``group_ids``, ``avail`` and
    ``unit``.
    """

    @classmethod
    def from_decomposed(cls, indexes: Sequence, schedule, *, tokens_per_batch: int, curriculum="grow-p2",
                        **kwargs) -> ShapedMixtureBatchSampler:
        """Dataset decomposition over several domains: one ``2^k`` bucket per step, ``tokens_per_batch`` per rank.

        Args:
            indexes: one decomposition per domain (``datapipe.DecomposedIndex`` or any object with
                ``sequence_log2`` ``[S]``, optional ``sequence_tokens`` and ``max_log2``); rows are sequence ids.
            tokens_per_batch: tokens per rank per step, a multiple of ``2^max_log2``.
            curriculum: ``"grow-p2"``, ``"grow-linear"``, ``"uniform"`` or a dict ``{k: odds}``
                (``samplers.decomposed.curriculum_odds``).
            **kwargs: ``total_steps``, ``cycles``, ``seed``, ... as for the constructor.
        """
        from samplers.decomposed import curriculum_odds

        logs = []
        max_log2 = 0
        for d, ix in enumerate(indexes):
            lg = getattr(ix, "sequence_log2", None)
            if lg is None:
                raise TypeError(f"indexes[{d}] must have a 'sequence_log2' array (got {type(ix).__name__})")
            lg = np.asarray(lg, dtype=np.int64)
            logs.append(lg)
            m = getattr(ix, "max_log2", None)
            max_log2 = max(max_log2, int(lg.max()) if len(lg) else 0, int(m) if m is not None else 0)
        unit = 1 << max_log2
        if not isinstance(tokens_per_batch, (int, np.integer)) or tokens_per_batch < unit or tokens_per_batch % unit:
            raise ValueError(f"tokens_per_batch must be a positive multiple of 2^max_log2={unit} so every bucket gets "
                             f"whole sequences (got {tokens_per_batch=}); e.g. tokens_per_batch={unit * 8}")
        ks = sorted(set().union(*(present_groups(lg) for lg in logs)))
        odds = curriculum_odds(curriculum, np.array(ks, dtype=np.int64), max_log2)
        out = cls(logs, schedule, batch_sizes={k: int(tokens_per_batch) >> k for k in ks},
                  sizes={k: float(1 << k) for k in ks}, group_odds=dict(zip(ks, odds.tolist())), **kwargs)
        out.unit_name = "tokens"
        out.tokens_per_batch = int(tokens_per_batch)
        out.group_labels = [str(1 << int(k)) for k in out.group_ids]
        out.shape_units = np.exp2(out.group_ids.astype(np.float64))
        real = np.zeros_like(out.unit)
        for d, (ix, lg) in enumerate(zip(indexes, logs)):
            tok = getattr(ix, "sequence_tokens", None)
            tok = np.exp2(lg) if tok is None else np.asarray(tok, dtype=np.float64)
            dense = np.searchsorted(out.group_ids, lg)
            sums = np.bincount(dense, weights=tok, minlength=len(out.group_ids))
            real[d] = np.where(out.avail[d] > 0, sums / np.maximum(out.avail[d], 1), 0.0)
        out.real_unit = real
        return out

    @classmethod
    def _bucketed(cls, values: Sequence[ArrayLike], schedule, *, budget: float, cost, bins, num_buckets: int,
                  max_rows: int | None, unit_name: str, long_reason: str, **kwargs) -> ShapedMixtureBatchSampler:
        from samplers.bins import estimate_duration_bins

        vals = [np.asarray(v, dtype=np.float64) for v in values]
        allv = np.concatenate(vals) if vals else np.zeros(0)
        if bins is None:
            fits = allv[cost(allv) <= budget]
            if not len(fits):
                raise ValueError(f"no row fits the budget {budget} (every row costs more); raise the budget")
            bins = estimate_duration_bins(fits, num_buckets=num_buckets)
        bins = np.asarray(bins, dtype=np.float64)
        if bins.ndim != 1 or (np.diff(bins) <= 0).any():
            raise ValueError(f"bucket bins must be 1-D increasing boundaries (got {bins.tolist()})")
        groups, dropped = [], 0
        for v in vals:
            g = np.searchsorted(bins, v, side="left").astype(np.int64)  # bucket i: bins[i-1] < v <= bins[i]
            too_long = cost(v) > budget
            g[too_long] = -1
            dropped += int(too_long.sum())
            groups.append(g)
        # the padded length of a bucket: its upper boundary (the last, open bucket: its longest row)
        upper = np.append(bins, max((float(v[g == len(bins)].max()) for v, g in zip(vals, groups)
                                     if (g == len(bins)).any()), default=bins[-1] if len(bins) else 1.0))
        sizes = {}
        for i, u in enumerate(upper.tolist()):
            b = max(1, int(budget // cost(np.float64(u))))
            sizes[i] = b if max_rows is None else min(b, int(max_rows))
        out = cls.__new__(cls)
        out.dropped_by_reason = {long_reason: dropped} if dropped else {}  # named before __init__ warns about it
        out.__init__(groups, schedule, batch_sizes=sizes, sizes=vals, **kwargs)
        out.unit_name = unit_name
        out.shape_units = upper[out.group_ids]
        out.group_labels = [f"<={upper[k]:g}" for k in out.group_ids]
        return out

    @classmethod
    def from_durations(cls, durations: Sequence[ArrayLike], schedule, *, max_duration: float, num_buckets: int = 30,
                       duration_bins: ArrayLike | None = None, quadratic_duration: float | None = None,
                       max_cuts: int | None = None, **kwargs) -> ShapedMixtureBatchSampler:
        """Speech: one duration bucket per step, ``n * cost(bucket max) <= max_duration`` (Lhotse's names).

        Args:
            durations: one float array ``[n_d]`` of seconds per domain.
            max_duration: padded seconds per rank per batch; cuts costing more are left out and counted.
            num_buckets: buckets estimated over all domains' durations (equal total duration, as Lhotse).
            duration_bins: explicit 1D boundaries ``[K-1]`` instead.
            quadratic_duration: ``q`` of the cost ``d + d^2 / q``; max_cuts: cap on cuts per batch.
        """
        if not (isinstance(max_duration, (int, float, np.number)) and max_duration > 0):
            raise ValueError(f"max_duration must be a number > 0 (got {max_duration=})")
        q = quadratic_duration
        if q is not None and not q > 0:
            raise ValueError(f"quadratic_duration must be > 0 or None (got {quadratic_duration=})")
        return cls._bucketed(durations, schedule, budget=float(max_duration),
                             cost=(lambda d: d) if q is None else (lambda d: d + d * d / q), bins=duration_bins,
                             num_buckets=num_buckets, max_rows=max_cuts, unit_name="seconds",
                             long_reason="longer_than_max_duration", **kwargs)

    @classmethod
    def from_lengths(cls, lengths: Sequence[ArrayLike], schedule, *, max_tokens: int, num_buckets: int = 8,
                     bucket_bins: ArrayLike | None = None, max_rows: int | None = None,
                     **kwargs) -> ShapedMixtureBatchSampler:
        """Token budget: one length bucket per step, ``n * bucket max length <= max_tokens`` per rank.

        Args:
            lengths: one int array ``[n_d]`` of tokens per row per domain; rows longer than ``max_tokens`` are
                left out and counted.
            num_buckets / bucket_bins: length buckets (equal total tokens) or explicit boundaries.
            max_rows: cap on rows per batch.
        """
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (got {max_tokens=})")
        lens = [np.maximum(np.asarray(v, dtype=np.float64), 1.0) for v in lengths]  # an empty row costs a slot
        return cls._bucketed(lens, schedule, budget=float(max_tokens), cost=lambda v: v, bins=bucket_bins,
                             num_buckets=num_buckets, max_rows=max_rows, unit_name="tokens",
                             long_reason="longer_than_max_tokens", **kwargs)

    @classmethod
    def from_rows(cls, num_rows: Sequence[int], schedule, *, batch_size: int,
                  lengths: Sequence[ArrayLike] | None = None, **kwargs) -> ShapedMixtureBatchSampler:
        """Random fixed-size batches (one group), shares measured in tokens when ``lengths`` are given, else rows."""
        groups = [np.zeros(int(n), dtype=np.int64) for n in num_rows]
        sizes = None if lengths is None else [np.maximum(np.asarray(v, dtype=np.float64), 1.0) for v in lengths]
        out = cls(groups, schedule, batch_sizes={0: batch_size}, sizes=sizes, **kwargs)
        out.unit_name = "rows" if lengths is None else "tokens"
        out.group_labels = [f"{batch_size} rows"]
        return out
