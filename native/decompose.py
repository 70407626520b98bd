"""Dataset decomposition kernels: cut documents into power-of-two pieces, pack the tails, order buckets.

Implements the decomposition of "Dataset Decomposition: Faster LLM Training with Variable Sequence Length
Curriculum" (Pouransari et al., NeurIPS 2024). A document of ``L`` tokens (EOS included) is cut, front to back,
into non-overlapping pieces of ``2^k`` tokens, ``min_log2 <= k <= max_log2``, longest first (the binary
decomposition of ``L``). While ``2^(max_log2 + 1)`` or more tokens remain, the next piece's size is drawn with
probability proportional to ``2^(max_log2 - k)``, so long material spreads over all buckets. What is left at the
end (``< 2^min_log2`` tokens, the document's EOS among them) is the *tail*. The reference drops every tail; here
a ``remainder`` policy decides:

* ``"pack"``: tails are concatenated in document order and cut into sequences of ``2^min_log2`` tokens with no
  padding; a tail that straddles a cut becomes two pieces. Only the last packed sequence may be short (padded).
* ``"pad"``: every tail is its own ``2^min_log2`` sequence, padded (the loss mask covers the padding).
* ``"drop"``: tails are dropped and counted, as in the reference.

Randomness is a per-document SplitMix64 stream keyed by ``(seed, row)``, so any block of rows decomposes the
same way on its own (the Ray engine relies on it: blocks give byte-identical output to one local pass).
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.rng import splitmix64_next

__all__ = ["REMAINDER_POLICIES", "bucket_totals", "check_doc_lengths", "decompose_lengths"]

REMAINDER_POLICIES = ("pack", "pad", "drop")
_MAX_LOG2 = 40
_BLOCK_ROWS = 32768  # rows per block of the one-process path (many more blocks than cores)
_MAX_BLOCKS = 1024


# The random stream is ``native.rng``'s SplitMix64 (state hashed from the row, then xor the seed; one
# ``rand_below`` per size draw) with the state kept in a register instead of a one-element array: the same
# numbers, no allocation per document. The state is derived only for documents long enough to draw.
@njit(inline="always")
def _doc_seed(seed: np.uint64, row: np.int64) -> np.uint64:
    return splitmix64_next(np.uint64(row))[1] ^ seed


@njit(inline="always")
def _floor_log2(x: np.int64) -> np.int64:
    k = np.int64(0)
    while (np.int64(1) << (k + 1)) <= x:
        k += 1
    return k


@njit(inline="always")
def _draw_log2(s: np.uint64, min_log2: np.int64, max_log2: np.int64):
    # P(k) = 2^(max-k) / (2^(m+1) - 1), m = max - min: draw r in [0, 2^(m+1) - 1); j = floor(log2(r + 1)).
    # Returns (next state, k).
    s, z = splitmix64_next(s)
    n = np.uint64((np.int64(1) << (max_log2 - min_log2 + 1)) - 1)
    r = np.int64(((z >> np.uint64(32)) * n) >> np.uint64(32)) + 1
    return s, max_log2 - _floor_log2(r)


@njit(inline="always")
def count_tail(length, row, min_log2, max_log2, seed):
    # bucket pieces of one document and the tail left at its end; below 2^(max+1) tokens the pieces are the
    # set bits of the length from 2^min up (its binary decomposition), so only long documents draw
    rem = length
    c = np.int64(0)
    big = np.int64(1) << (max_log2 + 1)
    if rem >= big:
        s = _doc_seed(seed, row)
        while rem >= big:
            s, k = _draw_log2(s, min_log2, max_log2)
            rem -= np.int64(1) << k
            c += 1
    x = rem >> min_log2
    while x:
        x &= x - 1
        c += 1
    return c, rem & ((np.int64(1) << min_log2) - 1)


@njit(inline="always")
def _rem_pieces(a, t, cap_log2):
    # packed remainder pieces of a tail of t tokens at concatenated position a: one, plus one per multiple of
    # cap strictly inside (a, a + t)
    return 1 + ((a + t - 1) >> cap_log2) - (a >> cap_log2)


@njit(inline="always")
def _put(at, row, pos, length, seq, out_row, out_start, out_len, out_seq):
    # piece ``at`` of the output: ``length`` tokens at ``pos`` in document ``row``, part of training sequence ``seq``
    out_row[at] = row
    out_start[at] = pos
    out_len[at] = length
    out_seq[at] = seq


@njit(inline="always")
def _put_piece(row, pos, k, j, full_shift, out_row, out_start, out_len, out_seq, out_log2, write_seq, seq_tokens,
               seq_off):
    # bucket piece j (its own training sequence j) of 2^k tokens at pos in document row
    p = np.int64(1) << k
    w = j - full_shift
    _put(w, row, pos, p, j, out_row, out_start, out_len, out_seq)
    out_log2[w] = k
    if write_seq:
        seq_tokens[j] = p
        seq_off[j] = j


@njit(inline="always")
def fill_doc(length, row, min_log2, max_log2, seed, policy, j, o, c, nf, out_row, out_start, out_len, out_seq,
             out_log2, write_seq, seq_tokens, seq_off, full_shift, rem_seq):
    # one document: bucket pieces at j - full_shift (sequence j), then its tail's remainder pieces at o (packed
    # at concatenated tail position c, or padded as sequence rem_seq); returns the next (j, o, c)
    cap = np.int64(1) << min_log2
    big = np.int64(1) << (max_log2 + 1)
    rem = length
    pos = np.int64(0)
    if rem >= big:
        s = _doc_seed(seed, row)
        while rem >= big:
            s, k = _draw_log2(s, min_log2, max_log2)
            p = np.int64(1) << k
            _put_piece(row, pos, k, j, full_shift, out_row, out_start, out_len, out_seq, out_log2, write_seq,
                       seq_tokens, seq_off)
            pos += p
            rem -= p
            j += 1
    if rem >= cap:
        for k in range(max_log2, min_log2 - 1, -1):
            p = np.int64(1) << k
            if rem & p:
                _put_piece(row, pos, k, j, full_shift, out_row, out_start, out_len, out_seq, out_log2, write_seq,
                           seq_tokens, seq_off)
                pos += p
                j += 1
        rem &= cap - 1
    if rem == 0 or policy == 2:
        return j, o, c
    if policy == 1:
        _put(o, row, pos, rem, rem_seq, out_row, out_start, out_len, out_seq)
        if write_seq:
            seq_tokens[rem_seq] = rem
            seq_off[rem_seq] = o
        return j, o + 1, c
    while rem > 0:
        take = min(rem, cap - (c & (cap - 1)))
        _put(o, row, pos, take, nf + (c >> min_log2), out_row, out_start, out_len, out_seq)
        if write_seq and (c & (cap - 1)) == 0:
            seq_off[nf + (c >> min_log2)] = o
        o += 1
        pos += take
        rem -= take
        c += take
    return j, o, c


#: remainder policy name -> the code the kernels take.
POLICY_CODE = {"pack": 0, "pad": 1, "drop": 2}


# ---- one-process fast path: block-parallel layout, no per-document layout arrays --------------------------------
@njit(parallel=True)
def _plan_blocks(lengths, edges, min_log2, max_log2, seed, policy):
    # per block of rows: bucket pieces, tail tokens, non-empty tails, documents with no bucket piece and the
    # token total (pass 1), then its first piece / tail position / remainder piece (block prefix sums; for
    # "pack" a second pass counts the block's packed pieces from its first tail position). Integer sums only.
    nb = edges.shape[0] - 1
    stats = np.zeros((nb, 5), dtype=np.int64)
    for b in numba.prange(nb):
        pieces = tails = nonempty = bare = tokens = np.int64(0)
        for i in range(edges[b], edges[b + 1]):
            L = lengths[i]
            c, t = count_tail(L, i, min_log2, max_log2, seed)
            pieces += c
            tails += t
            tokens += L
            if t > 0:
                nonempty += 1
            if c == 0:
                bare += 1
        stats[b, 0] = pieces
        stats[b, 1] = tails
        stats[b, 2] = nonempty
        stats[b, 3] = bare
        stats[b, 4] = tokens
    base = np.zeros((nb + 1, 3), dtype=np.int64)  # piece, tail position, remainder piece
    for b in range(nb):
        base[b + 1, 0] = base[b, 0] + stats[b, 0]
        base[b + 1, 1] = base[b, 1] + (stats[b, 1] if policy != 2 else 0)
    rem = np.zeros(nb, dtype=np.int64)
    if policy == 1:
        for b in range(nb):
            rem[b] = stats[b, 2]
    elif policy == 0:
        for b in numba.prange(nb):
            a = base[b, 1]
            r = np.int64(0)
            for i in range(edges[b], edges[b + 1]):
                L = lengths[i]
                if L < (np.int64(1) << (max_log2 + 1)):
                    t = L & ((np.int64(1) << min_log2) - 1)
                else:
                    t = count_tail(L, i, min_log2, max_log2, seed)[1]
                if t:
                    r += _rem_pieces(a, t, min_log2)
                    a += t
            rem[b] = r
    for b in range(nb):
        base[b + 1, 2] = base[b, 2] + rem[b]
    return stats, base


@njit(parallel=True)
def _fill_blocks(lengths, edges, base, min_log2, max_log2, seed, policy, nf, out_row, out_start, out_len,
                 out_seq, out_log2, seq_tokens, seq_off):
    nb = edges.shape[0] - 1
    for b in numba.prange(nb):
        j, c, r = base[b, 0], base[b, 1], base[b, 2]
        o = nf + r
        for i in range(edges[b], edges[b + 1]):
            j, o2, c = fill_doc(lengths[i], i, min_log2, max_log2, seed, policy, j, o, c, nf, out_row, out_start,
                                 out_len, out_seq, out_log2, True, seq_tokens, seq_off, np.int64(0), nf + r)
            r += o2 - o
            o = o2


@njit(parallel=True)
def _bucket_totals(log2, tokens, num_k):
    # sequences and tokens per k (integer sums per thread-block, then added)
    n = log2.shape[0]
    nb = max(1, min(64, n // 65536))
    part = np.zeros((nb, 2, num_k), dtype=np.int64)
    for b in numba.prange(nb):
        for s in range(b * n // nb, (b + 1) * n // nb):
            part[b, 0, log2[s]] += 1
            part[b, 1, log2[s]] += tokens[s]
    out = np.zeros((2, num_k), dtype=np.int64)
    for b in range(nb):
        out += part[b]
    return out


@njit
def offsets_from_sorted(seq, num):
    off = np.empty(num + 1, dtype=np.int64)
    j = 0
    for s in range(num + 1):
        while j < seq.shape[0] and seq[j] < s:
            j += 1
        off[s] = j
    return off


def check_log2(min_log2: int, max_log2: int) -> tuple[int, int]:
    """Validate the bucket range: integers with ``0 <= min_log2 <= max_log2 <= 40`` and a span of at most 30."""
    for name, v in (("min_log2", min_log2), ("max_log2", max_log2)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v <= _MAX_LOG2:
            raise ValueError(f"{name} must be an integer in [0, {_MAX_LOG2}] (got {name}={v!r})")
    if min_log2 > max_log2:
        raise ValueError(f"min_log2 must be <= max_log2 (got {min_log2=}, {max_log2=})")
    if max_log2 - min_log2 > 30:  # the size draw takes an integer below 2^(span+1) with 32-bit precision
        raise ValueError(f"max_log2 - min_log2 must be <= 30 (got {min_log2=}, {max_log2=})")
    return int(min_log2), int(max_log2)


def check_doc_lengths(lengths, *, name: str = "lengths", allow_zero: bool = False) -> NDArray[np.int64]:
    """Validate document lengths: 1-D integers, ``>= 1`` (``>= 0`` with ``allow_zero``); returns int64."""
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers (got dtype {arr.dtype})")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    floor = 0 if allow_zero else 1
    bad = np.flatnonzero(arr < floor)
    if len(bad):
        what = "negative" if arr[bad[0]] < 0 else "zero (an empty document has no tokens and no EOS)"
        raise ValueError(
            f"{name} has a {what} length {int(arr[bad[0]])} at row {int(bad[0])} ({len(bad)} rows in all); "
            "remove such documents first"
        )
    return arr


def check_seed(seed: int) -> np.uint64:
    """Validate an integer seed and take it modulo 2**64 for the kernels."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    return np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)


