"""TAS-Balanced: topic-aware batches of queries with balanced margin sampling of (positive, negative) pairs.

"Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling" (Hofstätter, Lin, Yang,
Lin and Hanbury, SIGIR 2021). Queries are clustered once (``native.kmeans`` on baseline-encoder embeddings);
each batch is drawn from ``clusters_per_batch`` clusters, and each query's training pair is drawn uniformly
over the *non-empty* bins of its teacher margins, then uniformly inside the bin.

Unlike the reference loader (an infinite stream seeded by global RNGs, where queries repeat), an epoch here is
finite and covers every query exactly once across ranks:

1. the queries of every cluster are shuffled and cut into chunks of ``m = ceil(batch_size / clusters_per_batch)``;
2. the full chunks are shuffled and grouped ``clusters_per_batch`` at a time: one *pure* batch per group (at
   most ``clusters_per_batch`` clusters; when ``batch_size`` is not a multiple of it, the last ``< clusters_per_batch``
   rows of the group go to the pool). A cluster thus fills a share of the batches proportional to its size (the
   reference draws clusters uniformly with replacement, which over-samples the queries of small clusters);
3. **top-up**: each cluster's remainder (``size % m`` queries), the full chunks left over when their count is
   not a multiple of ``clusters_per_batch``, and those overflow rows form a *pool* of pieces; the pieces are
   shuffled (each stays contiguous, so it keeps its cluster) and cut into batches of ``batch_size``. These
   top-up batches may mix more than ``clusters_per_batch`` clusters, as the reference does when a cluster runs
   short; ``stats()`` counts them (``topup_batches``, ``batches_over_cluster_limit``);
4. the batch order is shuffled; the base class evens the batch count out across ranks.

Queries with no pairs (when ``pairs`` is given) are left out and counted under ``dropped["no_pairs"]``.

**At scale.** Up to :data:`EXACT_MAX_ROWS` queries the plan is built as above from per-row arrays (~82 B per query,
plus O(pairs) margin-bin tables with ``pairs``). Above it the plan is *windowed* (:mod:`samplers.topic_windowed`):
rows are grouped by cluster by a counting sort to a memory-mapped file (none when the ids are already sorted and
every query has pairs), steps 2-4 run on chunk names (cluster, chunk index) with the same seeded permutations, and a
cluster's order each epoch is a stateless Feistel permutation instead of a Fisher-Yates shuffle, so memory is
O(chunks + clusters + batches) per rank and a batch's rows are computed when it is yielded. Every batch then has the
same size and the same clusters in the same slots as the exact plan of the same seed and epoch (same topic purity);
only which query of a cluster fills a slot differs. ``cluster_ids`` may be a memory-mapped int32 ``.npy`` of 1e9
rows (read in chunks, never copied whole; ids up to ``2**31 - 1``).

With ``pairs`` the windowed plan reads the :class:`PairTable`'s arrays through their memory maps too: the counting
sort reads the CSR offsets alongside the ids and leaves the queries without pairs out (no per-query mask), and a
batch's pairs are drawn when it is yielded, each query's margin bins computed from its own pairs
(``native.tas.draw_own_pairs``). A query's bins are its own (equal-width between its min and max margin) in both
plans and the draw is the same counter-based function of ``(seed, epoch, query)``, so a query gets exactly the pair
the exact plan gives it in that epoch (same margin-bin distribution, same reuse across epochs).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import numpy as np
from numpy.typing import ArrayLike, NDArray

from native.rng import mix_prefix, permutation, shuffle_segments
from native.tas import bin_table, draw_own_pairs, draw_pairs, margin_bins
from native.topic_sort import cluster_rows
from samplers.base import BatchSamplerBase, Plan, PlanStats, digest_array, take_batches
from samplers.lazy_plan import SizePlan, arrange_sizes, even_out_sizes
from samplers.topic_pairs import PairTable
from samplers.topic_windowed import Layout, batch_segments, cluster_index, epoch_layout, layout_purity

__all__ = ["EXACT_MAX_ROWS", "PairTable", "TopicAwareBatchSampler"]

#: Up to this many queries the plan is exact (per-row arrays: the plans of earlier versions, ~82 B per query, ~330
#: MiB here); above, with or without pairs, it is windowed (module docstring).
EXACT_MAX_ROWS = 1 << 22
#: ``global_plan()`` refuses to materialise a windowed plan of more rows than this (iterating never does).
MAX_PLAN_ROWS = 1 << 28

_STRATEGIES = ("balanced", "random")


def _int_array(x: ArrayLike, name: str) -> NDArray[np.int64]:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"{name} must be an integer array (got dtype {arr.dtype})")
    return np.ascontiguousarray(arr, dtype=np.int64)


class TopicAwareBatchSampler(BatchSamplerBase):
    """Topic-aware batches (TAS), optionally with balanced margin sampling of one pair per query (TAS-Balanced).

    Args:
        cluster_ids: int ``[Q]`` cluster of each query (``native.kmeans(...)[1]``), ``>= 0``; any ids (up to
            ``2**31 - 1`` above ``EXACT_MAX_ROWS`` queries, where it may be a memory map read in chunks).
        batch_size: queries per batch, ``>= 1``.
        clusters_per_batch: clusters a (non-top-up) batch draws from, ``1 <= clusters_per_batch <= batch_size``.
        pairs: optional :class:`PairTable` over the same ``Q`` queries. Without it the sampler yields int64
            query indices; with it, int64 pair-table rows, one per query (``pairs.query_of(batch)`` gives the
            queries back).
        margin_bins: equal-width margin bins per query for ``strategy="balanced"``.
        strategy: ``"balanced"`` (uniform over non-empty margin bins, then over pairs in the bin) or
            ``"random"`` (uniform over the query's pairs).
        seed, rank, world_size, drop_last: as in every sampler. ``drop_last`` also drops the last, partial
            top-up batch (counted under ``dropped["incomplete_batch"]``).
        strict: raise ``ValueError`` instead of a ``PlanWarning`` when the plan drops rows unasked.

    Above :data:`EXACT_MAX_ROWS` queries the plan is windowed (module docstring): memory per rank is O(chunks +
    clusters + batches), the rows grouped by cluster (queries with pairs only, when ``pairs`` is given) live in a
    memory-mapped file (cached on disk next to the plan cache for a memory-mapped ``cluster_ids`` and, with pairs, a
    memory-mapped ``pairs.offsets``, so a resume in a fresh process reads no ids), each batch's pairs are drawn
    from its queries' own pairs when it is yielded, and a state saved at another world size resumes here (elastic).
    """

    def __init__(self, cluster_ids: ArrayLike, batch_size: int, *, clusters_per_batch: int = 1,
                 pairs: PairTable | None = None, margin_bins: int = 10, strategy: str = "balanced", seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 strict: bool = False) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, strict=strict)
        ids = np.asarray(cluster_ids)  # a memory map stays a memory map
        self.windowed = ids.ndim == 1 and len(ids) > EXACT_MAX_ROWS
        if self.windowed:
            if ids.dtype.kind not in "iu" or ids.dtype == np.uint64:
                raise TypeError(f"cluster_ids must be an integer array of int64 or smaller (got dtype {ids.dtype})")
            cl = ids
        else:
            cl = _int_array(cluster_ids, "cluster_ids")
        self._cluster_digest = digest_array(cl)
        if len(cl) == 0:
            raise ValueError("cluster_ids is empty: there are no queries to sample")
        if not self.windowed and cl.min() < 0:  # the windowed path checks in its counting pass
            r = int(np.flatnonzero(cl < 0)[0])
            raise ValueError(f"cluster_ids must be >= 0 (query {r} has cluster {int(cl[r])})")
        for name, v in (("batch_size", batch_size), ("clusters_per_batch", clusters_per_batch),
                        ("margin_bins", margin_bins)):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {name}={v!r})")
        if clusters_per_batch > batch_size:
            raise ValueError(f"clusters_per_batch must be <= batch_size (got {clusters_per_batch=}, {batch_size=})")
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES} (got {strategy=})")
        if pairs is not None and not isinstance(pairs, PairTable):
            raise TypeError(f"pairs must be a samplers.PairTable or None (got {type(pairs).__name__})")
        self.num_queries = len(cl)
        self.batch_size = int(batch_size)
        self.clusters_per_batch = int(clusters_per_batch)
        self.margin_bins = int(margin_bins)
        self.strategy = strategy
        self.pairs = pairs
        self._pairs_digest: str | None = None
        if pairs is not None and pairs.num_queries != self.num_queries:
            raise ValueError(
                f"pairs covers {pairs.num_queries} queries but cluster_ids has {self.num_queries}; pair "
                "tables name queries by their index in cluster_ids (build it with num_queries=len(cluster_ids))"
            )
        if self.windowed:
            self._init_windowed(cl)
            return
        self._cluster_uniq, self._cluster = np.unique(cl, return_inverse=True)
        self._cluster = self._cluster.astype(np.int64)
        eligible = np.ones(len(cl), dtype=bool)
        if pairs is not None:
            eligible = pairs.counts() > 0
            self._bins = margin_bins_of(pairs, self.margin_bins)
            self._table = bin_table(pairs.offsets, self._bins, self.margin_bins)
        self._no_pairs = int((~eligible).sum())
        # queries sorted by cluster (stable), and the offsets of each non-empty cluster in that order
        rows = np.flatnonzero(eligible).astype(np.int64)
        self._rows = rows[np.argsort(self._cluster[rows], kind="stable")]
        sizes = np.bincount(self._cluster[self._rows], minlength=len(self._cluster_uniq))
        sizes = sizes[sizes > 0]
        self._cl_off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if len(self._rows) == 0:
            raise ValueError("no query has a pair: every query in pairs has offsets[q] == offsets[q+1]")
        if not drop_last and self.world_size > len(self._rows):
            raise ValueError(f"world_size={self.world_size} is larger than the {len(self._rows)} usable queries")

    def _init_windowed(self, ids: NDArray) -> None:
        """The windowed plan's set-up: rows grouped by cluster (counting sort, cached per file; with pairs, of the
        queries that have pairs), no per-row array."""
        offsets = None if self.pairs is None else self.pairs.offsets
        self._index = cluster_index(ids, self._cluster_digest, pair_offsets=offsets)
        self._cluster_uniq = self._index.uniq
        self._cl_off = self._index.offsets
        self._no_pairs = int(self._index.skipped)
        usable = int(self._cl_off[-1])
        if usable == 0:
            raise ValueError("no query has a pair: every query in pairs has offsets[q] == offsets[q+1]")
        if not self.drop_last and self.world_size > usable:
            raise ValueError(f"world_size={self.world_size} is larger than the {usable} usable queries")
        self._layouts: OrderedDict = OrderedDict()  # epoch -> Layout (the last two)
        self._lazy: tuple | None = None  # ((epoch, segments, world_size), SizePlan)

    def _options(self) -> dict:
        out = {"batch_size": self.batch_size, "clusters_per_batch": self.clusters_per_batch,
               "margin_bins": self.margin_bins, "strategy": self.strategy}
        if self.windowed:
            out["plan"] = "windowed"
        return out

    def _metadata(self) -> dict:
        out = {"queries": self.num_queries, "cluster_ids": self._cluster_digest}
        if self.pairs is not None:
            if self._pairs_digest is None:  # once: at 1e9 queries it reads 65,536 pages of the offsets' map
                self._pairs_digest = digest_array(self.pairs.offsets)
            out.update(pairs=self.pairs.num_pairs, pair_offsets=self._pairs_digest)
        return out

    # ---- plan ---------------------------------------------------------------------------------------------
    def _topic_batches(self, epoch: int) -> tuple[Plan, int]:
        """Pure and top-up batches of query indices, in shuffled order; returns (plan, number of top-ups). A pure
        function of (options, cluster ids, seed, epoch): every draw takes its own ``epoch_seed(epoch, salt)``."""
        bs, cpb = self.batch_size, self.clusters_per_batch
        m = -(-bs // cpb)
        cl_off = self._cl_off
        order = shuffle_segments(self._rows, cl_off, self.epoch_seed(epoch, 1))
        sizes = np.diff(cl_off)
        nfull = sizes // m
        rem = sizes - nfull * m
        nf = int(nfull.sum())
        first = np.cumsum(nfull) - nfull
        cstart = np.repeat(cl_off[:-1], nfull) + m * (np.arange(nf, dtype=np.int64) - np.repeat(first, nfull))
        cstart = cstart[permutation(nf, self.epoch_seed(epoch, 2))]
        ng = nf // cpb
        grp = (cstart[: ng * cpb].reshape(ng, cpb)[:, :, None] + np.arange(m)).reshape(ng, cpb * m)
        pure = grp[:, :bs].ravel()
        # the pool: remainders, leftover chunks, overflow rows; each piece stays contiguous when shuffled
        has_rem = rem > 0
        p_start = np.concatenate([(cl_off[:-1] + nfull * m)[has_rem], cstart[ng * cpb:]]).astype(np.int64)
        p_len = np.concatenate([rem[has_rem], np.full(nf - ng * cpb, m, dtype=np.int64)]).astype(np.int64)
        first = np.cumsum(p_len) - p_len
        piece_pos = np.repeat(p_start - first, p_len) + np.arange(int(p_len.sum()), dtype=np.int64)
        piece_id = np.repeat(np.arange(len(p_len), dtype=np.int64), p_len)
        over = cpb * m - bs
        if over and ng:  # batch_size not a multiple of clusters_per_batch: each group's last `over` rows
            piece_pos = np.concatenate([piece_pos, grp[:, bs:].ravel()])
            piece_id = np.concatenate([piece_id, np.repeat(np.arange(ng, dtype=np.int64) + len(p_len), over)])
        npieces = len(p_len) + (ng if over else 0)
        rank = permutation(npieces, self.epoch_seed(epoch, 3))
        pool_pos = piece_pos[np.argsort(rank[piece_id], kind="stable")] if npieces else piece_pos
        npool = len(pool_pos)
        n_top = -(-npool // bs)
        top_sizes = np.full(n_top, bs, dtype=np.int64)
        dropped = {}
        if n_top and npool % bs:
            if self.drop_last:
                top_sizes = top_sizes[:-1]
                dropped["incomplete_batch"] = npool % bs
                pool_pos = pool_pos[: len(top_sizes) * bs]
                n_top -= 1
            else:
                top_sizes[-1] = npool % bs
        idx = order[np.concatenate([pure, pool_pos])]
        all_sizes = np.concatenate([np.full(ng, bs, dtype=np.int64), top_sizes])
        plan = Plan.from_sizes(idx, all_sizes, dropped=dropped)
        plan = take_batches(plan, permutation(plan.num_batches, self.epoch_seed(epoch, 4)))
        return plan, n_top

    def _build_plan(self, epoch: int) -> Plan:
        if self.windowed:
            lay = self._layout(epoch)
            return self._materialise(epoch, SizePlan(0, lay.sizes, dict(lay.dropped)))
        plan, _ = self._topic_batches(epoch)
        if self._no_pairs:
            plan.dropped["no_pairs"] = self._no_pairs
        if self.pairs is not None:
            rows = draw_pairs(plan.indices, self.pairs.offsets, self._table, self.epoch_seed(epoch, 5),
                              balanced=self.strategy == "balanced")
            plan = Plan(rows, plan.offsets, None, plan.dropped, plan.repeated)
        return plan

    # ---- windowed plans (above EXACT_MAX_ROWS) -------------------------------------------------------------
    def _layout(self, epoch: int) -> Layout:
        """The epoch's chunks, pool segments and batch order (O(chunks + clusters + batches); the last two kept)."""
        if epoch not in self._layouts:
            lay = epoch_layout(self._index.sizes, self.batch_size, self.clusters_per_batch, self.drop_last,
                               (self.epoch_seed(epoch, 2), self.epoch_seed(epoch, 3), self.epoch_seed(epoch, 4)))
            if self._no_pairs:  # after "incomplete_batch", as the exact plan lists them
                lay.dropped["no_pairs"] = self._no_pairs
            self._layouts[epoch] = lay
            while len(self._layouts) > 2:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(epoch)
        return self._layouts[epoch]

    def _size_plan(self) -> SizePlan:
        key = (self.epoch, self._segments, self.world_size)
        if self._lazy is None or self._lazy[0] != key:
            lay = self._layout(self.epoch)

            def first(w: int) -> SizePlan:
                return even_out_sizes(SizePlan(0, lay.sizes, dict(lay.dropped)), w, self.drop_last)

            plan = arrange_sizes(first, self._segments, self.world_size, self.drop_last)
            self._lazy = (key, plan)
            self._announce(self.epoch, plan.dropped, {})
        return self._lazy[1]

    def _stream_rows(self, epoch: int, start: int, stop: int) -> NDArray[np.int64]:
        """Rows at positions ``[start, stop)`` of the epoch's stream (plan batches one after another); an arranged
        batch never spans two plan batches (evening out only splits a batch)."""
        lay = self._layout(epoch)
        g = int(np.searchsorted(lay.voff, start, side="right")) - 1
        lo, hi = start - int(lay.voff[g]), stop - int(lay.voff[g])
        segs = batch_segments(lay, int(lay.order[g]), self.batch_size, self.clusters_per_batch, lo, hi)
        rows = cluster_rows(self._index.rows, *segs, self._cl_off, mix_prefix(self.seed, epoch, 1))
        if self.pairs is None:
            return rows
        # each query's pair from its own pairs, with the exact plan's seed: a pure function of (seed, epoch, query)
        return draw_own_pairs(rows, self.pairs.offsets, self.pairs.margin, self.margin_bins,
                              self.epoch_seed(epoch, 5), balanced=self.strategy == "balanced")

    def _materialise(self, epoch: int, plan: SizePlan) -> Plan:
        if plan.rows > MAX_PLAN_ROWS:
            raise ValueError(f"global_plan() would materialise {plan.rows} rows (> {MAX_PLAN_ROWS}); iterate the "
                             "sampler instead, it computes batches on demand")
        parts = [self._stream_rows(epoch, *plan.span(b)) for b in range(plan.num_batches)]
        rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return Plan(rows, plan.offsets.copy(), dropped=dict(plan.dropped))

    def global_plan(self) -> Plan:
        """The arranged global plan of the current epoch (every rank's batches, step-major); a windowed plan is
        materialised batch by batch (for small epochs, tests and inspection; refused above ``MAX_PLAN_ROWS``)."""
        if not self.windowed:
            return super().global_plan()
        return self._materialise(self.epoch, self._size_plan())

    def _on_demand(self):
        if not self.windowed:
            return None
        plan, epoch = self._size_plan(), self.epoch
        return plan.num_batches, lambda b: self._stream_rows(epoch, *plan.span(b))

    # ---- helpers ------------------------------------------------------------------------------------------
    def queries_of(self, batch: ArrayLike) -> NDArray[np.int64]:
        """Query indices of a yielded batch (the batch itself without ``pairs``)."""
        b = np.asarray(batch, dtype=np.int64)
        return b if self.pairs is None else self.pairs.query_of(b)

    def stats(self) -> PlanStats:
        """Base statistics plus topic purity per batch and, with pairs, the margin-bin histogram of drawn pairs.

        Keys added: ``num_clusters``; ``topic_purity`` (float64 ``[B]``: share of each batch's largest
        cluster), ``topic_purity_mean``, ``topic_purity_min``; ``clusters_in_batch_max``;
        ``batches_over_cluster_limit`` (batches with more than ``clusters_per_batch`` clusters, top-ups only);
        ``topup_batches``; with pairs: ``margin_bin_histogram`` (a list of ``margin_bins`` ints: drawn pairs by the
        bin of their query's margins), ``margin_bin_histogram_all_pairs``, ``equal_margin_queries``. Every value is
        JSON-serialisable (lists, not arrays).

        A windowed plan (above ``EXACT_MAX_ROWS`` queries) gives summary numbers only, computed from its layout
        without reading rows: no ``topic_purity`` list (it would be O(batches)); ``topic_purity_mean``/``_min``,
        ``clusters_in_batch_max`` and ``batches_over_cluster_limit`` describe the epoch's batches before they are
        evened out across ranks (an even-out split only halves a batch); plus ``plan="windowed"`` and
        ``rows_by_cluster`` (the file of the counting sort, ``"temporary"``, or ``"sorted ids"``). With pairs it adds
        ``queries_without_pairs`` and ``num_pairs``, not the margin-bin histograms (O(pairs) to compute; the
        draws are the exact plan's, whose histograms ``benchmarks/bench_tas_scale.py`` compares).
        """
        if self.windowed:
            sp = self._size_plan()
            return cast(PlanStats, {
                **self._shared_stats(sp.sizes, sp.rows, sp.dropped, {}),
                "num_clusters": int(len(self._cl_off) - 1),
                **layout_purity(self._layout(self.epoch), len(self._cl_off) - 1, self.batch_size,
                                self.clusters_per_batch),
                "plan": "windowed",
                "rows_by_cluster": "sorted ids" if self._index.rows is None else (self._index.path or "temporary"),
                **({} if self.pairs is None else {"queries_without_pairs": self._no_pairs,
                                                  "num_pairs": self.pairs.num_pairs}),
            })
        out: dict = dict(super().stats())  # the shared keys (PlanStats), then its own
        plan = self.global_plan()
        q = self.queries_of(plan.indices)
        nb, c = plan.num_batches, len(self._cluster_uniq)
        out["num_clusters"] = int(len(self._cl_off) - 1)
        out["topup_batches"] = int(self._topic_batches(self.epoch)[1])  # the same every epoch (cluster sizes)
        if nb:
            key = np.repeat(np.arange(nb, dtype=np.int64), plan.sizes) * c + self._cluster[q]
            uk, cnt = np.unique(key, return_counts=True)
            ub = uk // c
            starts = np.searchsorted(ub, np.arange(nb))
            distinct = np.bincount(ub, minlength=nb)
            purity = np.maximum.reduceat(cnt, starts) / plan.sizes
            out.update(topic_purity=purity.tolist(), topic_purity_mean=float(purity.mean()),
                       topic_purity_min=float(purity.min()), clusters_in_batch_max=int(distinct.max()),
                       batches_over_cluster_limit=int((distinct > self.clusters_per_batch).sum()))
        else:
            out.update(topic_purity=[], topic_purity_mean=0.0, topic_purity_min=0.0,
                       clusters_in_batch_max=0, batches_over_cluster_limit=0)
        if self.pairs is not None:
            nbins = self.margin_bins
            out["margin_bin_histogram"] = np.bincount(self._bins[plan.indices], minlength=nbins).tolist()
            out["margin_bin_histogram_all_pairs"] = np.bincount(self._bins, minlength=nbins).tolist()
            out["equal_margin_queries"] = int((_equal_margins(self.pairs) & (self.pairs.counts() > 1)).sum())
            out["queries_without_pairs"] = self._no_pairs
        return cast(PlanStats, out)


def _equal_margins(pairs: PairTable) -> NDArray[np.bool_]:
    off, m = pairs.offsets, pairs.margin
    nonempty = np.diff(off) > 0
    out = np.zeros(pairs.num_queries, dtype=bool)
    if pairs.num_pairs:
        starts = off[:-1][nonempty]
        out[nonempty] = np.maximum.reduceat(m, starts) == np.minimum.reduceat(m, starts)
    return out


def margin_bins_of(pairs: PairTable, num_bins: int) -> NDArray[np.int64]:
    """Bin of every pair of ``pairs`` among its query's ``num_bins`` equal-width margin bins (int64 ``[P]``)."""
    return margin_bins(pairs.offsets, pairs.margin, num_bins)
