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
from native.rng import rand_below, rand_uniform, splitmix64

__all__ = ["REMAINDER_POLICIES", "assemble_pieces", "curriculum_order", "decompose_lengths", "split_documents"]

REMAINDER_POLICIES = ("pack", "pad", "drop")
_MAX_LOG2 = 40


@njit
def _doc_state(seed: np.uint64, row: np.int64, state: np.ndarray) -> None:
    # a well-mixed, independent stream per (seed, row): hash the row, then xor in the seed
    state[0] = np.uint64(row)
    h = splitmix64(state)
    state[0] = h ^ seed


@njit
def _draw_log2(state: np.ndarray, min_log2: np.int64, max_log2: np.int64) -> np.int64:
    # P(k) = 2^(max-k) / (2^(m+1) - 1), m = max - min: draw r in [0, 2^(m+1) - 1); j = floor(log2(r + 1))
    m = max_log2 - min_log2
    r = rand_below(state, (np.int64(1) << (m + 1)) - 1) + 1
    j = np.int64(0)
    while (np.int64(1) << (j + 1)) <= r:
        j += 1
    return max_log2 - j


@njit
def _floor_log2(x: np.int64) -> np.int64:
    k = np.int64(0)
    while (np.int64(1) << (k + 1)) <= x:
        k += 1
    return k


@njit
def _count_pieces(L: np.int64, row: np.int64, min_log2: np.int64, max_log2: np.int64, seed: np.uint64,
                  state: np.ndarray) -> np.int64:
    _doc_state(seed, row, state)
    rem = L
    n = np.int64(0)
    lo = np.int64(1) << min_log2
    big = np.int64(1) << (max_log2 + 1)
    while rem >= lo:
        if rem >= big:
            k = _draw_log2(state, min_log2, max_log2)
        else:
            k = _floor_log2(rem)
        rem -= np.int64(1) << k
        n += 1
    return n


@njit(parallel=True)
def _split_documents(lengths, row_offset, min_log2, max_log2, seed):
    n = lengths.shape[0]
    counts = np.empty(n, dtype=np.int64)
    for i in numba.prange(n):
        state = np.empty(1, dtype=np.uint64)
        counts[i] = _count_pieces(lengths[i], row_offset + i, min_log2, max_log2, seed, state)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    for i in range(n):
        offsets[i + 1] = offsets[i] + counts[i]
    total = offsets[n]
    p_row = np.empty(total, dtype=np.int64)
    p_start = np.empty(total, dtype=np.int64)
    p_log2 = np.empty(total, dtype=np.int64)
    tail = np.empty(n, dtype=np.int64)
    lo = np.int64(1) << min_log2
    big = np.int64(1) << (max_log2 + 1)
    for i in numba.prange(n):
        # the same stream as the counting pass: the same draws, so the same pieces
        state = np.empty(1, dtype=np.uint64)
        row = row_offset + i
        _doc_state(seed, row, state)
        rem = lengths[i]
        pos = np.int64(0)
        j = offsets[i]
        while rem >= lo:
            if rem >= big:
                k = _draw_log2(state, min_log2, max_log2)
            else:
                k = _floor_log2(rem)
            p_row[j] = row
            p_start[j] = pos
            p_log2[j] = k
            pos += np.int64(1) << k
            rem -= np.int64(1) << k
            j += 1
        tail[i] = rem
    return p_row, p_start, p_log2, tail


@njit
def _pack_tails(t_row, t_start, t_len, cap):
    # concatenate the tails in order and cut every ``cap`` tokens; a straddling tail becomes two (or more) pieces
    n = t_row.shape[0]
    total = np.int64(0)
    for i in range(n):
        total += t_len[i]
    m = n + total // cap + 1
    o_row = np.empty(m, dtype=np.int64)
    o_start = np.empty(m, dtype=np.int64)
    o_len = np.empty(m, dtype=np.int64)
    o_seq = np.empty(m, dtype=np.int64)
    j = 0
    seq = np.int64(0)
    fill = np.int64(0)
    for i in range(n):
        left = t_len[i]
        pos = t_start[i]
        while left > 0:
            take = min(left, cap - fill)
            o_row[j] = t_row[i]
            o_start[j] = pos
            o_len[j] = take
            o_seq[j] = seq
            j += 1
            pos += take
            left -= take
            fill += take
            if fill == cap:
                seq += 1
                fill = 0
    return o_row[:j].copy(), o_start[:j].copy(), o_len[:j].copy(), o_seq[:j].copy()


