"""Balanced hierarchical 2-means, one tree level at a time as batched tensor operations.

Implements the clustering of "NGAME: Negative Mining-aware Mini-batching for Extreme Classification"
(Dahiya et al., WSDM 2023), which the reference code takes from pyxclib's ``cluster_balance`` /
``b_kmeans_dense``: every cluster is split into two halves of (almost) equal size by spherical 2-means where the
assignment step is *balanced* (members are sorted by ``cos(x, c0) - cos(x, c1)`` and the first half goes to
``c0``), and splitting repeats until the clusters reach the target size.

The reference splits one cluster at a time in a Python loop. Here every group of one tree level is split at once:
on CUDA the level's groups are gathered into a padded ``(groups, size, dim)`` tensor and the 2-means iterations
are batched matrix products and one batched sort; on the CPU one Numba kernel per level runs the groups in a
parallel loop (tiny per-group matrix products are what make batched BLAS slow there), bitwise deterministic for
a seed whatever the thread count. The same tensor path also runs on the CPU (``device="torch-cpu"``), so the
CUDA code is tested without a GPU.

Unlike the reference (which only makes a power-of-two number of clusters), any number of clusters ``K`` is
supported: the leaves get target sizes that differ by at most one, and a group holding leaves ``[a, b)`` is split
into leaves ``[a, m)`` and ``[m, b)`` with exactly the rows those leaves need. All cluster sizes therefore differ
by at most one, for any ``n``.
"""

from __future__ import annotations

import numpy as np
from numba import prange
from numpy.typing import ArrayLike, NDArray

from native._config import njit
from native.rng import mix_seed, splitmix64_at_many

__all__ = ["balanced_kmeans", "leaf_sizes"]

#: elements of one gathered (groups, size, dim) block; bounds the extra memory to ~128 MB of float32.
_BLOCK_ELEMS = 1 << 25


def init_pairs(seed: int, level: int, group_keys: NDArray[np.int64], sizes: NDArray[np.int64]) -> NDArray[np.int64]:
    """Two distinct member positions per group (the first centroids), a pure function of (seed, level, group).

    Args:
        seed: the clustering seed.
        level: tree level (0 at the root).
        group_keys: int64 ``[G]`` a unique key per group at this level (its first leaf).
        sizes: int64 ``[G]`` group sizes, each ``>= 2``.

    Returns:
        int64 ``[G, 2]`` positions inside each group, distinct within a row.
    """
    s = mix_seed(seed, level, 0xBA1A)
    # counter-based SplitMix64 draws (keys 2g and 2g+1), so the pair of a group is independent of the others
    h1 = splitmix64_at_many(s, 2 * group_keys)
    h2 = splitmix64_at_many(s, 2 * group_keys + 1)
    sz = sizes.astype(np.uint64)
    p1 = (h1 % sz).astype(np.int64)
    p2 = (h2 % (sz - np.uint64(1))).astype(np.int64)
    p2 = p2 + (p2 >= p1)
    return np.stack([p1, p2], axis=1)


def leaf_sizes(n: int, num_clusters: int) -> NDArray[np.int64]:
    """Target size of each leaf: ``n`` rows over ``num_clusters`` leaves, sizes differing by at most one.

    The larger leaves come first. Returns int64 ``[num_clusters]`` summing to ``n``.
    """
    q, r = divmod(n, num_clusters)
    out = np.full(num_clusters, q, dtype=np.int64)
    out[:r] += 1
    return out


def _resolve_device(device: str) -> str:
    """``"cpu"`` (the Numba kernel), ``"torch-cpu"`` (the batched tensor path on the CPU) or a CUDA device."""
    if device in ("cpu", "torch-cpu"):
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'torch-cpu' or 'cuda[:i]' (got {device=})")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch sees no CUDA device; use device='auto'")
    return device


