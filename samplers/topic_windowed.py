"""The topic-aware plan in memory O(chunks + clusters): what ``TopicAwareBatchSampler`` does above
``EXACT_MAX_ROWS`` queries (with or without pairs).

The exact plan (``samplers.topic_aware``) keeps per-row arrays (rows sorted by cluster, each cluster shuffled:
~82 B per query). This module computes the same layout from per-cluster counts instead:

* :func:`cluster_index`: rows of cluster ``c`` without an in-RAM argsort. One pass over ``cluster_ids`` (read
  ``SCAN_ROWS`` at a time through the memory map, never copied whole) gives per-cluster counts and checks the
  ids; a second pass scatters row ids into a memory-mapped int32/int64 file "rows by cluster" (a counting sort
  to disk, ``native.topic_sort``). The file is kept next to the plan cache (``samplers.plan_cache.cache_dir()``,
  keyed by the metadata file's identity and digest, so a fresh process reuses it; the newest
  :data:`samplers.plan_cache.KEEP_BIG_FILES` are kept (4 GB each at 1e9 int32 rows); the ranks of a node sort it once, under a file lock; a cached file is checked
  against the ids at ``plan_cache.spot_positions`` when opened); when the disk cache is off or the ids are not a
  file, it is an unlinked temporary file. Ids already sorted need no file: cluster ``c`` is a contiguous range.
  With a pair table (``pair_offsets``), both passes read its CSR offsets alongside the ids and skip the queries
  without pairs (counted in ``ClusterIndex.skipped``; no per-query mask in memory); the file's key then includes
  the offsets' file identity and digest, and a cached file is also checked to hold only queries with pairs.
* :func:`epoch_layout`: the exact plan's steps 2-4 on chunk *names* (cluster, chunk index; int32 each) rather
  than rows, with the same seeded permutations: chunks shuffled and grouped into pure batches, the pool of
  remainders, leftover chunks and overflow rows as *segments* (cluster, start, length), the batch order. O(chunks
  + clusters + batches) memory.
* a cluster's order each epoch is a stateless Feistel permutation of its range (seeded ``epoch_seed(epoch, 1,
  c)``), so chunk ``(c, i)`` is positions ``[i*m, (i+1)*m)`` of it, computed when a batch is yielded
  (:func:`batch_segments` + ``native.topic_sort.cluster_rows``).

Every slot of every batch holds a query of the same cluster as in the exact plan of the same seed and epoch (same
batch sizes, same cluster sequence, so the same topic purity); only which query of the cluster fills it differs
(Feistel instead of Fisher-Yates).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from native.rng import permutation
from native.topic_sort import (
    count_ids,
    count_kept_ids,
    scan_ids,
    scatter_kept_rows,
    scatter_rows,
)
from samplers.plan import digest_array
from samplers.plan_cache import (KEEP_BIG_FILES, PlanCache, StalePlanCache, cache_dir, file_identity, lock_path,
                                  locked, prune_files, source_id, spot_positions, write_mapped)

__all__ = [
    "MAX_CLUSTER_ID",
    "SCAN_ROWS",
    "ClusterIndex",
    "Layout",
    "Pool",
    "batch_segments",
    "cluster_index",
    "epoch_layout",
    "layout_purity",
]

#: ids read per step of the counting passes (64 MiB of int32)
SCAN_ROWS = 1 << 24
#: the counting pass keeps one counter per id value up to the largest id: ids above this must be renumbered
MAX_CLUSTER_ID = (1 << 31) - 1
#: counting passes (counts per cluster, sortedness) shared by the samplers of a process and kept on disk
_COUNTS = PlanCache("topic_counts", keep=4)
#: the open "rows by cluster" memory maps of this process: (source, digest) -> ClusterIndex
_INDEXES: OrderedDict = OrderedDict()


@dataclasses.dataclass(frozen=True)
class ClusterIndex:
    """Rows grouped by cluster.

    Attributes:
        uniq: int64 ``[K]`` the ids of the non-empty clusters, ascending (dense cluster ``c`` is ``uniq[c]``).
        offsets: int64 ``[K + 1]`` cluster ``c``'s rows are ``rows[offsets[c]:offsets[c+1]]``, in row order.
        rows: int32/int64 ``[N]`` memory map of the rows sorted by cluster, or None when the ids are sorted (row
            ``offsets[c] + k`` is then cluster ``c``'s ``k``-th row).
        path: the file behind ``rows`` ("" for none or an unlinked temporary file).
        cached: whether the counting pass came from the plan cache (this process or disk).
        skipped: rows left out because they have no pairs (``pair_offsets`` given); ``offsets[-1]`` counts the
            others.
    """

    uniq: NDArray[np.int64]
    offsets: NDArray[np.int64]
    rows: NDArray | None
    path: str = ""
    cached: bool = False
    skipped: int = 0

    @property
    def sizes(self) -> NDArray[np.int64]:
        return np.diff(self.offsets)


def _where(arr) -> str:
    ident = file_identity(arr)
    return f" of {ident[0]}" if ident else ""


def _count(ids, name: str, pair_offsets=None) -> dict:
    """First pass: counts per id (of the rows with pairs when ``pair_offsets`` is given), min/max, sortedness; a
    negative id is an error naming the row."""
    counts = np.zeros(0, dtype=np.int64)
    ordered, prev, kept = True, -(1 << 62), 0
    for a in range(0, len(ids), SCAN_ROWS):
        part = ids[a : a + SCAN_ROWS]
        neg, _, hi, ok = scan_ids(part, prev)
        if neg >= 0:
            raise ValueError(f"{name} must be >= 0 (query {a + neg}{_where(ids)} has cluster {int(part[neg])}); "
                             "cluster ids are the k-means assignments, 0 .. k-1")
        if hi > MAX_CLUSTER_ID:
            r = a + int(np.argmax(np.asarray(part) > MAX_CLUSTER_ID))
            raise ValueError(f"{name} must be <= {MAX_CLUSTER_ID} above EXACT_MAX_ROWS queries (query {r}"
                             f"{_where(ids)} has cluster {int(ids[r])}); renumber them densely, e.g. "
                             "np.unique(cluster_ids, return_inverse=True)[1]")
        if hi >= len(counts):
            counts = np.concatenate([counts, np.zeros(max(hi + 1, 2 * len(counts)) - len(counts), np.int64)])
        if pair_offsets is None:
            count_ids(part, counts)
        else:
            kept += count_kept_ids(part, pair_offsets[a : a + len(part) + 1], counts)
        ordered = ordered and ok
        prev = int(part[-1]) if len(part) else prev
    uniq = np.flatnonzero(counts).astype(np.int64)
    offsets = np.zeros(len(uniq) + 1, dtype=np.int64)
    np.cumsum(counts[uniq], out=offsets[1:])
    skipped = 0 if pair_offsets is None else len(ids) - kept
    # rows without pairs leave holes in a sorted id range: those need the rows file too
    return {"uniq": uniq, "offsets": offsets, "ordered": bool(ordered) and skipped == 0, "skipped": int(skipped)}


def _scatter(ids, uniq: NDArray[np.int64], offsets: NDArray[np.int64], out, pair_offsets=None) -> None:
    dense = np.full(int(uniq[-1]) + 1, -1, dtype=np.int64)
    dense[uniq] = np.arange(len(uniq), dtype=np.int64)
    cursor = offsets[:-1].copy()
    target = np.asarray(out)
    for a in range(0, len(ids), SCAN_ROWS):
        part = ids[a : a + SCAN_ROWS]
        if pair_offsets is None:
            scatter_rows(part, a, dense, cursor, target)
        else:
            scatter_kept_rows(part, pair_offsets[a : a + len(part) + 1], a, dense, cursor, target)
    assert np.array_equal(cursor, offsets[1:]), "counting sort: cursors must end at the next cluster's start"


def _verify(ids, uniq: NDArray[np.int64], offsets: NDArray[np.int64], rows, path: Path, pair_offsets=None) -> None:
    """A cached rows file must hold rows of the right cluster (and with pairs, when ``pair_offsets`` is given):
    ``plan_cache.spot_positions`` entries are checked against the ids (a damaged or foreign file is an error naming
    it, never a wrong plan)."""
    n = len(rows)
    pos = spot_positions(n)
    got = rows[pos].astype(np.int64)
    c = np.searchsorted(offsets, pos, side="right") - 1
    bad = got.min() < 0 or got.max() >= len(ids) or not np.array_equal(np.asarray(ids[got], dtype=np.int64), uniq[c])
    if not bad and pair_offsets is not None:
        bad = bool(np.any(np.asarray(pair_offsets[got + 1]) <= np.asarray(pair_offsets[got])))
    if bad:
        path.unlink(missing_ok=True)
        raise StalePlanCache(f"the rows-by-cluster file {path} does not match the cluster ids (a damaged cache "
                             "entry); the file was removed: build the sampler again (or set DATAPIPE_PLAN_CACHE=0)")


def _cached_rows(ids, uniq: NDArray[np.int64], offsets: NDArray[np.int64], final: Path,
                 dtype: np.dtype, pair_offsets=None) -> np.memmap:
    """The rows-by-cluster file of a memory-mapped ``ids`` in the cache directory: sorted once, then opened by every
    sampler and process (the caller holds the entry's lock)."""
    n = int(offsets[-1])
    if write_mapped(final, dtype, n, lambda out: _scatter(ids, uniq, offsets, out, pair_offsets)):
        prune_files(final.parent, "topic_rows-*.bin", final, KEEP_BIG_FILES)
    rows = np.memmap(final, dtype=dtype, mode="r", shape=(n,))
    _verify(ids, uniq, offsets, rows, final, pair_offsets)
    return rows


def cluster_index(ids, digest: str, name: str = "cluster_ids", *, pair_offsets=None) -> ClusterIndex:
    """Rows grouped by cluster for 1-D integer ``ids`` (a memory map is read ``SCAN_ROWS`` rows at a time).

    Args:
        ids: int ``[N]`` cluster of each row, ``>= 0`` and ``<= MAX_CLUSTER_ID``.
        digest: ``samplers.base.digest_array(ids)`` (part of the cache keys).
        name: the parameter named in errors.
        pair_offsets: optional int64 ``[N + 1]`` CSR offsets of a pair table (``PairTable.offsets``, validated by
            it; may be a memory map): rows ``i`` with ``pair_offsets[i + 1] == pair_offsets[i]`` are left out
            (counted in ``ClusterIndex.skipped``).

    Returns:
        a :class:`ClusterIndex`; the file of a memory-mapped ``ids`` is sorted once per file (disk cache).

    Raises:
        ValueError: a negative id, or an id above ``MAX_CLUSTER_ID`` (the first such row is named).
        samplers.plan_cache.StalePlanCache: a cached counting pass or rows file does not match the ids (removed).
    """
    key: tuple = (source_id(ids), digest)
    pairs_ident = None
    if pair_offsets is not None:
        if len(pair_offsets) != len(ids) + 1:
            raise ValueError(f"pair_offsets must hold len({name}) + 1 = {len(ids) + 1} values (got "
                             f"{len(pair_offsets)})")
        pairs_ident = file_identity(pair_offsets)
        key = (*key, ("pairs", source_id(pair_offsets), digest_array(pair_offsets)))
    if key in _INDEXES:
        _INDEXES.move_to_end(key)
        return _INDEXES[key]
    n = len(ids)
    dtype = np.dtype(np.int32 if n <= np.iinfo(np.int32).max + 1 else np.int64)
    ident, root = file_identity(ids), cache_dir()
    final = None
    if ident is not None and root is not None and (pair_offsets is None or pairs_ident is not None):
        named = (ident, digest, dtype.str) if pair_offsets is None else (ident, digest, dtype.str, key[2])
        h = hashlib.sha256(repr(named).encode()).hexdigest()[:40]
        final = root / f"topic_rows-{h}.bin"
    # the counting pass goes to disk only under keys that outlive the process (files, not memory addresses)
    source = ids if pair_offsets is None or pairs_ident is not None else None
    with locked(None if final is None else lock_path(final)):
        ckey = ("counts", key)
        cached = _COUNTS.get(ckey, source)
        counts = cached if cached is not None else _COUNTS.put(ckey, _count(ids, name, pair_offsets), source)
        uniq = np.asarray(counts["uniq"], dtype=np.int64)
        offsets = np.asarray(counts["offsets"], dtype=np.int64)
        skipped = int(counts.get("skipped", 0))
        if int(offsets[-1]) + skipped != n:
            _COUNTS.forget(ckey, source)
            raise StalePlanCache(f"the counting pass cached in {counts.get('cache_file')} counts {int(offsets[-1])} "
                                 f"rows (and {skipped} without pairs) but {name} has {n} (a damaged cache entry); the "
                                 "entry was removed: build the sampler again")
        rows, path = None, ""
        if not bool(counts["ordered"]) and int(offsets[-1]) > 0:  # no row kept: nothing to sort
            if final is not None:
                rows, path = _cached_rows(ids, uniq, offsets, final, dtype, pair_offsets), str(final)
            else:  # no disk cache, or ids in memory: an unlinked temporary file, gone with the process
                kept = int(offsets[-1])
                with tempfile.TemporaryFile(prefix="datapipe-topic_rows-") as f:  # the map outlives the closed file
                    f.truncate(kept * dtype.itemsize)
                    rows = np.memmap(f, dtype=dtype, mode="r+", shape=(kept,))
                _scatter(ids, uniq, offsets, rows, pair_offsets)
    index = ClusterIndex(uniq, offsets, rows, path, cached is not None, skipped)
    _INDEXES[key] = index
    while len(_INDEXES) > 2:
        _INDEXES.popitem(last=False)
    return index


# ---- the epoch's layout ----------------------------------------------------------------------------------------
class Pool(NamedTuple):
    """The top-up pool (rows the pure batches leave over) as ``S`` segments of clusters, in pool order."""

    #: int32 ``[S]`` cluster of each segment (pieces shuffled)
    cluster: np.ndarray
    #: int64 ``[S]`` first position of the segment in its cluster's order
    start: NDArray[np.int64]
    #: int64 ``[S + 1]`` pool position of each segment (segment ``s`` has ``cum[s+1] - cum[s]`` rows)
    cum: NDArray[np.int64]


@dataclasses.dataclass
class Layout:
    """One epoch of the topic-aware plan, by chunk names and segments (no rows).

    Attributes:
        m: rows per chunk, ``ceil(batch_size / clusters_per_batch)``.
        chunk_c, chunk_i: int32 (int64 past 2**31 chunks) ``[ng * cpb]`` cluster and chunk index of the shuffled chunks of the pure batches
            (pure batch ``j`` is chunks ``j*cpb .. (j+1)*cpb - 1``, its first ``batch_size`` rows).
        ng: pure batches.
        pool: the top-up pool's segments (:class:`Pool`).
        top_sizes: int64 ``[T]`` rows per top-up batch (top-up ``t`` is pool positions ``[t*bs, t*bs + size)``).
        order: int64 ``[B]`` plan batch ``g`` is batch ``order[g]`` (pure ``j < ng``, else top-up ``j - ng``).
        sizes: int64 ``[B]`` rows of plan batch ``g``.
        dropped: reason -> rows.
        voff: int64 ``[B + 1]`` stream position of plan batch ``g`` (computed).
    """

    m: int
    chunk_c: np.ndarray
    chunk_i: np.ndarray
    ng: int
    pool: Pool
    top_sizes: NDArray[np.int64]
    order: NDArray[np.int64]
    sizes: NDArray[np.int64]
    dropped: dict

    def __post_init__(self) -> None:
        self.voff = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.voff[1:])


def _ranges(starts: NDArray[np.int64], lens: NDArray[np.int64]) -> NDArray[np.int64]:
    first = np.cumsum(lens) - lens
    return np.repeat(starts - first, lens) + np.arange(int(lens.sum()), dtype=np.int64)


def epoch_layout(sizes: NDArray[np.int64], batch_size: int, clusters_per_batch: int, drop_last: bool,
                 seeds: tuple[int, int, int]) -> Layout:
    """The exact plan's chunking, grouping, pool and batch order on chunk names (``samplers.topic_aware``'s
    ``_topic_batches`` with the same permutations, so every slot's cluster matches it).

    Args:
        sizes: int64 ``[K]`` rows of each (non-empty) cluster.
        batch_size, clusters_per_batch, drop_last: the sampler's options.
        seeds: the seeds of the chunk shuffle, the piece shuffle and the batch order (``epoch_seed(epoch, 2)``,
            ``(epoch, 3)``, ``(epoch, 4)``).
    """
    bs, cpb = int(batch_size), int(clusters_per_batch)
    m = -(-bs // cpb)
    k = len(sizes)
    nfull = sizes // m
    rem = sizes - nfull * m
    nf = int(nfull.sum())
    idx32 = np.int32 if max(k, int(nfull.max(initial=0))) < (1 << 31) else np.int64
    chunk_c = np.repeat(np.arange(k, dtype=idx32), nfull)
    chunk_i = (np.arange(nf, dtype=np.int64) - np.repeat(np.cumsum(nfull) - nfull, nfull)).astype(idx32)
    perm = permutation(nf, seeds[0])
    chunk_c, chunk_i = chunk_c[perm], chunk_i[perm]
    del perm
    ng = nf // cpb
    # pool pieces, in the exact plan's order: remainders, leftover chunks, then each group's overflow rows
    has_rem = np.flatnonzero(rem > 0)
    left = slice(ng * cpb, nf)
    p_c = [has_rem.astype(np.int64), chunk_c[left].astype(np.int64)]
    p_s = [(nfull * m)[has_rem], chunk_i[left].astype(np.int64) * m]
    p_l = [rem[has_rem], np.full(nf - ng * cpb, m, dtype=np.int64)]
    npieces = len(has_rem) + (nf - ng * cpb)
    seg_per_piece = [np.ones(npieces, dtype=np.int64)]
    over = cpb * m - bs
    if over and ng:  # the group's rows [bs, cpb*m): the tail of slot k0, then slots k0+1 .. cpb-1 whole
        k0 = bs // m
        slots = np.arange(k0, cpb)
        cut = np.maximum(slots * m, bs) - slots * m  # where the overflow starts inside each slot's chunk
        gc = chunk_c[: ng * cpb].reshape(ng, cpb)[:, k0:].astype(np.int64)
        gi = chunk_i[: ng * cpb].reshape(ng, cpb)[:, k0:].astype(np.int64)
        p_c.append(gc.ravel())
        p_s.append((gi * m + cut).ravel())
        p_l.append(np.broadcast_to(m - cut, gc.shape).ravel().astype(np.int64))
        seg_per_piece.append(np.full(ng, cpb - k0, dtype=np.int64))
        npieces += ng
    seg_c_all = np.concatenate(p_c)
    seg_s_all = np.concatenate(p_s).astype(np.int64)
    seg_l_all = np.concatenate(p_l).astype(np.int64)
    spp = np.concatenate(seg_per_piece)
    piece_first = np.cumsum(spp) - spp
    rank = permutation(npieces, seeds[1])
    by_rank = np.argsort(rank, kind="stable")  # pieces in pool order (the exact plan's stable argsort of ranks)
    segs = _ranges(piece_first[by_rank], spp[by_rank])
    seg_len = seg_l_all[segs]
    pool = Pool(seg_c_all[segs].astype(idx32), seg_s_all[segs], np.zeros(len(seg_len) + 1, dtype=np.int64))
    np.cumsum(seg_len, out=pool.cum[1:])
    npool = int(pool.cum[-1])
    n_top = -(-npool // bs)
    top_sizes = np.full(n_top, bs, dtype=np.int64)
    dropped: dict = {}
    if n_top and npool % bs:
        if drop_last:
            dropped["incomplete_batch"] = npool % bs
            top_sizes = top_sizes[:-1]
        else:
            top_sizes[-1] = npool % bs
    all_sizes = np.concatenate([np.full(ng, bs, dtype=np.int64), top_sizes])
    order = permutation(len(all_sizes), seeds[2])
    return Layout(m, chunk_c[: ng * cpb], chunk_i[: ng * cpb], ng, pool, top_sizes, order, all_sizes[order], dropped)


def batch_segments(lay: Layout, j: int, batch_size: int, clusters_per_batch: int, lo: int,
                   hi: int) -> tuple[NDArray, NDArray[np.int64], NDArray[np.int64]]:
    """Segments ``(cluster, start, length)`` holding rows ``[lo, hi)`` of batch ``j`` (pure ``j < ng``, else
    top-up ``j - ng``), in batch order."""
    if j < lay.ng:
        cpb, m = clusters_per_batch, lay.m
        c = lay.chunk_c[j * cpb : (j + 1) * cpb].astype(np.int64)
        start = lay.chunk_i[j * cpb : (j + 1) * cpb].astype(np.int64) * m
        cum = np.arange(cpb + 1, dtype=np.int64) * m
    else:
        t = j - lay.ng
        a, b = t * batch_size + lo, t * batch_size + hi
        pool = lay.pool
        s0 = int(np.searchsorted(pool.cum, a, side="right")) - 1
        s1 = int(np.searchsorted(pool.cum, b, side="left"))
        c = pool.cluster[s0:s1].astype(np.int64)
        start, cum = pool.start[s0:s1], pool.cum[s0 : s1 + 1] - t * batch_size
    # clip every segment to [lo, hi) of the batch
    s_lo = np.clip(cum[:-1], lo, hi)
    s_hi = np.clip(cum[1:], lo, hi)
    keep = s_hi > s_lo
    return c[keep], (start + s_lo - cum[:-1])[keep], (s_hi - s_lo)[keep]


def _purity(batch: NDArray[np.int64], cluster: NDArray[np.int64], rows: NDArray[np.int64], k: int,
            nb: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Largest cluster's share and distinct clusters of each of ``nb`` batches, from (batch, cluster, rows) parts."""
    keep = rows > 0
    key = batch[keep] * max(k, 1) + cluster[keep]
    uk, inv = np.unique(key, return_inverse=True)
    tot = np.bincount(inv.ravel(), weights=rows[keep], minlength=len(uk))
    ub = uk // max(k, 1)
    distinct = np.bincount(ub, minlength=nb)
    size = np.bincount(ub, weights=tot, minlength=nb)
    starts = np.searchsorted(ub, np.arange(nb))
    largest = np.maximum.reduceat(tot, np.minimum(starts, len(tot) - 1)) if len(tot) else np.zeros(nb)
    return np.where(size > 0, largest / np.maximum(size, 1), 0.0), distinct


def layout_purity(lay: Layout, k: int, batch_size: int, clusters_per_batch: int) -> dict:
    """Topic purity of the epoch's batches (before they are evened out across ranks): summary numbers from the
    layout alone, O(batches) memory."""
    bs, cpb, m = batch_size, clusters_per_batch, lay.m
    ng, nt = lay.ng, len(lay.top_sizes)
    slot_len = np.clip(bs - np.arange(cpb) * m, 0, m).astype(np.int64)
    pb, pc, pr = (np.repeat(np.arange(ng, dtype=np.int64), cpb), lay.chunk_c.astype(np.int64),
                  np.tile(slot_len, ng))
    # top-ups: pool segments split at batch boundaries (a segment is at most m <= bs rows: two parts at most)
    kept = int(lay.top_sizes.sum())
    a, b = np.minimum(lay.pool.cum[:-1], kept), np.minimum(lay.pool.cum[1:], kept)
    t0 = a // bs
    mid = np.minimum(b, (t0 + 1) * bs)
    tb = np.concatenate([t0, t0 + 1]) + ng
    tc = np.concatenate([lay.pool.cluster, lay.pool.cluster]).astype(np.int64)
    tr = np.concatenate([mid - a, b - mid])
    pur, distinct = _purity(np.concatenate([pb, tb]), np.concatenate([pc, tc]), np.concatenate([pr, tr]), k,
                            ng + nt)
    nb = ng + nt
    return {"topic_purity_mean": float(pur.mean()) if nb else 0.0, "topic_purity_min": float(pur.min()) if nb else 0.0,
            "clusters_in_batch_max": int(distinct.max()) if nb else 0,
            "batches_over_cluster_limit": int((distinct > cpb).sum()), "topup_batches": int(nt)}