def _check_log2(min_log2: int, max_log2: int) -> tuple[int, int]:
    for name, v in (("min_log2", min_log2), ("max_log2", max_log2)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v <= _MAX_LOG2:
            raise ValueError(f"{name} must be an integer in [0, {_MAX_LOG2}] (got {name}={v!r})")
    if min_log2 > max_log2:
        raise ValueError(f"min_log2 must be <= max_log2 (got {min_log2=}, {max_log2=})")
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


def split_documents(lengths, *, min_log2: int = 8, max_log2: int = 13, seed: int = 0,
                    row_offset: int = 0) -> tuple[NDArray[np.int64], ...]:
    """Cut every document into power-of-two pieces (the first stage of :func:`decompose_lengths`).

    Args:
        lengths: int ``[N]`` tokens per document (EOS included), each ``>= 0``.
        min_log2, max_log2: piece sizes are ``2^k`` for ``min_log2 <= k <= max_log2``.
        seed: seed of the long-document size draws; a document's draws depend only on ``(seed, row)``.
        row_offset: global row id of ``lengths[0]`` (for blocks of a larger dataset).

    Returns:
        ``(row, start, log2, tail)``: int64 ``[P]`` global row, start offset and ``k`` of every piece, in row
        order then position order; int64 ``[N]`` tokens left at the end of each document (``< 2^min_log2``).
    """
    min_log2, max_log2 = _check_log2(min_log2, max_log2)
    lengths = check_doc_lengths(lengths, allow_zero=True)
    return _split_documents(lengths, np.int64(row_offset), np.int64(min_log2), np.int64(max_log2),
                            np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))


def assemble_pieces(lengths, p_row, p_start, p_log2, tail, *, min_log2: int, remainder: str = "pack",
                    row_offset: int = 0) -> dict:
    """Turn split pieces and tails into training sequences (the second stage of :func:`decompose_lengths`).

    Bucket pieces become one sequence each, in piece order; then come the remainder sequences of the policy.

    Returns:
        dict with int64 piece arrays ``row``, ``start``, ``length``, ``sequence`` ``[P']`` (sorted by
        sequence), int64 sequence arrays ``sequence_log2``, ``sequence_tokens`` (real tokens) ``[S]`` and
        ``sequence_offsets`` ``[S+1]`` (pieces of sequence ``s`` are ``sequence_offsets[s]:[s+1]``), and int
        counts ``tokens``, ``kept_tokens``, ``dropped_tokens``, ``dropped_documents`` (documents with no token
        kept), ``documents``, ``eos_kept`` (documents whose last token is kept), ``padded_tokens``.
    """
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    cap = 1 << int(min_log2)
    n_full = len(p_row)
    tail = np.ascontiguousarray(tail, dtype=np.int64)
    has_tail = np.flatnonzero(tail > 0)
    t_row = has_tail.astype(np.int64) + row_offset
    t_len = tail[has_tail]
    t_start = lengths[has_tail] - t_len
    full_len = np.left_shift(np.int64(1), p_log2)
    if remainder == "pack":
        r_row, r_start, r_len, r_seq = _pack_tails(t_row, t_start, t_len, np.int64(cap))
        n_rseq = int(r_seq[-1]) + 1 if len(r_seq) else 0
        r_tokens = np.bincount(r_seq, weights=r_len, minlength=n_rseq).astype(np.int64)
    elif remainder == "pad":
        r_row, r_start, r_len = t_row, t_start.astype(np.int64), t_len
        r_seq = np.arange(len(t_len), dtype=np.int64)
        n_rseq = len(t_len)
        r_tokens = t_len.copy()
    else:
        r_row = r_start = r_len = r_seq = np.zeros(0, np.int64)
        n_rseq = 0
        r_tokens = np.zeros(0, np.int64)
    row = np.concatenate([p_row, r_row]).astype(np.int64, copy=False)
    start = np.concatenate([p_start, r_start]).astype(np.int64, copy=False)
    length = np.concatenate([full_len, r_len]).astype(np.int64, copy=False)
    sequence = np.concatenate([np.arange(n_full, dtype=np.int64), r_seq + n_full])
    seq_log2 = np.concatenate([p_log2, np.full(n_rseq, int(min_log2), np.int64)]).astype(np.int64, copy=False)
    seq_tokens = np.concatenate([full_len, r_tokens])
    seq_off = np.zeros(n_full + n_rseq + 1, np.int64)
    np.cumsum(np.bincount(sequence, minlength=n_full + n_rseq), out=seq_off[1:])
    total = int(lengths.sum())
    kept = int(length.sum())
    if remainder == "drop":
        eos_kept = int(len(lengths) - len(has_tail))
        no_piece = np.ones(len(lengths), bool)
        no_piece[p_row - row_offset] = False
        dropped_docs = int(no_piece.sum())
    else:
        eos_kept = int(np.count_nonzero(lengths))
        dropped_docs = 0
    return {
        "row": row, "start": start, "length": length, "sequence": sequence,
        "sequence_log2": seq_log2, "sequence_tokens": seq_tokens, "sequence_offsets": seq_off,
        "documents": int(len(lengths)), "tokens": total, "kept_tokens": kept, "dropped_tokens": total - kept,
        "dropped_documents": dropped_docs, "eos_kept": eos_kept,
        "padded_tokens": int((np.left_shift(np.int64(1), seq_log2) - seq_tokens).sum()),
    }