@njit(parallel=True)
def _split_level_numba(xs, perm, starts, sizes, lefts, pairs, niter):
    """Balanced 2-means split of every group of one level (groups are independent: a parallel loop over groups
    with no float reduction across threads, so the result does not depend on the thread count)."""
    out = perm.copy()
    d = xs.shape[1]
    for g in prange(starts.shape[0]):
        s0 = starts[g]
        m = sizes[g]
        L = lefts[g]
        rows = perm[s0 : s0 + m]
        total = np.zeros(d, dtype=np.float64)
        for j in range(m):
            r = rows[j]
            for k in range(d):
                total[k] += xs[r, k]
        w = np.empty(d, dtype=np.float32)
        a = rows[pairs[g, 0]]
        b = rows[pairs[g, 1]]
        for k in range(d):
            w[k] = xs[a, k] - xs[b, k]
        neg_score = np.empty(m, dtype=np.float32)
        in_left = np.zeros(m, dtype=np.bool_)
        prev = np.zeros(m, dtype=np.bool_)
        lsum = np.empty(d, dtype=np.float64)
        order = np.arange(m)
        for it in range(niter):
            for j in range(m):
                r = rows[j]
                acc = np.float32(0.0)
                for k in range(d):
                    acc += xs[r, k] * w[k]
                neg_score[j] = -acc  # cos(x, c0) - cos(x, c1), negated for an ascending stable sort
            order = np.argsort(neg_score, kind="mergesort")
            in_left[:] = False
            for j in range(L):
                in_left[order[j]] = True
            same = it > 0
            if same:
                for j in range(m):
                    if in_left[j] != prev[j]:
                        same = False
                        break
            if same:
                break
            prev[:] = in_left
            lsum[:] = 0.0
            for j in range(m):
                if in_left[j]:
                    r = rows[j]
                    for k in range(d):
                        lsum[k] += xs[r, k]
            n0 = 0.0
            n1 = 0.0
            for k in range(d):
                n0 += lsum[k] * lsum[k]
                n1 += (total[k] - lsum[k]) * (total[k] - lsum[k])
            n0 = max(np.sqrt(n0), 1e-12)
            n1 = max(np.sqrt(n1), 1e-12)
            for k in range(d):
                w[k] = np.float32(lsum[k] / n0 - (total[k] - lsum[k]) / n1)
        for j in range(m):
            out[s0 + j] = rows[order[j]]
    return out


