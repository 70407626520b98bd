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
  ``stats()["unused_rows_last_pass"]``, and repeated row slots as ``stats()["repeated"]["domain_repeat"]``.

Memory: nothing the size of the run or of a domain is materialised. The sampler keeps the per-batch counts
(``[total_steps * world_size, D]`` in the smallest unsigned dtype holding ``batch_size``) and per-step stream
positions (int64 ``[total_steps + 1, D]``). Domain ``d`` is read as a *stream*: pass after pass of a stateless
Feistel permutation of its rows (``native.feistel``, seeded by ``mix_seed(seed, epoch, d, pass)``); batch ``b``
takes the next ``counts[b, d]`` stream positions after those of all earlier batches, so any batch is computed
on its own in O(batch_size) time. A 200k-step, 8-rank, 1024-row-batch run over a 1e9-row domain needs ~26 MB
instead of a materialised plan's 12.2 GiB of rows (~76 GiB peak while building it) and 8 GB per permutation pass
(benchmarks/results/bench_mixture.md).

Every batch is a pure function of (sizes, schedule, seed, epoch, batch_size, total_steps, world_size, batch id),
so resume (also across phase boundaries) is O(1): it starts computing at the saved cursor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import cast

import numpy as np
from numpy.typing import NDArray

from native.feistel import mix_prefix, stream_batches
from native.rounding import largest_remainder as largest_remainder_counts  # the name samplers export
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array

__all__ = ["MixtureBatchSampler", "largest_remainder_counts"]

MODES = ("stratified", "random")
_COUNT_CHUNK = 1 << 15  # batches per chunk when drawing the counts
_ITER_CHUNK = 32  # steps computed per kernel call while iterating
_MAX_PLAN_ROWS = 1 << 28  # global_plan() refuses to materialise more rows (2 GiB)


def constant_runs(schedule, total_steps: int) -> list[int] | None:
    """Sorted first steps of the constant runs of a schedule that declares itself piecewise constant
    (``piecewise_constant = True`` and ``phase_starts(total_steps)``, as ``mixtures.Constant``/``Piecewise``/
    ``DomainUpsampling`` do), else None (ask every step). Duck-typed: samplers import no schedule class."""
    if not getattr(schedule, "piecewise_constant", False) or not hasattr(schedule, "phase_starts"):
        return None
    return sorted({0, *(int(x) for x in schedule.phase_starts(total_steps) if 0 <= x < total_steps)})


def schedule_weights(schedule, total_steps: int, num_domains: int) -> NDArray[np.float64]:
    """``[total_steps, D]`` weights of a schedule, checked and normalised (the schedule is pure, so a sampler asks
    once). A schedule that declares itself piecewise constant is asked once per constant run (and at the run's last
    step, to check the claim).

    Raises:
        ValueError: a row of the wrong shape, negative, not finite or not summing to 1; a piecewise-constant
            schedule whose weights change inside a run.
    """
    T, D = total_steps, num_domains
    W = np.empty((T, D), dtype=np.float64)
    starts = constant_runs(schedule, T)  # steps where a piecewise-constant schedule changes
    steps = range(T) if starts is None else starts
    ends = None if starts is None else [*starts[1:], T]
    for i, s in enumerate(steps):
        w = np.asarray(schedule.weights_at(s, T), dtype=np.float64)
        if w.shape != (D,):
            raise ValueError(f"schedule.weights_at({s}) returned shape {w.shape}, expected ({D},)")
        if ends is None:
            W[s] = w
        else:
            last = np.asarray(schedule.weights_at(ends[i] - 1, T), dtype=np.float64)
            if not np.array_equal(last, w):
                raise ValueError(f"schedule says piecewise_constant but weights_at({s}) != weights_at("
                                 f"{ends[i] - 1}) within one phase; set piecewise_constant = False on it")
            W[s : ends[i]] = w
    sums = W.sum(axis=1)
    bad = ~(np.all(np.isfinite(W), axis=1) & np.all(W >= 0, axis=1) & (np.abs(sums - 1.0) <= 1e-6))
    if bad.any():
        s = int(np.flatnonzero(bad)[0])
        raise ValueError(f"schedule.weights_at({s}) must be finite, >= 0 and sum to 1 (got {W[s].tolist()})")
    W /= sums[:, None]
    return W