def decompose_lengths(lengths, *, min_log2: int = 8, max_log2: int = 13, remainder: str = "pack",
                      seed: int = 0) -> dict:
    """Decompose documents of the given lengths into power-of-two training sequences.

    Args:
        lengths: int ``[N]`` tokens per document, EOS included, each ``>= 1``.
        min_log2, max_log2: bucket sizes ``2^min_log2 .. 2^max_log2`` tokens (reference: 8 and 13).
        remainder: ``"pack"`` (default), ``"pad"`` or ``"drop"``: what becomes of each document's tail of
            fewer than ``2^min_log2`` tokens (see the module docstring).
        seed: seed of the size draws for documents of ``2^(max_log2+1)`` tokens or more.

    Returns:
        the dict of :func:`assemble_pieces`: piece arrays ``row``, ``start``, ``length``, ``sequence``; sequence
        arrays ``sequence_log2``, ``sequence_tokens``, ``sequence_offsets``; token and document counts.

    Raises:
        ValueError: ``min_log2 > max_log2``, an unknown ``remainder``, a length ``<= 0`` (names the row).
    """
    min_log2, max_log2 = _check_log2(min_log2, max_log2)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    lengths = check_doc_lengths(lengths)
    p_row, p_start, p_log2, tail = split_documents(lengths, min_log2=min_log2, max_log2=max_log2, seed=seed)
    return assemble_pieces(lengths, p_row, p_start, p_log2, tail, min_log2=min_log2, remainder=remainder)


@njit
def _curriculum_order(counts, odds, seed):
    K = counts.shape[0]
    rem = counts.copy()
    total = np.int64(0)
    for k in range(K):
        total += rem[k]
    out = np.empty(total, dtype=np.int64)
    state = np.empty(1, dtype=np.uint64)
    state[0] = seed
    w = np.empty(K, dtype=np.float64)
    for s in range(total):
        tw = 0.0
        for k in range(K):
            w[k] = odds[k] * rem[k]
            tw += w[k]
        u = rand_uniform(state) * tw
        pick = -1
        acc = 0.0
        for k in range(K):
            if rem[k] > 0:
                pick = k  # the last non-empty bucket catches rounding at the top end
                acc += w[k]
                if u < acc:
                    break
        out[s] = pick
        rem[pick] -= 1
    return out


def curriculum_order(counts, odds, seed: int) -> NDArray[np.int64]:
    """The bucket of every step of a cycle: at each step bucket ``i`` is drawn with probability
    ``odds[i] * remaining[i] / sum_j odds[j] * remaining[j]`` (the paper's sampling rule; ``remaining`` counts
    the bucket's steps not yet taken), so every bucket is used up by the end of the cycle.

    Args:
        counts: int ``[K]`` steps per bucket, ``>= 0``.
        odds: float ``[K]`` odds per bucket, ``> 0`` where ``counts > 0``.
        seed: integer seed.

    Returns:
        int64 ``[sum(counts)]`` bucket positions ``0..K-1``, each ``i`` exactly ``counts[i]`` times.
    """
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    odds = np.ascontiguousarray(odds, dtype=np.float64)
    if counts.shape != odds.shape or counts.ndim != 1:
        raise ValueError(f"counts and odds must be 1-D of one shape (got {counts.shape} and {odds.shape})")
    if (counts < 0).any():
        raise ValueError("counts must be >= 0")
    if ((odds <= 0) & (counts > 0)).any() or not np.isfinite(odds).all():
        raise ValueError(f"odds must be finite and > 0 for every non-empty bucket (got {odds.tolist()})")
    return _curriculum_order(counts, odds, np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF))