def _split_block_torch(torch, xs, perm, starts, sizes, lefts, pairs, niter: int):
    """The same split as :func:`_split_level_numba` for a block of groups, as padded ``(G, S, d)`` tensors.

    Returns the new within-group order, int64 ``[G, S]`` positions (entries ``< size`` are valid; the first
    ``left`` go to the left child)."""
    dev = xs.device
    G = len(sizes)
    S = int(sizes.max())
    ar = torch.arange(S, device=dev)
    sizes_t = torch.as_tensor(sizes, device=dev)
    starts_t = torch.as_tensor(starts, device=dev)
    lefts_t = torch.as_tensor(lefts, device=dev)
    valid = ar[None, :] < sizes_t[:, None]  # (G, S)
    pos = torch.where(valid, starts_t[:, None] + ar[None, :], starts_t[:, None])
    X = xs[perm[pos]]  # (G, S, d): padding rows repeat the group's first row and are masked out
    total = torch.bmm(valid.to(X.dtype)[:, None, :], X)[:, 0, :]  # (G, d)
    pairs_t = torch.as_tensor(pairs, device=dev)
    C = torch.gather(X, 1, pairs_t[:, :, None].expand(G, 2, X.shape[2]))  # (G, 2, d)
    w = C[:, 0, :] - C[:, 1, :]
    neg_inf = torch.tensor(float("-inf"), device=dev, dtype=X.dtype)
    prev = None
    order = None
    for _ in range(niter):
        score = torch.einsum("gsd,gd->gs", X, w)  # cos(x, c0) - cos(x, c1) for unit rows and centroids
        score = torch.where(valid, score, neg_inf)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        in_left = torch.zeros((G, S), dtype=torch.bool, device=dev)
        in_left.scatter_(1, order, ar[None, :].expand(G, S) < lefts_t[:, None])
        if prev is not None and bool(torch.equal(in_left, prev)):
            break
        prev = in_left
        lsum = torch.bmm((in_left & valid).to(X.dtype)[:, None, :], X)[:, 0, :]
        rsum = total - lsum
        w = (lsum / lsum.norm(dim=1, keepdim=True).clamp_min(1e-12)
             - rsum / rsum.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return order


def _split_level_torch(xs, perm, starts, sizes, lefts, pairs, niter: int):
    import torch

    n, d = xs.shape
    dev = xs.device
    new_local = torch.arange(n, device=dev)
    per_block = max(1, _BLOCK_ELEMS // max(1, int(sizes.max()) * d))
    for b0 in range(0, len(sizes), per_block):
        sl = slice(b0, b0 + per_block)
        order = _split_block_torch(torch, xs, perm, starts[sl], sizes[sl], lefts[sl], pairs[sl], niter)
        S = order.shape[1]
        st = torch.as_tensor(starts[sl], device=dev)
        keep = torch.arange(S, device=dev)[None, :] < torch.as_tensor(sizes[sl], device=dev)[:, None]
        dst = (st[:, None] + torch.arange(S, device=dev)[None, :])[keep]
        new_local[dst] = (st[:, None] + order)[keep]
    return perm[new_local]


def balanced_kmeans(x: ArrayLike, cluster_size: int | None = None, *, num_clusters: int | None = None,
                    seed: int = 0, niter: int = 10, device: str = "auto") -> NDArray[np.int64]:
    """Cluster rows into balanced clusters by balanced hierarchical spherical 2-means.

    Rows are L2-normalised (cosine similarity, as in NGAME/pyxclib). The number of clusters is
    ``ceil(n / cluster_size)`` (or ``num_clusters``), so every cluster holds ``floor(n / K)`` or
    ``ceil(n / K)`` rows: sizes differ by at most one and never exceed ``cluster_size``.

    Args:
        x: ``[n, d]`` finite float matrix (any float dtype; computed in float32).
        cluster_size: the largest cluster size wanted, ``>= 1``.
        num_clusters: instead of ``cluster_size``, the number of clusters, ``1 <= K <= max(n, 1)``.
        seed: integer seed of the initial centroid picks; the same seed gives the same clusters on a given device.
        niter: at most this many balanced 2-means iterations per split (each split stops early once its
            assignment no longer changes).
        device: ``"auto"`` (CUDA when torch sees a GPU, else CPU), ``"cpu"`` (a Numba kernel, parallel over
            groups, bitwise deterministic for a seed whatever the thread count), ``"torch-cpu"`` (the batched
            tensor path that CUDA runs, on the CPU) or ``"cuda[:i]"``.

    Returns:
        int64 ``[n]`` cluster ids in ``[0, K)``. Ids follow the tree: clusters ``[a, b)`` that share an ancestor
        are contiguous, so neighbouring ids are similar clusters. ``np.bincount(ids)`` gives the sizes; the
        members of each cluster are ``np.argsort(ids, kind="stable")`` cut at ``np.cumsum(sizes)``.

    Raises:
        ValueError: bad shape, non-finite values, bad ``cluster_size``/``num_clusters``/``niter``/``device``.
    """
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"x must be a 2-D [n, d] matrix (got shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"x must be numeric (got dtype {arr.dtype})")
    n, d = arr.shape
    if (cluster_size is None) == (num_clusters is None):
        raise ValueError(f"give exactly one of cluster_size and num_clusters (got {cluster_size=}, {num_clusters=})")
    if cluster_size is not None:
        if not isinstance(cluster_size, (int, np.integer)) or cluster_size < 1:
            raise ValueError(f"cluster_size must be an integer >= 1 (got {cluster_size=})")
        K = max(1, -(-n // int(cluster_size)))
    else:
        if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= max(n, 1):
            raise ValueError(f"num_clusters must be an integer in [1, n={max(n, 1)}] (got {num_clusters=})")
        K = int(num_clusters)
    if not isinstance(niter, (int, np.integer)) or niter < 1:
        raise ValueError(f"niter must be an integer >= 1 (got {niter=})")
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    dev = _resolve_device(device)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if d == 0:
        raise ValueError(f"x must have at least one column (got shape {arr.shape})")
    xs = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(xs).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"x has NaN or inf values (first at row {bad}); clean or re-encode those rows")
    xs = xs / np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-12)

    targets = leaf_sizes(n, K)
    P = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(targets, out=P[1:])
    if dev == "cpu":
        perm = np.arange(n, dtype=np.int64)
        split_level = _split_level_numba
    else:
        import torch

        tdev = torch.device("cpu" if dev == "torch-cpu" else dev)
        xs = torch.as_tensor(xs).to(tdev)
        perm = torch.arange(n, device=tdev)
        split_level = _split_level_torch
    # perm lists the rows in tree order; the group holding leaves [lo, hi) owns perm[P[lo]:P[hi]]
    lo = np.zeros(1, dtype=np.int64)
    hi = np.full(1, K, dtype=np.int64)
    level = 0
    while (hi - lo).max() > 1:
        split = np.flatnonzero(hi - lo > 1)
        glo, ghi = lo[split], hi[split]
        mid = glo + (ghi - glo) // 2
        starts, sizes, lefts = P[glo], P[ghi] - P[glo], P[mid] - P[glo]
        pairs = init_pairs(int(seed), level, glo, sizes)
        perm = split_level(xs, perm, starts, sizes, lefts, pairs, int(niter))
        m = np.where(hi - lo > 1, lo + (hi - lo) // 2, hi)
        nlo = np.stack([lo, m], axis=1).ravel()
        nhi = np.stack([m, hi], axis=1).ravel()
        nonempty = nhi > nlo
        lo, hi = nlo[nonempty], nhi[nonempty]
        level += 1
    if not isinstance(perm, np.ndarray):
        perm = perm.cpu().numpy()
    ids = np.empty(n, dtype=np.int64)
    ids[perm] = np.repeat(np.arange(K, dtype=np.int64), targets)
    return ids
