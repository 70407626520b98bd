"""The ``topic_pairs`` kind of ``bench_scale.py``: TopicAwareBatchSampler WITH a pair table at scale (issue 15).

Metadata, written in chunks under ``--tmp`` as memory-mapped ``.npy`` files (deleted with bench_scale's others):
int32 cluster ids over 10,000 clusters (``bench_scale.cluster_ids_file``), and a CSR pair table of
``PAIRS_PER_QUERY`` pairs per query on average (uniform in ``0 .. 2 * PAIRS_PER_QUERY``, so some queries have none;
below 1, one pair for that share of the queries and none for the others):
int64 offsets, int32 positive and negative ids, float32 margins. The sampler's ``PairTable`` is built from the
memory maps inside the timed constructor (its chunked validation is part of the first construction; a fresh
process reads the passed check from the plan cache).

Bytes on disk: ``12 * Q`` (ids, offsets) ``+ 12 * P`` (pairs) ``+ 4 * Q`` (the rows-by-cluster file): 1e8 queries
with 4 pairs each ~6.4 GB. ``DATAPIPE_BENCH_PAIRS_PER_QUERY`` sets ``PAIRS_PER_QUERY`` (e.g. 2 for 3e8 queries,
0.125 for 1e9 queries in ~14 GB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["PAIRS_PER_QUERY", "make_topic_pairs", "pair_files", "warm_up_topic_pairs"]

PAIRS_PER_QUERY = float(os.environ.get("DATAPIPE_BENCH_PAIRS_PER_QUERY", "4"))
_COLS = (("offsets", np.int64), ("pos", np.int32), ("neg", np.int32), ("margin", np.float32))


def pair_files(n: int, tmp: Path) -> dict[str, Path]:
    """The pair table of ``n`` queries as four ``.npy`` files (written once, in chunks of 2**24 queries)."""
    k = PAIRS_PER_QUERY
    paths = {c: tmp / f"bench_scale_tpairs{k:g}_{c}_{n}.npy" for c, _ in _COLS}
    if all(p.exists() for p in paths.values()):
        return paths
    rng = np.random.default_rng(3)
    step = 1 << 24
    counts = []
    for a in range(0, n, step):  # counts first (the total sizes the pair files)
        m = min(n, a + step) - a
        counts.append(rng.integers(0, 2 * int(k) + 1, m).astype(np.int8) if k >= 1 else (rng.random(m) < k).astype(np.int8))
    total = int(sum(int(c.sum(dtype=np.int64)) for c in counts))
    parts = {c: paths[c].with_suffix(".part.npy") for c in paths}
    off = np.lib.format.open_memmap(parts["offsets"], mode="w+", dtype=np.int64, shape=(n + 1,))
    off[0] = 0
    base = 0
    for i, c in enumerate(counts):
        a = i * step
        off[a + 1 : a + 1 + len(c)] = base + np.cumsum(c, dtype=np.int64)
        base = int(off[a + len(c)])
    off.flush()
    del off, counts
    for name, dtype in _COLS[1:]:
        mm = np.lib.format.open_memmap(parts[name], mode="w+", dtype=dtype, shape=(total,))
        for a in range(0, total, step):
            m = min(total, a + step) - a
            mm[a : a + m] = (rng.normal(0.0, 3.0, m) if name == "margin" else rng.integers(0, 8_800_000, m))
        mm.flush()
        del mm
    for c, path in paths.items():
        parts[c].rename(path)
    return paths


def make_topic_pairs(n: int, tmp: Path, ids_file: Path, kw: dict):
    """The constructor the case times: a PairTable over the memory maps, then the sampler (batch 1024)."""
    import samplers

    paths = pair_files(n, tmp)
    ids = np.load(ids_file, mmap_mode="r")

    def build():
        pairs = samplers.PairTable(*[np.load(paths[c], mmap_mode="r") for c, _ in _COLS])
        return samplers.TopicAwareBatchSampler(ids, batch_size=1024, pairs=pairs, **kw)

    return build


def warm_up_topic_pairs() -> None:
    """Load the kernels of both paths on a tiny table of the same dtypes (read-only, as memory maps are)."""
    import samplers
    import samplers.topic_aware as ta

    ids = (np.arange(5000) % 37).astype(np.int32)
    counts = np.arange(5000) % 5
    arrs = [np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)]
    p = int(arrs[0][-1])
    arrs += [np.arange(p, dtype=np.int32), np.arange(p, dtype=np.int32), np.linspace(-1, 1, p, dtype=np.float32)]
    for a in (ids, *arrs):
        a.setflags(write=False)
    saved = ta.EXACT_MAX_ROWS
    try:
        for limit in (0, 1 << 62):
            ta.EXACT_MAX_ROWS = limit
            next(iter(samplers.TopicAwareBatchSampler(ids, batch_size=64, pairs=samplers.PairTable(*arrs), seed=1,
                                                      rank=3, world_size=8)))
    finally:
        ta.EXACT_MAX_ROWS = saved