def bucket_totals(sequence_log2, sequence_tokens, max_log2: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sequences and real tokens per bucket ``k`` (integer sums, one parallel pass).

    Args:
        sequence_log2, sequence_tokens: int64 ``[S]`` (``0 <= sequence_log2 <= max_log2``).
        max_log2: the largest ``k``.

    Returns:
        ``(sequences, tokens)``: int64 ``[max_log2 + 1]`` each.
    """
    log2 = np.ascontiguousarray(sequence_log2, dtype=np.int64)
    tokens = np.ascontiguousarray(sequence_tokens, dtype=np.int64)
    if len(log2) != len(tokens):
        raise ValueError(f"sequence_log2 and sequence_tokens differ in length ({len(log2)} vs {len(tokens)})")
    if len(log2) and not 0 <= int(log2.min()) <= int(log2.max()) <= max_log2:
        raise ValueError(f"sequence_log2 must lie in [0, {max_log2}] (got {int(log2.min())}..{int(log2.max())})")
    tot = _bucket_totals(log2, tokens, np.int64(max_log2 + 1))
    return tot[0], tot[1]


def decompose_lengths(lengths, *, min_log2: int = 8, max_log2: int = 13, remainder: str = "pack",
                      seed: int = 0) -> dict:
    """Decompose documents of the given lengths into power-of-two training sequences.

    Bucket pieces come first (one sequence each, in row then position order), then the remainder pieces of
    the policy (in row order; with ``"pack"`` consecutive tails share a sequence).

    Args:
        lengths: int ``[N]`` tokens per document, EOS included, each ``>= 1``.
        min_log2, max_log2: bucket sizes ``2^min_log2 .. 2^max_log2`` tokens (reference: 8 and 13).
        remainder: ``"pack"`` (default), ``"pad"`` or ``"drop"``: what becomes of each document's tail of
            fewer than ``2^min_log2`` tokens (see the module docstring).
        seed: seed of the size draws for documents of ``2^(max_log2+1)`` tokens or more.

    Returns:
        dict of int64 arrays, per piece ``[P]`` (sorted by sequence): ``row``, ``start``, ``length``,
        ``sequence``; per sequence ``[S]``: ``sequence_log2``, ``sequence_tokens`` (real tokens; less than
        ``2^k`` only for padded remainder sequences); ``sequence_offsets`` ``[S+1]`` (pieces of sequence ``s``
        are ``sequence_offsets[s]:sequence_offsets[s+1]``); and ints ``documents``, ``tokens``,
        ``kept_tokens``, ``dropped_tokens``, ``dropped_documents`` (no token kept), ``eos_kept`` (documents
        whose last token is kept), ``padded_tokens``.

    Raises:
        ValueError: ``min_log2 > max_log2``, an unknown ``remainder``, a length ``<= 0`` (names the row).
        TypeError: non-integer lengths or seed.
    """
    min_log2, max_log2 = check_log2(min_log2, max_log2)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    lengths = check_doc_lengths(lengths)
    seed64 = check_seed(seed)
    # the same output as scan_documents + plan_layout + fill_block + finish_output (the block API the Ray engine
    # uses), with the layout kept per block of rows instead of per document: pass 1 counts, pass 2 fills, both
    # over blocks in parallel; outputs are allocated once, by numpy (huge pages), and written once
    n = len(lengths)
    nb = max(1, min(_MAX_BLOCKS, -(-n // _BLOCK_ROWS)))
    edges = (np.arange(nb + 1, dtype=np.int64) * n) // nb
    lo_k, hi_k, code = np.int64(min_log2), np.int64(max_log2), np.int64(POLICY_CODE[remainder])
    with numba.parallel_chunksize(1):  # blocks handed out one at a time: a busy core does not hold the rest
        stats, base = _plan_blocks(lengths, edges, lo_k, hi_k, seed64, code)
    nf, n_rp = int(base[nb, 0]), int(base[nb, 2])
    tail_tokens = int(stats[:, 1].sum())
    cap = 1 << min_log2
    n_rseq = -(-tail_tokens // cap) if remainder == "pack" else n_rp if remainder == "pad" else 0
    s = nf + n_rseq
    out = {k: np.empty(nf + n_rp, np.int64) for k in ("row", "start", "length", "sequence")}
    out["sequence_log2"] = seq_log2 = np.empty(s, np.int64)
    out["sequence_tokens"] = tokens = np.empty(s, np.int64)
    out["sequence_offsets"] = seq_off = np.empty(s + 1, np.int64)
    with numba.parallel_chunksize(1):
        _fill_blocks(lengths, edges, base, lo_k, hi_k, seed64, code, np.int64(nf), out["row"], out["start"],
                     out["length"], out["sequence"], seq_log2, tokens, seq_off)
    seq_log2[nf:] = min_log2
    seq_off[s] = nf + n_rp
    if remainder == "pack" and n_rseq:
        tokens[nf:] = cap
        tokens[-1] = tail_tokens - (n_rseq - 1) * cap
    total = int(stats[:, 4].sum())
    drop = remainder == "drop"
    dropped = tail_tokens if drop else 0
    out.update(documents=n, tokens=total, kept_tokens=total - dropped, dropped_tokens=dropped,
               dropped_documents=int(stats[:, 3].sum()) if drop else 0,
               eos_kept=n - int(stats[:, 2].sum()) if drop else n,
               padded_tokens=n_rseq * cap - tail_tokens if not drop else 0)
    return out