class MixtureBatchSampler(BatchSamplerBase):
    """Fixed-size batches whose domain composition follows ``schedule.weights_at(step, total_steps)``.

    Args:
        domain_sizes: dict domain -> number of rows (> 0); keys must be exactly ``schedule.domains``.
        schedule: object with ``.domains`` (tuple of names) and ``weights_at(step, total_steps)`` -> float64
            ``[D]`` summing to 1 (e.g. ``mixtures.schedules.DomainUpsampling``).
        batch_size: rows per rank per step, ``>= 1``.
        total_steps: steps in the run (the epoch), ``>= 1``; every rank yields this many batches.
        mode: ``"stratified"`` (exact largest-remainder counts per batch) or ``"random"`` (multinomial counts).
        max_repeat: passes allowed over any domain in one run; exceeding raises ValueError. ``None`` (default)
            allows any number but emits a ``PlanWarning`` past 4 passes (the range where "To Repeat or Not To
            Repeat" (Xue et al., 2023) finds repeated tokens lose value); ``strict=True`` raises instead.
        seed, rank, world_size: as in every sampler. A state saved at another world size resumes elastically by
            global position: the run goes on at the step it had reached, each domain's stream from the position
            the old ranks had read it to, with this world size's per-step counts.
    """


    def __init__(self, domain_sizes: Mapping[str, int], schedule, batch_size: int, *, total_steps: int,
                 mode: str = "stratified", max_repeat: float | None = None, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=False, strict=strict)
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
        self._weights = schedule_weights(self.schedule, self.total_steps, len(self.domains))
        self._tables_cache: dict[tuple[int, int, int], tuple] = {}  # keyed by (seed, epoch, world size)
        self._plan_cache: tuple[tuple[int, int], Plan] | None = None
        self._row_map: NDArray[np.int64] | None = None  # concatenation position -> dataset row (from_domains)
        self._tables(0)  # draws epoch 0's counts and checks max_repeat up front

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

    def _options(self) -> dict:
        return {"domains": list(self.domains), "domain_sizes": self.sizes.tolist(), "batch_size": self.batch_size,
                "total_steps": self.total_steps, "mode": self.mode, "max_repeat": self.max_repeat,
                "schedule": digest_array(self._weights)}

    def _metadata(self) -> dict:
        return {} if self._row_map is None else {"row_map": digest_array(self._row_map)}

    # ---- composition ---------------------------------------------------------------------------------------------
    def _tables(self, epoch: int,
                world_size: int | None = None) -> tuple[NDArray, NDArray[np.int64], NDArray[np.int64]]:
        """Counts of an epoch: ``(counts [B, D] (smallest unsigned dtype holding batch_size), step_prefix int64
        [total_steps + 1, D] (stream position of each domain at the start of each step), need int64 [D])``.

        Computed in chunks of batches so that no temporary is larger than a chunk; the random draws are the same
        as in one go (a single Generator consumed in order).
        """
        W = self.world_size if world_size is None else int(world_size)
        key = (self.seed, epoch, W)
        if key in self._tables_cache:
            return self._tables_cache[key]
        T, D, bs = self.total_steps, len(self.domains), self.batch_size
        dtype = np.uint8 if bs <= 0xFF else np.uint16 if bs <= 0xFFFF else np.uint32 if bs <= 0xFFFFFFFF else np.int64
        counts = np.empty((T * W, D), dtype=dtype)
        step_prefix = np.zeros((T + 1, D), dtype=np.int64)
        rng = np.random.default_rng(self.epoch_seed(epoch, 0xC0FFEE))
        spc = max(1, _COUNT_CHUNK // W)  # steps per chunk
        for s0 in range(0, T, spc):
            s1 = min(T, s0 + spc)
            Wb = np.repeat(self._weights[s0:s1], W, axis=0)  # batch s * W + r uses step s's weights
            if self.mode == "stratified":
                c = largest_remainder_counts(Wb, bs, rng.random(Wb.shape))
            else:
                c = rng.multinomial(bs, Wb).astype(np.int64)
            counts[s0 * W : s1 * W] = c
            step_prefix[s0 + 1 : s1 + 1] = c.reshape(s1 - s0, W, D).sum(axis=1)
        np.cumsum(step_prefix, axis=0, out=step_prefix)
        need = step_prefix[-1].copy()
        self._check_repeat(need, epoch)
        if len(self._tables_cache) >= 4:  # this epoch's, and the world sizes of an elastic resume
            self._tables_cache.pop(next(iter(self._tables_cache)))
        self._tables_cache[key] = (counts, step_prefix, need)
        return counts, step_prefix, need

    def _elastic_start(self, epoch: int) -> tuple[int, NDArray[np.int64]]:
        """``(first step, stream offset [D])`` of this world size's part of the epoch after an elastic resume: the
        steps the earlier world sizes ran, and how far each domain's stream had been read at that point beyond what
        this world size's counts would have read by then."""
        D = len(self.domains)
        step, read = 0, np.zeros(D, dtype=np.int64)
        for w, k in self._segments:
            prefix = self._tables(epoch, w)[1]
            read += prefix[min(step + k, self.total_steps)] - prefix[step]
            step = min(step + k, self.total_steps)
        if not self._segments:
            return 0, read
        return step, read - self._tables(epoch)[1][step]

    def counts(self, epoch: int | None = None) -> NDArray[np.int64]:
        """Rows per domain of every global batch of an epoch: int64 ``[total_steps * world_size, D]``."""
        return self._tables(self.epoch if epoch is None else epoch)[0].astype(np.int64)

    def _check_repeat(self, need: NDArray[np.int64], epoch: int) -> None:
        passes = need / self.sizes
        if self.max_repeat is None:
            over = {self.domains[d]: float(passes[d]) for d in np.flatnonzero(passes > 4.0)}
            if over:
                what = ", ".join(f"{d!r} {p:.1f} passes" for d, p in over.items())
                self._announce(epoch, {}, {f"domain read more than 4 passes ({what}); lower its weight, add rows, "
                                           "shorten total_steps, or pass max_repeat= to allow it":
                                           int(np.maximum(need - self.sizes, 0).sum())})
            return
        bad = np.flatnonzero(passes > self.max_repeat + 1e-12)
        if len(bad):
            d = bad[0]
            raise ValueError(
                f"domain {self.domains[d]!r} would be repeated {passes[d]:.2f} times ({int(need[d])} row slots over "
                f"{int(self.sizes[d])} rows) but max_repeat={self.max_repeat}; lower its weight, add rows, shorten "
                f"total_steps or raise max_repeat")

    # ---- rows, computed on demand --------------------------------------------------------------------------------
    def _global_batches(self, epoch: int, batch_ids: NDArray[np.int64],
                        offset: NDArray[np.int64] | None = None) -> NDArray[np.int64]:
        """Rows of global batches ``batch_ids`` (batch ``b`` is step ``b // world_size``, rank ``b % world_size``)
        of an epoch, batch after batch: int64 ``[len(batch_ids) * batch_size]``.

        Domain ``d``'s rows of batch ``b`` are its stream positions ``[start, start + counts[b, d])`` where
        ``start`` = rows of ``d`` in all earlier batches; stream position ``k`` is row
        ``feistel_permute(k % size, size, mix_seed(seed, epoch, d, k // size))`` of the domain. The batch's rows
        are then shuffled with seed ``mix_seed(epoch_seed(epoch, 0xBA7C4), b)``.
        """
        counts, step_prefix, _ = self._tables(epoch)
        W, D = self.world_size, len(self.domains)
        b = np.asarray(batch_ids, dtype=np.int64)
        s, r = b // W, b % W
        per_rank = counts.reshape(self.total_steps, W, D)[s].astype(np.int64)  # [k, W, D]
        before = np.cumsum(per_rank, axis=1) - per_rank  # rows of earlier ranks in the same step
        starts = step_prefix[s] + before[np.arange(len(b)), r]
        if offset is not None:
            starts = starts + offset[None, :]
        prefixes = np.array([mix_prefix(self.seed, epoch, d) for d in range(D)], dtype=np.uint64)
        rows = stream_batches(starts, counts[b], self.sizes, self.offsets[:-1], prefixes, b,
                              mix_prefix(self.epoch_seed(epoch, 0xBA7C4)))
        if self._row_map is not None:
            rows = self._row_map[rows]
        return rows

    def _repeated(self, need: NDArray[np.int64]) -> dict:
        rep = int(np.maximum(need - self.sizes, 0).sum())
        return {"domain_repeat": rep} if rep else {}

    def _build_plan(self, epoch: int) -> Plan:
        """The materialised global plan (small runs only: ``total_steps * world_size * batch_size`` rows)."""
        nb = self.total_steps * self.world_size
        if nb * self.batch_size > _MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {nb * self.batch_size} rows (> {_MAX_PLAN_ROWS}); "
                             "iterate the sampler instead, it computes batches on demand")
        rows = self._global_batches(epoch, np.arange(nb, dtype=np.int64))
        offsets = np.arange(nb + 1, dtype=np.int64) * self.batch_size
        return Plan(rows, offsets, repeated=self._repeated(self._tables(epoch)[2]))

    def global_plan(self) -> Plan:
        """The global plan of the current epoch (every rank's batches, step-major), materialised: for small runs,
        tests and inspection. Iteration never builds it."""
        if self._plan_cache is None or self._plan_cache[0] != (self.seed, self.epoch):
            self._plan_cache = ((self.seed, self.epoch), self._build_plan(self.epoch))
        return self._plan_cache[1]

    # ---- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[NDArray[np.int64]]:
        epoch, W, r, T, bs = self.epoch, self.world_size, self.rank, self.total_steps, self.batch_size
        self._tables(epoch)
        first, offset = self._elastic_start(epoch)
        for s0 in range(first + self._begin_pass(), T, _ITER_CHUNK):
            s1 = min(T, s0 + _ITER_CHUNK)
            rows = self._global_batches(epoch, np.arange(s0, s1, dtype=np.int64) * W + r,
                                        offset if self._segments else None)
            for j in range(s1 - s0):
                self._yielded = s0 + j + 1 - first
                yield rows[j * bs : (j + 1) * bs].copy()
        # a finished pass starts the next pass of the same epoch from its beginning, as torch samplers do
        self._yielded = 0

    def __len__(self) -> int:
        return self.total_steps - (self._elastic_start(self.epoch)[0] if self._segments else 0)

    # ---- statistics ----------------------------------------------------------------------------------------------
    def stats(self) -> PlanStats:
        """Plan statistics (computed from the counts, without materialising the plan) plus passes per domain,
        realised vs target weights and the unused rows of last passes."""
        need = self._tables(self.epoch)[2]
        nb = self.total_steps * self.world_size
        total = max(1, int(need.sum()))
        passes = need / self.sizes
        return cast(PlanStats, {
            "epoch": self.epoch,
            "num_batches": nb,
            "batches_per_rank": self.total_steps,
            "rows": nb * self.batch_size,
            "mean_batch_size": float(self.batch_size),
            "min_batch_size": self.batch_size,
            "max_batch_size": self.batch_size,
            "dropped_rows": 0,
            "dropped": {},
            "repeated": self._repeated(need),
            "mode": self.mode,
            "total_steps": self.total_steps,
            "domains": list(self.domains),
            "passes": {d: float(p) for d, p in zip(self.domains, passes)},
            "full_passes": {d: int(-(-int(n) // int(s))) if n else 0 for d, n, s in zip(self.domains, need, self.sizes)},
            "target_weights": {d: float(w) for d, w in zip(self.domains, self._weights.mean(axis=0))},
            "realised_weights": {d: int(n) / total for d, n in zip(self.domains, need)},
            "unused_rows_last_pass": {d: int((-int(n)) % int(s)) if n else int(s)
                                      for d, n, s in zip(self.domains, need, self.sizes)},
        })
