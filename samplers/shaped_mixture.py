"""Mixtures inside shaped batches: every step keeps one shape (a 2^k bucket, a duration bucket) and is filled
from several domains in the proportions of a schedule, measured in tokens or seconds.

Joins "Dataset Decomposition: Faster LLM Training with Variable Sequence Length Curriculum" (Pouransari et al.,
NeurIPS 2024), domain up-sampling ("Does your data spark joy?", Blakeney et al., 2024), RegMix mixtures (Liu et
al., ICLR 2025) and duration bucketing (Żelasko et al., 2025; Lhotse's ``CutSet.mux``).

Definitions:

* Domain ``d`` (in ``schedule.domains`` order) owns global rows ``[offset_d, offset_d + n_d)``; each row has a
  *group* (its bucket; ``-1``: left out and counted) and a *size* in the run's unit (tokens, seconds, rows).
  A step of group ``g`` gives every rank ``batch_sizes[g]`` rows of that group: one shape on every rank.
* The epoch is one run of ``total_steps`` steps. The group of each step: the run is cut into segments (each
  phase of a piecewise schedule, split into ``cycles``); in a segment, group ``g`` gets steps in proportion to
  the units the segment's mean weights ask of it (``sum_d w_d * share of d's units in g``), and the steps are
  ordered by the curriculum draw of ``native.curriculum_order`` (odds per group: ``grow-p2`` puts short
  sequences first, as in the paper).
* The rows of each domain at each step come from ``native.shaped_counts``: its outstanding need in units,
  rounded by largest remainder, error carried forward, so shares hold over any window; a domain without rows in
  the step's group is made up for by the others and catches up later. Across ranks the step's slots are dealt
  in strides from a seeded offset, so every rank gets the same number of rows and each domain's rows split
  evenly (to within one) across ranks.
* Domain ``d``'s rows of group ``g`` are a stream: pass after pass of a stateless Feistel permutation
  (``native.feistel``, keyed by ``(seed, epoch, d, g, pass)``). Passes are counted per domain (in units) and per
  group; a domain read more than ``max_passes`` times emits ``PlanWarning`` once per epoch (``strict=True``:
  ``ValueError``).

Memory: per step one group id, the domain counts and the stream positions (int64 ``[total_steps, D]`` twice),
plus the row ids sorted by group; a batch is computed on its own from its step's row, so resume is O(1) and no
plan the size of the run is materialised. Up to ``samplers.shaped_scale.EXACT_MAX_ROWS`` rows (all domains) the
metadata and the rows by group are numpy arrays in RAM. Above it (issue 15: 1e9 rows in < 2 GiB per rank) the
metadata stays as given (``np.load(..., mmap_mode="r")`` stays a memory map, never copied whole): per-group rows
and units come from chunked passes kept in ``samplers.plan_cache`` (a fresh process skips them), and the rows by
group are a memory-mapped file sorted by counting (:mod:`samplers.shaped_scale`), the same order as the in-RAM
stable argsort, so the plan is the same on both paths (estimated bins aside: a sample of ``SAMPLE_ROWS`` values
above that many rows). The ``from_*`` constructors are in :mod:`samplers.shaped_constructors`, the step groups in
:mod:`samplers.shaped_steps`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.feistel import mix_prefix, stream_batches
from native.shaped_counts import shaped_counts
from samplers import shaped_scale as scale
from samplers.base import BatchSamplerBase, Plan, PlanStats, PlanWarning
from samplers.mixture import schedule_weights
from samplers.shaped_constructors import ShapedMixtureConstructors
from samplers.shaped_steps import present_groups, run_segments, step_groups

__all__ = ["ShapedMixtureBatchSampler"]

_ITER_CHUNK = 64  # steps computed together while iterating
_MAX_PLAN_ROWS = 1 << 26  # global_plan() refuses to materialise more rows


class ShapedMixtureBatchSampler(ShapedMixtureConstructors, BatchSamplerBase):
    """Shaped batches (one group per step on every rank) whose domain shares follow ``schedule.weights_at``.

    Prefer the constructors :meth:`from_decomposed`, :meth:`from_durations`, :meth:`from_lengths` and
    :meth:`from_rows`, which derive groups, sizes and batch sizes from metadata.

    Args:
        groups: one int array ``[n_d]`` per domain (``schedule.domains`` order): the group of each row, ``-1``
            to leave a row out (counted in ``stats()["dropped"]``); a memory map is read in chunks above
            ``EXACT_MAX_ROWS`` rows (group ids then ``<= samplers.shaped_scale.MAX_GROUP``). The constructors may
            pass :class:`samplers.shaped_scale.RowSource` objects instead (groups derived from a length or
            duration while counting; ``sizes`` is then None).
        schedule: object with ``.domains`` and ``weights_at(step, total_steps)`` (``mixtures.schedules``).
        batch_sizes: dict group -> rows per rank per step (``>= 1``) for every group that occurs.
        total_steps: steps of the run (the epoch); every rank yields this many batches.
        sizes: one float array ``[n_d]`` per domain: units (tokens, seconds) of each row, or a dict group ->
            units of every row of that group (``2^k`` slots); default 1 (rows).
        group_odds: dict group -> curriculum odds (``>= 0``; 0 leaves the group out); default 1 for all.
        cycles: curriculum cycles per schedule phase.
        max_passes: passes over a domain (in units) above which a ``PlanWarning`` is emitted.
        strict: raise ``ValueError`` instead of warning.
        seed, rank, world_size: as in every sampler.
    """

    _state_keys = ("num_rows", "total_steps", "plan_fingerprint")
    #: the plan (groups of steps, per-rank counts) depends on the world size: resume with the same one
    _elastic = False

    def __init__(self, groups: Sequence[ArrayLike], schedule, batch_sizes: Mapping[int, int], *, total_steps: int,
                 sizes: Sequence[ArrayLike] | Mapping[int, float] | None = None,
                 group_odds: Mapping[int, float] | None = None, cycles: int = 1, max_passes: float = 4.0,
                 strict: bool = False, seed: int = 0, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=False, strict=strict)
        if not hasattr(schedule, "weights_at") or not hasattr(schedule, "domains"):
            raise TypeError("schedule must have .domains and weights_at(step, total_steps) "
                            f"(got {type(schedule).__name__})")
        self.domains = tuple(schedule.domains)
        D = len(self.domains)
        if len(groups) != D:
            raise ValueError(f"groups must hold one array per domain of the schedule ({D}: {list(self.domains)}), "
                             f"got {len(groups)}")
        if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1 (got {total_steps=})")
        if not isinstance(cycles, (int, np.integer)) or cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1 (got {cycles=})")
        if not max_passes > 0:
            raise ValueError(f"max_passes must be > 0 (got {max_passes=})")
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.cycles = int(cycles)
        self.max_passes = float(max_passes)
        per_group = isinstance(sizes, Mapping)  # one size per group (2^k slots): no per-row array
        #: above EXACT_MAX_ROWS rows: chunked passes and rows by group on disk (samplers.shaped_scale)
        self._sources: list[scale.RowSource] | None = None
        g_arrs, s_arrs = [], []
        if scale.at_scale(groups):
            if sizes is not None and not per_group and any(isinstance(g, scale.RowSource) for g in groups):
                raise TypeError("sizes must be None when groups are RowSources (they carry their sizes)")
            self._sources = [g if isinstance(g, scale.RowSource) else
                             scale.groups_source(g, None if sizes is None or per_group else sizes[d],
                                                 f"groups[{d}] (domain {name!r})", f"sizes[{d}] (domain {name!r})")
                             for d, (g, name) in enumerate(zip(groups, self.domains))]
            scans = scale.scan_all(self._sources)
            present = scale.present_groups_of(scans)
        else:
            for d, name in enumerate(self.domains):
                g = np.asarray(groups[d])
                if g.ndim != 1 or g.dtype.kind not in "iu":
                    raise TypeError(f"groups[{d}] (domain {name!r}) must be a 1-D integer array (got {g.dtype}, "
                                    f"{g.shape})")
                if len(g) and g.min() < -1:
                    raise ValueError(f"groups[{d}] (domain {name!r}) has {int(g.min())} at row {int(np.argmin(g))}; "
                                     "groups are >= 0, or -1 to leave a row out")
                s = None
                if sizes is not None and not per_group:
                    s = np.asarray(sizes[d], dtype=np.float64)
                    if s.shape != g.shape:
                        raise ValueError(f"sizes[{d}] (domain {name!r}) has shape {s.shape}, groups[{d}] {g.shape}")
                    bad = np.flatnonzero((g >= 0) & ~(np.isfinite(s) & (s > 0)))
                    if len(bad):
                        raise ValueError(f"sizes[{d}] (domain {name!r}) must be finite and > 0: row {int(bad[0])} "
                                         f"has {s[bad[0]]}")
                g_arrs.append(g)
                s_arrs.append(s)
            present = sorted(set().union(*(present_groups(g) for g in g_arrs)))
        if not isinstance(batch_sizes, Mapping):
            raise TypeError(f"batch_sizes must be a dict group -> rows per rank (got {type(batch_sizes).__name__})")
        missing = [k for k in present if k not in batch_sizes]
        if missing:
            raise ValueError(f"batch_sizes has no entry for group(s) {missing}; give rows per rank for each of "
                             f"{present}")
        for k in present:
            b = batch_sizes[k]
            if not isinstance(b, (int, np.integer)) or b < 1:
                raise ValueError(f"batch_sizes[{k}] must be an integer >= 1 (got {b!r})")
        odds_of = {k: 1.0 for k in present} if group_odds is None else {k: float(group_odds.get(k, 0.0))
                                                                         for k in present}
        if any(not np.isfinite(o) or o < 0 for o in odds_of.values()):
            raise ValueError(f"group_odds must be finite and >= 0 (got {group_odds})")
        self.group_ids = np.array(present, dtype=np.int64)
        G = len(present)
        self.batch_sizes = np.array([int(batch_sizes[k]) for k in present], dtype=np.int64)
        self.odds = np.array([odds_of[k] for k in present], dtype=np.float64)
        self.domain_rows = np.array([src.n for src in self._sources] if self._sources is not None else
                                    [len(g) for g in g_arrs], dtype=np.int64)
        self.domain_offsets = np.concatenate([[0], np.cumsum(self.domain_rows)]).astype(np.int64)
        self.num_rows = int(self.domain_offsets[-1])
        if per_group:
            bad = [k for k in present if not (k in sizes and np.isfinite(sizes[k]) and sizes[k] > 0)]
            if bad:
                raise ValueError(f"sizes (per group) must give a finite size > 0 for every group (bad or missing: "
                                 f"{bad})")
        avail = np.zeros((D, G), dtype=np.int64)
        units = np.zeros((D, G), dtype=np.float64)
        self.excluded = np.zeros(D, dtype=np.int64)
        if self._sources is not None:  # the same tables from the counting passes (units added in row order)
            for d, t in enumerate(scans):
                c, u = np.asarray(t["counts"]), np.asarray(t["units"])
                at = self.group_ids + 1
                inside = at < len(c)
                avail[d, inside] = c[at[inside]]
                self.excluded[d] = int(c[0])
                if per_group:
                    units[d] = avail[d] * np.array([float(sizes[k]) for k in present])
                else:
                    units[d] = avail[d] if self._sources[d].sizes is None and self._sources[d].values is None \
                        else np.where(inside, u[np.minimum(at, len(u) - 1)], 0.0)
        for d, (g, s) in enumerate(zip(g_arrs, s_arrs)):
            neg = (g < 0) if len(g) and g.min() < 0 else None
            gk = g if neg is None else g[~neg]
            self.excluded[d] = 0 if neg is None else int(neg.sum())
            dg = np.searchsorted(self.group_ids, gk)
            avail[d] = np.bincount(dg, minlength=G)
            if per_group:
                units[d] = avail[d] * np.array([float(sizes[k]) for k in present])
            else:
                units[d] = avail[d] if s is None else np.bincount(dg, weights=s if neg is None else s[~neg],
                                                                  minlength=G)
        self.avail, self.units = avail, units
        self._groups = g_arrs  # the callers' arrays (memory maps stay memory maps); rows by group built lazily
        self._members: list[NDArray[np.int64]] | None = None
        self._index: scale.RowsIndex | None = None
        self._member_offsets = np.zeros((D, G), dtype=np.int64)
        self._member_offsets[1:] = np.cumsum(avail, axis=0)[:-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.unit = np.where(avail > 0, units / np.maximum(avail, 1), 0.0)
        self._weights = schedule_weights(schedule, self.total_steps, D)
        usable_units = (units * (self.odds > 0)[None, :]).sum(axis=1)
        starving = [self.domains[d] for d in range(D) if self._weights[:, d].max() > 0 and usable_units[d] == 0]
        if starving:
            raise ValueError(f"domain(s) {starving} have weight in the schedule but no rows in a group with odds > 0 "
                             "(all rows left out or in zero-odds groups); give them rows or weight 0")
        # what the plan is a function of, besides (seed, epoch, world_size): checked on load
        desc = (f"groups={present};batch_sizes={self.batch_sizes.tolist()};odds={self.odds.tolist()};"
                f"cycles={self.cycles};rows={self.domain_rows.tolist()};avail={avail.tolist()};"
                f"schedule={hashlib.sha1(self._weights.tobytes()).hexdigest()[:16]};"
                f"units={hashlib.sha1(units.tobytes()).hexdigest()[:16]}")
        self.plan_fingerprint = hashlib.sha1(desc.encode()).hexdigest()[:20]
        self.unit_name = "rows" if sizes is None else "units"
        self.group_labels = [str(k) for k in present]
        self.shape_units = np.full(G, np.nan)  # padded units of one row of a group (2^k, the bucket's max)
        self.real_unit = self.unit  # mean real units per row (less than shape for padded remainders)
        #: reason -> rows left out (group -1); a constructor may name the reason before calling __init__
        self.dropped_by_reason: dict[str, int] = getattr(self, "dropped_by_reason", {})
        self._tables_cache: tuple | None = None
        self._warned_epoch: int | None = None
        self._tables(0)  # validates, warns about repeats up front

    # ---- plan ---------------------------------------------------------------------------------------------------
    def _step_groups(self, epoch: int) -> NDArray[np.int64]:
        """Dense group of every step (:func:`samplers.shaped_steps.step_groups` of this run)."""
        segments = run_segments(self.schedule, self.total_steps, self.cycles)
        return step_groups(self.units, self.odds, self.unit, self._weights, self.batch_sizes * self.world_size,
                           segments, [self.epoch_seed(epoch, 0xC0BB, i) for i in range(len(segments))])

    def _tables(self, epoch: int):
        """``(step_group [T], counts int64 [T, D], starts int64 [T, D], deal_offset int64 [T], need [D, G],
        fallback_steps)`` of an epoch (cached for the latest one)."""
        key = (self.seed, epoch, self.world_size)
        if self._tables_cache is not None and self._tables_cache[0] == key:
            return self._tables_cache[1]
        W = self.world_size
        step_group = self._step_groups(epoch)
        counts, fallback = shaped_counts(step_group, self._weights, self.unit, self.avail, self.batch_sizes * W,
                                         self.epoch_seed(epoch, 0x7E5))
        starts = np.empty_like(counts)
        G = len(self.group_ids)
        need = np.zeros((len(self.domains), G), dtype=np.int64)
        for g in range(G):
            sel = np.flatnonzero(step_group == g)
            if len(sel):
                c = counts[sel]
                cs = np.cumsum(c, axis=0)
                starts[sel] = cs - c
                need[:, g] = cs[-1]
        deal = np.random.default_rng(self.epoch_seed(epoch, 0xDEA1)).integers(0, W, self.total_steps)
        tables = (step_group, counts, starts, deal.astype(np.int64), need, fallback)
        self._tables_cache = (key, tables)
        self._check_passes(epoch, need)
        if self._dropped():  # rows no step can take (longer than the budget): counted, and warned once per epoch
            self._announce(epoch, self._dropped(), {})
        return tables

    def _dropped(self) -> dict[str, int]:
        dropped = dict(self.dropped_by_reason)
        other = int(self.excluded.sum()) - sum(dropped.values())
        if other > 0:
            dropped["outside_groups"] = other
        return dropped

    def _passes(self, need: NDArray[np.int64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Passes per domain (units read / units held) and per (domain, group) (rows read / rows held)."""
        read = (need * self.unit).sum(axis=1)
        held = self.units.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            by_group = np.where(self.avail > 0, need / np.maximum(self.avail, 1), 0.0)
        return np.where(held > 0, read / np.maximum(held, 1e-300), 0.0), by_group

    def _check_passes(self, epoch: int, need: NDArray[np.int64]) -> None:
        passes, _ = self._passes(need)
        bad = np.flatnonzero(passes > self.max_passes + 1e-12)
        if not len(bad) or self._warned_epoch == epoch:
            return
        d = int(bad[0])
        msg = (f"domain {self.domains[d]!r} is read {passes[d]:.2f} times in epoch {epoch} (max_passes="
               f"{self.max_passes:g}): it repeats rows; lower its weight, add rows, shorten total_steps or raise "
               "max_passes" + (f" ({len(bad)} domains in all)" if len(bad) > 1 else ""))
        if self.strict:
            raise ValueError(msg)
        self._warned_epoch = epoch
        warnings.warn(msg, PlanWarning, stacklevel=3)

    def rank_counts(self, steps: NDArray[np.int64], rank: int, epoch: int | None = None
                    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``(counts, starts)`` int64 ``[len(steps), D]``: rows of each domain in rank ``rank``'s batch at
        ``steps`` and their first stream positions. The step's slots, domain after domain, are dealt to ranks
        in strides from a seeded offset: slot ``i`` goes to rank ``(i + offset) % world_size``."""
        step_group, counts, starts, deal, _, _ = self._tables(self.epoch if epoch is None else epoch)
        W = self.world_size
        c = counts[steps]
        first = np.cumsum(c, axis=1) - c + deal[steps][:, None]  # [n, D] first slot of each domain, shifted

        def upto(m, r):  # slots j in [0, m) with j % W == r
            return (m + W - 1 - r) // W

        mine = upto(first + c, rank) - upto(first, rank)
        before = np.zeros_like(c)
        for r in range(rank):
            before += upto(first + c, r) - upto(first, r)
        return mine, starts[steps] + before

    def _rows_by_group(self) -> list[NDArray[np.int64]]:
        """Global row ids sorted by group, each group's domains one after the other (built on first use: the
        dry run never needs them)."""
        if self._members is None:
            G = len(self.group_ids)
            blocks: list[list[NDArray[np.int64]]] = [[] for _ in range(G)]
            for d, g in enumerate(self._groups):
                keep = np.flatnonzero(g >= 0)
                # dense group ids as small ints: numpy's stable sort of 16-bit keys is a radix sort, O(n)
                dg = np.searchsorted(self.group_ids, g[keep]).astype(np.int16 if G < 1 << 15 else np.int64)
                order = keep[np.argsort(dg, kind="stable")]
                bounds = np.concatenate([[0], np.cumsum(self.avail[d])])
                for i in range(G):
                    blocks[i].append(order[bounds[i] : bounds[i + 1]] + self.domain_offsets[d])
            self._members = [np.concatenate(b) if b else np.zeros(0, np.int64) for b in blocks]
        return self._members

    def _member_rows(self, g: int, pos: NDArray[np.int64]) -> NDArray[np.int64]:
        """Global rows at positions ``pos`` of dense group ``g``'s rows (domain after domain, in row order): from
        the in-RAM argsort, or above ``EXACT_MAX_ROWS`` from the memory-mapped rows by group
        (:func:`samplers.shaped_scale.rows_index`, the same order)."""
        if self._sources is None:
            return self._rows_by_group()[g][pos]
        if self._index is None:
            self._index = scale.rows_index(self._sources, self.group_ids, self.avail, self.excluded)
        return self._index.take(g, pos)

    def _rank_batches(self, epoch: int, steps: NDArray[np.int64], rank: int) -> list[NDArray[np.int64]]:
        step_group = self._tables(epoch)[0]
        W = self.world_size
        mine, starts = self.rank_counts(steps, rank, epoch)
        out: list = [None] * len(steps)
        grp = step_group[steps]
        shuffle = mix_prefix(self.epoch_seed(epoch, 0xBA7C4))
        for g in np.unique(grp).tolist():
            sel = np.flatnonzero(grp == g)
            gid = int(self.group_ids[g])
            prefixes = np.array([mix_prefix(self.seed, epoch, d, gid) for d in range(len(self.domains))],
                                dtype=np.uint64)
            pos = stream_batches(starts[sel], mine[sel], self.avail[:, g], self._member_offsets[:, g], prefixes,
                                 steps[sel] * W + rank, shuffle)
            rows = self._member_rows(g, pos)
            b = int(self.batch_sizes[g])
            for j, i in enumerate(sel.tolist()):
                out[i] = rows[j * b : (j + 1) * b]
        return out

    def _build_plan(self, epoch: int) -> Plan:
        """The materialised global plan, step-major (small runs: tests and inspection)."""
        T, W = self.total_steps, self.world_size
        rows = int((self.batch_sizes[self._tables(epoch)[0]] * W).sum())
        if rows > _MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {rows} rows (> {_MAX_PLAN_ROWS}); iterate instead")
        steps = np.arange(T, dtype=np.int64)
        per_rank = [self._rank_batches(epoch, steps, r) for r in range(W)]
        batches = [per_rank[r][s] for s in range(T) for r in range(W)]
        sizes = np.array([len(b) for b in batches], dtype=np.int64)
        groups = np.repeat(self.group_ids[self._tables(epoch)[0]], W)
        return Plan.from_sizes(np.concatenate(batches), sizes, groups=groups, repeated=self._repeated(epoch))

    def global_plan(self) -> Plan:
        """Every rank's batches of the current epoch, step-major, materialised (small runs only)."""
        return self._build_plan(self.epoch)

    def _repeated(self, epoch: int) -> dict:
        need = self._tables(epoch)[4]
        rep = int(np.maximum(need - self.avail, 0).sum())
        return {"domain_repeat": rep} if rep else {}

    # ---- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[NDArray[np.int64]]:
        epoch, T = self.epoch, self.total_steps
        self._tables(epoch)
        for s0 in range(self._begin_pass(), T, _ITER_CHUNK):
            s1 = min(T, s0 + _ITER_CHUNK)
            batches = self._rank_batches(epoch, np.arange(s0, s1, dtype=np.int64), self.rank)
            for j, b in enumerate(batches):
                self._yielded = s0 + j + 1
                yield b.copy()
        self._yielded = 0

    def __len__(self) -> int:
        return self.total_steps

    # ---- statistics ----------------------------------------------------------------------------------------------
    def step_groups(self, epoch: int | None = None) -> NDArray[np.int64]:
        """The group id (e.g. ``k`` of a ``2^k`` bucket) of every step: int64 ``[total_steps]``."""
        return self.group_ids[self._tables(self.epoch if epoch is None else epoch)[0]]

    def step_units(self, epoch: int | None = None) -> NDArray[np.float64]:
        """Units (tokens, seconds; expected values where rows differ in size) per step and domain, all ranks:
        float64 ``[total_steps, D]``."""
        step_group, counts = self._tables(self.epoch if epoch is None else epoch)[:2]
        return counts * self.unit.T[step_group]

    def stats(self) -> PlanStats:
        """Plan statistics from the counts (nothing materialised): the keys of every sampler
        (:class:`samplers.PlanStats`) plus units and passes per domain, target and realised shares, steps per
        group, padding, drops and repeats."""
        step_group, counts, _, _, need, fallback = self._tables(self.epoch)
        T, W = self.total_steps, self.world_size
        passes, by_group = self._passes(need)
        read = (need * self.unit).sum(axis=1)
        real = (need * self.real_unit).sum(axis=1)
        shape_total = float(np.nansum(need * self.shape_units[None, :]))
        total = max(float(read.sum()), 1e-300)
        rows_per_step = self.batch_sizes[step_group] * W
        dropped = self._dropped()
        steps_per_group = np.bincount(step_group, minlength=len(self.group_ids))
        D = self.domains
        shared: PlanStats = {
            "epoch": self.epoch, "num_batches": T * W, "batches_per_rank": T, "rows": int(rows_per_step.sum()),
            "mean_batch_size": float(rows_per_step.mean() / W), "min_batch_size": int(rows_per_step.min() // W),
            "max_batch_size": int(rows_per_step.max() // W), "dropped_rows": int(sum(dropped.values())),
            "dropped": dropped, "repeated": self._repeated(self.epoch),
        }
        return cast(PlanStats, {
            **shared,
            "total_steps": T, "world_size": W, "domains": list(D), "unit": self.unit_name,
            "units": {d: float(x) for d, x in zip(D, read)},
            "rows_read": {d: int(x) for d, x in zip(D, need.sum(axis=1))},
            "passes": {d: float(p) for d, p in zip(D, passes)},
            "passes_by_group": {d: {lab: float(by_group[i, g]) for g, lab in enumerate(self.group_labels)
                                    if self.avail[i, g] > 0} for i, d in enumerate(D)},
            "repeated_rows": {d: int(np.maximum(need[i] - self.avail[i], 0).sum()) for i, d in enumerate(D)},
            "unread_rows": {d: int(np.maximum(self.avail[i] - need[i], 0).sum()) for i, d in enumerate(D)},
            "target_shares": {d: float(w) for d, w in zip(D, self._weights.mean(axis=0))},
            "realised_shares": {d: float(x) / total for d, x in zip(D, read)},
            "steps_per_group": {lab: int(n) for lab, n in zip(self.group_labels, steps_per_group)},
            "rows_per_batch": {lab: int(b) for lab, b in zip(self.group_labels, self.batch_sizes)},
            "real_units": float(real.sum()),
            "padded_units": shape_total if np.isfinite(self.shape_units).all() else None,
            "padding_fraction": (1.0 - float(real.sum()) / shape_total) if shape_total > 0 and
            np.isfinite(self.shape_units).all() else None,
            "fallback_steps": int(fallback),
            "max_passes": self.max_passes,
        })
