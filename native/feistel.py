"""Stateless seeded permutations of ``[0, n)``: a Feistel network with cycle walking.

An index shuffle that needs no memory: position ``i`` of a seeded permutation of ``[0, n)`` is computed on its
own, in O(1) time and space, so a sampler can walk a billion-row domain in a fresh random order each pass
without materialising an 800 MB permutation. The construction is the classic one of Luby and Rackoff, "How to
construct pseudorandom permutations from pseudorandom functions" (SIAM J. Comput., 1988), on the next even
power of two ``m >= n``, restricted to ``[0, n)`` by cycle walking (Black and Rogaway, "Ciphers with arbitrary
finite domains", CT-RSA 2002), as in grain's and MosaicML streaming's index shuffles. Round functions are
SplitMix64 finalisers keyed by round keys drawn from the seed.

Since ``m < 4 n``, cycle walking takes fewer than 4 network evaluations per index on average.

The module also holds the kernel that reads a *permuted stream*: the concatenation of fresh permutations of a
domain's rows, pass after pass (pass ``p`` keyed by ``mix_seed(*prefix, p)``), and assembles fixed-composition
batches from it (:func:`stream_batches`), which is what ``samplers.MixtureBatchSampler`` iterates with.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import MASK63 as _MASK63
from native.rng import fmix64, mix_prefix, mix_step, shuffle_from, splitmix64_next

__all__ = ["feistel_index", "feistel_keyed", "feistel_permute", "feistel_range", "half_bits", "mix_prefix", "mix_step",
           "round_keys", "shard_window_rows", "stream_batches"]

#: Feistel rounds; 8 keeps small domains (n of a few elements) close to uniform over seeds.
ROUNDS = 8
#: Largest ``n`` supported (the network works on at most 62 bits).
MAX_N = 1 << 62


@njit
def round_keys(seed: np.uint64) -> np.ndarray:
    """The network's ``ROUNDS`` round keys: the first outputs of the SplitMix64 stream started at ``seed``.

    Bare kernels (no checks), shared with ``native.windows``: ``feistel_keyed(i, n, half_bits(n),
    round_keys(seed))`` is :func:`feistel_index` without its argument checks.
    """
    keys = np.empty(ROUNDS, dtype=np.uint64)
    s = np.uint64(seed)
    for r in range(ROUNDS):
        s, keys[r] = splitmix64_next(s)
    return keys


@njit
def half_bits(n: np.int64) -> np.int64:
    """Half the bits of the network domain: the smallest ``h >= 1`` with ``4**h >= n``."""
    h = 1
    while (np.int64(1) << (2 * h)) < n:
        h += 1
    return h


@njit
def feistel_keyed(i: np.int64, n: np.int64, h: np.int64, keys: np.ndarray) -> np.int64:
    """Image of ``i`` (in ``[0, n)``) under the keyed network on ``[0, 4**h)``, cycle-walked into ``[0, n)``."""
    mask = np.uint64((1 << h) - 1)
    uh = np.uint64(h)
    x = np.uint64(i)
    while True:
        left = x >> uh
        right = x & mask
        for r in range(ROUNDS):
            f = fmix64(right ^ keys[r]) & mask
            left, right = right, left ^ f
        x = (left << uh) | right
        if x < np.uint64(n):
            return np.int64(x)


@njit
def feistel_index(i: np.int64, n: np.int64, seed: np.uint64) -> np.int64:
    """Position ``i`` of the seeded permutation of ``[0, n)`` (scalar kernel, callable from other kernels).

    Args:
        i: position in ``[0, n)``.
        n: domain size, ``1 <= n <= 2**62``.
        seed: uint64 seed.

    Returns:
        the permuted element, in ``[0, n)``.
    """
    if n <= 1:
        return np.int64(0)
    return feistel_keyed(i, n, half_bits(n), round_keys(seed))


@njit
def _feistel_permute(indices: np.ndarray, n: np.int64, seed: np.uint64) -> np.ndarray:
    out = np.empty(indices.shape[0], dtype=np.int64)
    if n <= 1:
        out[:] = 0
        return out
    h = half_bits(n)
    keys = round_keys(seed)
    for k in range(indices.shape[0]):
        out[k] = feistel_keyed(indices[k], n, h, keys)
    return out


def feistel_permute(indices: NDArray[np.int64], n: int, seed: int) -> NDArray[np.int64]:
    """Map positions to elements of a seeded permutation of ``[0, n)`` without materialising it.

    ``feistel_permute(np.arange(n), n, seed)`` is a permutation of ``range(n)``; any subset of positions costs
    O(len(indices)) time and no other memory. Bitwise reproducible for a seed on every machine.

    Args:
        indices: int64 ``[k]`` positions, each in ``[0, n)``.
        n: domain size, ``1 <= n <= 2**62``.
        seed: any integer (taken modulo 2**64).

    Returns:
        int64 ``[k]``: the elements at those positions.
    """
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_N:
        raise ValueError(f"n must be an integer in [1, 2**62] (got {n=})")
    idx = np.ascontiguousarray(indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D (got shape {idx.shape})")
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, n) = [0, {n}) (got min {idx.min()}, max {idx.max()})")
    return _feistel_permute(idx, np.int64(n), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))


# Seeds inside kernels: ``mix_prefix`` / ``mix_step`` are ``native.rng``'s one seed fold, re-exported here
# because the stream kernels below are keyed by them.


# ---- permuted streams ----------------------------------------------------------------------------------------
@njit
def _stream_fill(out: np.ndarray, at: np.int64, start: np.int64, count: np.int64, size: np.int64,
                 offset: np.int64, prefix: np.uint64) -> None:
    """Rows of stream positions ``[start, start + count)`` written to ``out[at:]``; pass ``p`` is keyed by
    ``mix_step(prefix, p) & 2**63-1``."""
    h = half_bits(size) if size > 1 else np.int64(1)
    k = start
    end = start + count
    while k < end:
        p = k // size
        i = k - p * size
        stop = min(end, (p + 1) * size)
        if size > 1:
            keys = round_keys(mix_step(prefix, np.uint64(p)) & _MASK63)
            for q in range(i, i + (stop - k)):
                out[at] = feistel_keyed(q, size, h, keys) + offset
                at += 1
        else:
            for q in range(stop - k):
                out[at] = offset
                at += 1
        k = stop


@njit
def _stream_batches(starts: np.ndarray, counts: np.ndarray, sizes: np.ndarray, offsets: np.ndarray,
                    prefixes: np.ndarray, batch_ids: np.ndarray, shuffle_prefix: np.uint64) -> np.ndarray:
    nb, nd = counts.shape
    total = 0
    for b in range(nb):
        for d in range(nd):
            total += counts[b, d]
    out = np.empty(total, dtype=np.int64)
    at = 0
    for b in range(nb):
        first = at
        for d in range(nd):
            c = np.int64(counts[b, d])
            if c > 0:
                _stream_fill(out, at, starts[b, d], c, sizes[d], offsets[d], prefixes[d])
                at += c
        shuffle_from(out[first:at], mix_step(shuffle_prefix, np.uint64(batch_ids[b])) & _MASK63)
    return out


def stream_batches(starts: NDArray[np.int64], counts: NDArray, sizes: NDArray[np.int64], offsets: NDArray[np.int64],
                   prefixes: NDArray[np.uint64], batch_ids: NDArray[np.int64], shuffle_prefix: int) -> NDArray[np.int64]:
    """Assemble batches from per-domain permuted streams, batch after batch.

    Domain ``d``'s stream is pass 0, pass 1, ... of fresh permutations of its ``sizes[d]`` rows; pass ``p`` is
    ``feistel_permute(., sizes[d], mix_step(prefixes[d], p) & 2**63-1)``, i.e. ``mix_seed(*parts_d, p)`` when
    ``prefixes[d] == mix_prefix(*parts_d)``. Batch ``b`` takes stream positions
    ``[starts[b, d], starts[b, d] + counts[b, d])`` of each domain (plus ``offsets[d]``), then its rows are
    shuffled with seed ``mix_step(shuffle_prefix, batch_ids[b]) & 2**63-1``.

    Args:
        starts: int64 ``[B, D]`` first stream position per batch and domain.
        counts: integer ``[B, D]`` rows per batch and domain (any integer dtype).
        sizes: int64 ``[D]`` rows per domain (``>= 1``).
        offsets: int64 ``[D]`` first row of each domain.
        prefixes: uint64 ``[D]`` pass-seed prefixes.
        batch_ids: int64 ``[B]`` ids that seed the in-batch shuffles.
        shuffle_prefix: integer prefix of the in-batch shuffle seeds.

    Returns:
        int64 ``[counts.sum()]``: the rows, batch after batch.
    """
    return _stream_batches(np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(counts),
                           np.ascontiguousarray(sizes, dtype=np.int64), np.ascontiguousarray(offsets, dtype=np.int64),
                           np.ascontiguousarray(prefixes, dtype=np.uint64),
                           np.ascontiguousarray(batch_ids, dtype=np.int64),
                           np.uint64(int(shuffle_prefix) & 0xFFFFFFFFFFFFFFFF))


# ---- ranges of a permutation, and shard-window shuffles ------------------------------------------------------
@njit
def _feistel_range(start: np.int64, stop: np.int64, n: np.int64, seed: np.uint64) -> np.ndarray:
    out = np.empty(stop - start, dtype=np.int64)
    if n <= 1:
        out[:] = 0
        return out
    h = half_bits(n)
    keys = round_keys(seed)
    for k in range(stop - start):
        out[k] = feistel_keyed(start + k, n, h, keys)
    return out


def feistel_range(start: int, stop: int, n: int, seed: int) -> NDArray[np.int64]:
    """``feistel_permute(np.arange(start, stop), n, seed)`` without the ``arange``: positions ``[start, stop)`` of
    the seeded permutation of ``[0, n)``.

    Args:
        start, stop: ``0 <= start <= stop <= n``.
        n: domain size, ``1 <= n <= 2**62``.
        seed: any integer (taken modulo 2**64).

    Returns:
        int64 ``[stop - start]``.
    """
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_N:
        raise ValueError(f"n must be an integer in [1, 2**62] (got {n=})")
    if not 0 <= start <= stop <= n:
        raise ValueError(f"need 0 <= start <= stop <= n (got {start=}, {stop=}, {n=})")
    return _feistel_range(np.int64(start), np.int64(stop), np.int64(n), np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))


@njit
def _shard_window_rows(start: np.int64, stop: np.int64, cum: np.ndarray, first_row: np.ndarray, window: np.int64,
                       prefix: np.uint64) -> np.ndarray:
    out = np.empty(stop - start, dtype=np.int64)
    num_shards = cum.shape[0] - 1
    p = start
    at = 0
    while p < stop:
        s = np.searchsorted(cum, p, side="right") - 1
        w = s // window
        lo_s = w * window
        hi_s = min(num_shards, lo_s + window)
        lo = cum[lo_s]
        m = cum[hi_s] - lo
        end = min(stop, cum[hi_s])
        h = half_bits(m) if m > 1 else np.int64(1)
        keys = round_keys(mix_step(prefix, np.uint64(w)) & _MASK63)
        part = cum[lo_s : hi_s + 1]
        for q in range(p - lo, end - lo):
            x = feistel_keyed(q, m, h, keys) if m > 1 else np.int64(0)
            t = lo + x
            j = lo_s + np.searchsorted(part, t, side="right") - 1
            out[at] = first_row[j] + (t - cum[j])
            at += 1
        p = end
    return out


def shard_window_rows(start: int, stop: int, shard_rows: NDArray[np.int64], shard_first_row: NDArray[np.int64],
                      window: int, prefix: int) -> NDArray[np.int64]:
    """Rows at positions ``[start, stop)`` of a shard-window shuffle (Mosaic streaming's ``py1b``, stateless).

    The stream is the shards in the given order (``shard_rows[j]`` rows starting at dataset row
    ``shard_first_row[j]``), cut into windows of ``window`` consecutive shards; window ``w``'s rows are
    permuted among themselves by a Feistel permutation keyed ``mix_step(prefix, w) & 2**63-1``. A batch then
    touches at most the shards of one or two windows, and any position costs O(log shards).

    Args:
        start, stop: stream positions, ``0 <= start <= stop <= shard_rows.sum()``.
        shard_rows: int64 ``[S]`` rows per shard, in stream (shuffled) order.
        shard_first_row: int64 ``[S]`` first dataset row of each of those shards.
        window: shards per window, ``>= 1``.
        prefix: fold state from :func:`mix_prefix` (the window seeds continue it).

    Returns:
        int64 ``[stop - start]`` dataset rows.
    """
    rows = np.ascontiguousarray(shard_rows, dtype=np.int64)
    first = np.ascontiguousarray(shard_first_row, dtype=np.int64)
    if rows.ndim != 1 or first.shape != rows.shape:
        raise ValueError(f"shard_rows and shard_first_row must be 1-D of one length (got {rows.shape}, {first.shape})")
    if window < 1:
        raise ValueError(f"window must be >= 1 shard (got {window=})")
    cum = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(rows, out=cum[1:])
    if not 0 <= start <= stop <= cum[-1]:
        raise ValueError(f"need 0 <= start <= stop <= {int(cum[-1])} rows (got {start=}, {stop=})")
    return _shard_window_rows(np.int64(start), np.int64(stop), cum, first, np.int64(window),
                              np.uint64(int(prefix) & 0xFFFFFFFFFFFFFFFF))
