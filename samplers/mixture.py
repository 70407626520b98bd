"""Scheduled mixture batches: each step's batch composition follows a domain-weight schedule.

Implements the data side of "RegMix: Data Mixture as Regression for Language Model Pre-training" (Liu et al.,
ICLR 2025) and "Does your data spark joy? Performance gains from domain upsampling at the end of training"
(Blakeney et al., 2024): a schedule (any object with ``.domains`` and a pure ``weights_at(step, total_steps)``)
says what fraction of each batch comes from each domain at each step.

Definitions:

* Rows index the concatenation of the domains in ``schedule.domains`` order: domain ``d`` owns rows
  ``[offset_d, offset_d + size_d)`` (a ``ConcatDataset`` of per-domain datasets in that order, or one dataset
  sorted by its ``domain`` column).
* The sampler's epoch is one run of ``total_steps`` steps (the whole training run, not a pass over the rows).
  ``set_epoch(e)`` starts an independent run with fresh randomness.
* ``batch_size`` is rows per rank per step: at step ``s`` rank ``r`` yields global batch ``s * world_size + r``.
  Each batch is composed on its own: ``mode="stratified"`` gives exact counts by largest remainder of
  ``weights_at(s) * batch_size`` (ties broken by a seeded draw so no domain is favoured systematically),
  ``mode="random"`` draws the counts from a multinomial. Every rank yields ``total_steps`` batches.
* Within a domain rows come from a fresh seeded permutation each pass; the passes a run needs are counted
  (``stats()["passes"]``) and ``max_repeat`` (passes allowed per domain) raises a clear error up front.
* Nothing is dropped; rows of the last, partial pass of a domain that a run does not reach are reported as
  ``stats()["unused_rows_last_pass"]``, and repeated row slots as ``plan.repeated["domain_repeat"]``.

The plan is a pure function of (sizes, schedule, seed, epoch, batch_size, total_steps, world_size), so resume
(also across phase boundaries) recomputes it and skips what was consumed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

from native.rng import mix_seed, permutation, shuffle_segments
from samplers.base import BatchSamplerBase, Plan

__all__ = ["MixtureBatchSampler", "largest_remainder_counts"]

MODES = ("stratified", "random")


def largest_remainder_counts(weights: NDArray[np.float64], total: int,
                             tie_keys: NDArray | None = None) -> NDArray[np.int64]:
    """Integer counts summing to ``total`` closest to ``weights * total`` (Hamilton's largest remainder).

    Args:
        weights: float64 ``[B, D]`` rows summing to 1.
        total: count per row.
        tie_keys: optional ``[B, D]`` random keys that break equal remainders (default: lower index first).

    Returns:
        int64 ``[B, D]``.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    raw = w * total
    base = np.floor(raw + 1e-9).astype(np.int64)
    short = total - base.sum(axis=1)
    if tie_keys is None:
        tie = (w.shape[1] - 1 - np.arange(w.shape[1]))[None, :] / w.shape[1]
    else:
        tie = np.asarray(tie_keys, dtype=np.float64)
        if tie.shape != w.shape or np.any(tie < 0) or np.any(tie >= 1):
            raise ValueError(f"tie_keys must be floats in [0, 1) of shape {w.shape}")
    # remainders compared to 1e-9, ties (within that) broken by the key; the top ``short`` get one more row
    key = np.round(np.maximum(raw - base, 0.0), 9) + tie * 1e-10
    order = np.argsort(-key, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(w.shape[1]), w.shape).copy(), axis=1)
    return base + (ranks < short[:, None])


