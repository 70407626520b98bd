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

from samplers import shaped_scale as scale
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

        logs: list = []
        max_log2 = 0
        for d, ix in enumerate(indexes):
            if getattr(ix, "sequence_log2", None) is None:
                raise TypeError(f"indexes[{d}] must have a 'sequence_log2' array (got {type(ix).__name__})")
        # above EXACT_MAX_ROWS sequences: the arrays stay as given (memory maps), read in chunked passes
        big = sum(len(ix.sequence_log2) for ix in indexes) > scale.EXACT_MAX_ROWS
        srcs = [scale.groups_source(ix.sequence_log2, None, f"indexes[{d}].sequence_log2", "")
                for d, ix in enumerate(indexes)] if big else []
        scans = scale.scan_all(srcs) if big else []
        for d, ix in enumerate(indexes):
            m = getattr(ix, "max_log2", None)
            if big:
                logs.append(srcs[d])
                hi = max(0, len(scans[d]["counts"]) - 2)  # counts end at the largest present k
            else:
                lg = np.asarray(ix.sequence_log2, dtype=np.int64)
                logs.append(lg)
                hi = int(lg.max()) if len(lg) else 0
            max_log2 = max(max_log2, hi, int(m) if m is not None else 0)
        unit = 1 << max_log2
        if not isinstance(tokens_per_batch, (int, np.integer)) or tokens_per_batch < unit or tokens_per_batch % unit:
            raise ValueError(f"tokens_per_batch must be a positive multiple of 2^max_log2={unit} so every bucket gets "
                             f"whole sequences (got {tokens_per_batch=}); e.g. tokens_per_batch={unit * 8}")
        ks = scale.present_groups_of(scans) if big else sorted(set().union(*(present_groups(lg) for lg in logs)))
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
            if big:  # the same sums, in row order, from a chunked pass (a bucket of 2^k tokens each: exact)
                if tok is None:
                    real[d] = np.where(out.avail[d] > 0, np.exp2(out.group_ids.astype(np.float64)), 0.0)
                    continue
                t = scale.scan(scale.groups_source(lg.groups, tok, lg.name, f"indexes[{d}].sequence_tokens",
                                                   check_sizes=False))
                at = out.group_ids + 1
                u = np.asarray(t["units"])
                sums = np.where(at < len(u), u[np.minimum(at, len(u) - 1)], 0.0)
                real[d] = np.where(out.avail[d] > 0, sums / np.maximum(out.avail[d], 1), 0.0)
                continue
            tok = np.exp2(lg) if tok is None else np.asarray(tok, dtype=np.float64)
            dense = np.searchsorted(out.group_ids, lg)
            sums = np.bincount(dense, weights=tok, minlength=len(out.group_ids))
            real[d] = np.where(out.avail[d] > 0, sums / np.maximum(out.avail[d], 1), 0.0)
        out.real_unit = real
        return out

    @classmethod
    def _bucketed(cls, values: Sequence[ArrayLike], schedule, *, budget: float, cost, bins, num_buckets: int,
                  max_rows: int | None, unit_name: str, long_reason: str, floor: bool = False,
                  quadratic: float | None = None, param: str = "values", **kwargs) -> ShapedMixtureBatchSampler:
        from samplers.bins import estimate_duration_bins

        if scale.at_scale(values):
            return cls._bucketed_at_scale(values, schedule, budget=budget, cost=cost, bins=bins,
                                          num_buckets=num_buckets, max_rows=max_rows, unit_name=unit_name,
                                          long_reason=long_reason, floor=floor, quadratic=quadratic, param=param,
                                          **kwargs)
        vals = [np.maximum(np.asarray(v, dtype=np.float64), 1.0) if floor else np.asarray(v, dtype=np.float64)
                for v in values]
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
        return cls._finish_bucketed(groups, vals, schedule, upper, budget=budget, cost=cost, max_rows=max_rows,
                                    dropped=dropped, unit_name=unit_name, long_reason=long_reason, **kwargs)

    @classmethod
    def _finish_bucketed(cls, groups, vals, schedule, upper, *, budget, cost, max_rows, dropped, unit_name,
                         long_reason, **kwargs) -> ShapedMixtureBatchSampler:
        """Batch sizes from the buckets' padded lengths ``upper``, then the sampler."""
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
    def _bucketed_at_scale(cls, values: Sequence[ArrayLike], schedule, *, budget: float, cost, bins,
                           num_buckets: int, max_rows: int | None, unit_name: str, long_reason: str, floor: bool,
                           quadratic: float | None, param: str, **kwargs) -> ShapedMixtureBatchSampler:
        """:meth:`_bucketed` above ``EXACT_MAX_ROWS`` rows: the values stay as given (memory maps), buckets and
        totals come from chunked passes (:mod:`samplers.shaped_scale`), estimated bins from an evenly strided
        sample (every value when there are at most ``SAMPLE_ROWS``)."""
        vals = []
        for d, v in enumerate(values):
            a = v if isinstance(v, np.ndarray) else np.asarray(v)
            if a.ndim != 1 or a.dtype.kind not in "iuf":
                raise TypeError(f"{param}[{d}] must be a 1-D array of numbers (got {a.dtype}, {a.shape})")
            vals.append(a)
        if bins is None:
            bins = scale.estimated_bins(vals, floor=floor, budget=float(budget), num_buckets=num_buckets,
                                        quadratic=0.0 if quadratic is None else float(quadratic))
        bins = np.asarray(bins, dtype=np.float64)
        if bins.ndim != 1 or (np.diff(bins) <= 0).any():
            raise ValueError(f"bucket bins must be 1-D increasing boundaries (got {bins.tolist()})")
        srcs = [scale.RowSource(len(v), f"{param}[{d}]", values=v, bins=bins, budget=float(budget),
                                quadratic=0.0 if quadratic is None else float(quadratic), floor=floor)
                for d, v in enumerate(vals)]
        scans = scale.scan_all(srcs)  # the pass also writes the rows' buckets for the first batch
        dropped = sum(int(t["counts"][0]) for t in scans)
        longest = [float(t["longest"]) for t in scans if np.isfinite(t["longest"])]
        upper = np.append(bins, max(longest, default=bins[-1] if len(bins) else 1.0))
        return cls._finish_bucketed(srcs, None, schedule, upper, budget=budget, cost=cost, max_rows=max_rows,
                                    dropped=dropped, unit_name=unit_name, long_reason=long_reason, **kwargs)

    @classmethod
    def from_durations(cls, durations: Sequence[ArrayLike], schedule, *, max_duration: float, num_buckets: int = 30,
                       duration_bins: ArrayLike | None = None, quadratic_duration: float | None = None,
                       max_cuts: int | None = None, **kwargs) -> ShapedMixtureBatchSampler:
        """Speech: one duration bucket per step, ``n * cost(bucket max) <= max_duration`` (Lhotse's names).

        Args:
            durations: one float array ``[n_d]`` of seconds per domain (memory maps are read in chunks above
                ``samplers.shaped_scale.EXACT_MAX_ROWS`` cuts, never copied whole).
            max_duration: padded seconds per rank per batch; cuts costing more are left out and counted.
            num_buckets: buckets estimated over all domains' durations (equal total duration, as Lhotse); above
                ``samplers.shaped_scale.SAMPLE_ROWS`` cuts over an evenly strided sample of that many.
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
                             long_reason="longer_than_max_duration", quadratic=q, param="durations", **kwargs)

    @classmethod
    def from_lengths(cls, lengths: Sequence[ArrayLike], schedule, *, max_tokens: int, num_buckets: int = 8,
                     bucket_bins: ArrayLike | None = None, max_rows: int | None = None,
                     **kwargs) -> ShapedMixtureBatchSampler:
        """Token budget: one length bucket per step, ``n * bucket max length <= max_tokens`` per rank.

        Args:
            lengths: one int array ``[n_d]`` of tokens per row per domain; rows longer than ``max_tokens`` are
                left out and counted. Memory maps are read in chunks above ``samplers.shaped_scale.EXACT_MAX_ROWS``
                rows (never copied whole).
            num_buckets / bucket_bins: length buckets (equal total tokens; estimated over an evenly strided sample
                of ``samplers.shaped_scale.SAMPLE_ROWS`` rows above that many) or explicit boundaries.
            max_rows: cap on rows per batch.
        """
        if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1 (got {max_tokens=})")
        # floor=True: an empty row costs a slot (its length counts as 1)
        return cls._bucketed(lengths, schedule, budget=float(max_tokens), cost=lambda v: v, bins=bucket_bins,
                             num_buckets=num_buckets, max_rows=max_rows, unit_name="tokens",
                             long_reason="longer_than_max_tokens", floor=True, param="lengths", **kwargs)

    @classmethod
    def from_rows(cls, num_rows: Sequence[int], schedule, *, batch_size: int,
                  lengths: Sequence[ArrayLike] | None = None, **kwargs) -> ShapedMixtureBatchSampler:
        """Random fixed-size batches (one group), shares measured in tokens when ``lengths`` are given, else rows.

        Above ``EXACT_MAX_ROWS`` rows no per-row array is made: group 0 is every row, and ``lengths`` (memory maps
        stay memory maps) are summed in chunks."""
        if sum(int(n) for n in num_rows) > scale.EXACT_MAX_ROWS:
            groups = []
            for d, n in enumerate(num_rows):
                v = None if lengths is None else lengths[d] if isinstance(lengths[d], np.ndarray) else \
                    np.asarray(lengths[d])
                if v is not None and (v.ndim != 1 or len(v) != int(n) or v.dtype.kind not in "iuf"):
                    raise ValueError(f"lengths[{d}] must be 1-D numbers of num_rows[{d}]={int(n)} rows (got "
                                     f"{v.dtype}, {v.shape})")
                groups.append(scale.RowSource(int(n), f"lengths[{d}]", values=v, bins=np.zeros(0), floor=True)
                              if v is not None else scale.RowSource(int(n), f"num_rows[{d}]"))
            sizes = None
        else:
            groups = [np.zeros(int(n), dtype=np.int64) for n in num_rows]
            sizes = None if lengths is None else [np.maximum(np.asarray(v, dtype=np.float64), 1.0) for v in lengths]
        out = cls(groups, schedule, batch_sizes={0: batch_size}, sizes=sizes, **kwargs)
        out.unit_name = "rows" if lengths is None else "tokens"
        out.group_labels = [f"{batch_size} rows"]
        return out