class MixtureBatchSampler(BatchSamplerBase):
    """Fixed-size batches whose domain composition follows ``schedule.weights_at(step, total_steps)``.

    Args:
        domain_sizes: dict domain -> number of rows (> 0); keys must be exactly ``schedule.domains``.
        schedule: object with ``.domains`` (tuple of names) and ``weights_at(step, total_steps)`` -> float64
            ``[D]`` summing to 1 (e.g. ``mixtures.schedules.DomainUpsampling``).
        batch_size: rows per rank per step, ``>= 1``.
        total_steps: steps in the run (the epoch), ``>= 1``; every rank yields this many batches.
        mode: ``"stratified"`` (exact largest-remainder counts per batch) or ``"random"`` (multinomial counts).
        max_repeat: passes allowed over any domain in one run (None: unbounded); exceeding raises ValueError.
        seed, rank, world_size: as in every sampler.
    """

    _state_keys = ("num_rows", "batch_size", "total_steps", "mode")

    def __init__(self, domain_sizes: Mapping[str, int], schedule, *, batch_size: int, total_steps: int,
                 mode: str = "stratified", max_repeat: float | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=False)
        if not hasattr(schedule, "weights_at") or not hasattr(schedule, "domains"):
            raise TypeError("schedule must have .domains and weights_at(step, total_steps) "
                            f"(got {type(schedule).__name__})")
        domains = tuple(schedule.domains)
        if not isinstance(domain_sizes, Mapping):
            raise TypeError(f"domain_sizes must be a dict domain -> rows (got {type(domain_sizes).__name__})")
        unknown = [d for d in domain_sizes if d not in domains]
        missing = [d for d in domains if d not in domain_sizes]
        if unknown or missing:
            raise ValueError(f"domain_sizes must name exactly the schedule's domains {list(domains)}: unknown "
                             f"{unknown}, missing {missing}")
        sizes = []
        for d in domains:
            v = domain_sizes[d]
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"domain_sizes[{d!r}] must be an integer >= 1 (got {v!r}); a domain of size 0 "
                                 "cannot be sampled: leave it out of the schedule")
            sizes.append(int(v))
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1 (got {batch_size=})")
        if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1 (got {total_steps=})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (got {mode=})")
        if max_repeat is not None and not max_repeat > 0:
            raise ValueError(f"max_repeat must be > 0 or None (got {max_repeat=})")
        self.domains = domains
        self.schedule = schedule
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])
        self.batch_size = int(batch_size)
        self.total_steps = int(total_steps)
        self.mode = mode
        self.max_repeat = max_repeat
        self._weights = self._schedule_weights()
        self._counts_cache: tuple[int, NDArray[np.int64]] | None = None
        self._row_map: NDArray[np.int64] | None = None  # concatenation position -> dataset row (from_domains)
        self._check_repeat(self.counts(0))

    @classmethod
    def from_domains(cls, domain_of_row, schedule, **kwargs) -> MixtureBatchSampler:
        """A sampler over one dataset whose rows carry a domain label (``ArrowDataset.index["domain"]``).

        Rows need not be sorted by domain: the sampler yields the dataset's own row numbers. Labels must all be
        in ``schedule.domains`` and every domain must have rows.

        Args:
            domain_of_row: array ``[N]`` of domain names (str) per row.
            schedule, **kwargs: as for the constructor (``batch_size``, ``total_steps``, ...).
        """
        labels = np.asarray(domain_of_row).astype(str)
        if labels.ndim != 1:
            raise ValueError(f"domain_of_row must be 1-D (got shape {labels.shape})")
        domains = tuple(schedule.domains)
        code = {d: i for i, d in enumerate(domains)}
        uniq = np.unique(labels)
        unknown = [u for u in uniq.tolist() if u not in code]
        if unknown:
            first = int(np.flatnonzero(labels == unknown[0])[0])
            raise ValueError(f"domain_of_row has domains not in the schedule: {unknown[:5]} (first at row {first}); "
                             f"the schedule's domains are {list(domains)}")
        ids = np.vectorize(code.__getitem__, otypes=[np.int64])(labels) if len(labels) else np.zeros(0, np.int64)
        sizes = np.bincount(ids, minlength=len(domains))
        out = cls({d: int(n) for d, n in zip(domains, sizes)}, schedule, **kwargs)
        out._row_map = np.argsort(ids, kind="stable").astype(np.int64)
        return out

    # ---- composition ---------------------------------------------------------------------------------------------
    def _schedule_weights(self) -> NDArray[np.float64]:
        """``[total_steps, D]`` weights (the schedule is pure, so they are computed once)."""
        W = np.empty((self.total_steps, len(self.domains)), dtype=np.float64)
        for s in range(self.total_steps):
            w = np.asarray(self.schedule.weights_at(s, self.total_steps), dtype=np.float64)
            if w.shape != (len(self.domains),):
                raise ValueError(f"schedule.weights_at({s}) returned shape {w.shape}, expected ({len(self.domains)},)")
            if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
                raise ValueError(f"schedule.weights_at({s}) must be finite, >= 0 and sum to 1 (got {w.tolist()})")
            W[s] = w / w.sum()
        return W

    def counts(self, epoch: int | None = None) -> NDArray[np.int64]:
        """Rows per domain of every global batch of an epoch: int64 ``[total_steps * world_size, D]``."""
        epoch = self.epoch if epoch is None else epoch
        if self._counts_cache is not None and self._counts_cache[0] == epoch:
            return self._counts_cache[1]
        Wb = np.repeat(self._weights, self.world_size, axis=0)  # batch s * W + r uses step s's weights
        rng = np.random.default_rng(self.epoch_seed(epoch, 0xC0FFEE))
        if self.mode == "stratified":
            c = largest_remainder_counts(Wb, self.batch_size, rng.random(Wb.shape))
        else:
            c = rng.multinomial(self.batch_size, Wb).astype(np.int64)
        self._counts_cache = (epoch, c)
        return c

    def _check_repeat(self, counts: NDArray[np.int64]) -> None:
        if self.max_repeat is None:
            return
        need = counts.sum(axis=0)
        passes = need / self.sizes
        bad = np.flatnonzero(passes > self.max_repeat + 1e-12)
        if len(bad):
            d = bad[0]
            raise ValueError(
                f"domain {self.domains[d]!r} would be repeated {passes[d]:.2f} times ({int(need[d])} row slots over "
                f"{int(self.sizes[d])} rows) but max_repeat={self.max_repeat}; lower its weight, add rows, shorten "
                f"total_steps or raise max_repeat")

    # ---- plan ----------------------------------------------------------------------------------------------------
    def _build_plan(self, epoch: int) -> Plan:
        counts = self.counts(epoch)
        self._check_repeat(counts)
        nb = len(counts)
        rows_parts, batch_parts = [], []
        repeated = 0
        for d in range(len(self.domains)):
            need = int(counts[:, d].sum())
            if need == 0:
                continue
            size = int(self.sizes[d])
            passes = -(-need // size)
            repeated += max(0, need - size)
            stream = np.concatenate([permutation(size, mix_seed(self.seed, epoch, d, p)) for p in range(passes)])
            rows_parts.append(stream[:need] + self.offsets[d])
            batch_parts.append(np.repeat(np.arange(nb, dtype=np.int64), counts[:, d]))
        rows = np.concatenate(rows_parts) if rows_parts else np.zeros(0, np.int64)
        which = np.concatenate(batch_parts) if batch_parts else np.zeros(0, np.int64)
        rows = rows[np.argsort(which, kind="stable")]  # batch by batch, domain blocks in order
        sizes = np.full(nb, self.batch_size, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        rows = shuffle_segments(rows, offsets, self.epoch_seed(epoch, 0xBA7C4))  # mix domains inside a batch
        if self._row_map is not None:
            rows = self._row_map[rows]
        return Plan(rows.astype(np.int64), offsets, repeated={"domain_repeat": repeated} if repeated else {})

    # ---- statistics ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Base statistics plus passes per domain, realised vs target weights and the unused rows of last passes."""
        out = super().stats()
        counts = self.counts()
        need = counts.sum(axis=0)
        total = max(1, int(need.sum()))
        passes = need / self.sizes
        out.update(
            mode=self.mode,
            total_steps=self.total_steps,
            domains=list(self.domains),
            passes={d: float(p) for d, p in zip(self.domains, passes)},
            full_passes={d: int(-(-int(n) // int(s))) if n else 0 for d, n, s in zip(self.domains, need, self.sizes)},
            target_weights={d: float(w) for d, w in zip(self.domains, self._weights.mean(axis=0))},
            realised_weights={d: int(n) / total for d, n in zip(self.domains, need)},
            unused_rows_last_pass={d: int((-int(n)) % int(s)) if n else int(s)
                                   for d, n, s in zip(self.domains, need, self.sizes)},
        )
        return out
