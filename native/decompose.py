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
from native.rng import rand_uniform

__all__ = ["REMAINDER_POLICIES", "bucket_totals", "curriculum_order", "decompose_lengths", "empty_output", "fill_block",
           "finish_output", "plan_layout", "scan_documents"]

REMAINDER_POLICIES = ("pack", "pad", "drop")
_MAX_LOG2 = 40
_BLOCK_ROWS = 32768  # rows per block of the one-process path (many more blocks than cores)
_MAX_BLOCKS = 1024


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


# The random stream is ``native.rng``'s SplitMix64 (state hashed from the row, then xor the seed; one
# ``rand_below`` per size draw) with the state kept in a register instead of a one-element array: the same
# numbers, no allocation per document. The state is derived only for documents long enough to draw.
@njit(inline="always")
def _mix(z: np.uint64) -> np.uint64:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _doc_seed(seed: np.uint64, row: np.int64) -> np.uint64:
    return _mix(np.uint64(row) + _GOLDEN) ^ seed


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
    s = s + _GOLDEN
    n = np.uint64((np.int64(1) << (max_log2 - min_log2 + 1)) - 1)
    r = np.int64(((_mix(s) >> np.uint64(32)) * n) >> np.uint64(32)) + 1
    return s, max_log2 - _floor_log2(r)


@njit(inline="always")
def _count_tail(length, row, min_log2, max_log2, seed):
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
def _fill_doc(length, row, min_log2, max_log2, seed, policy, j, o, c, nf, out_row, out_start, out_len, out_seq,
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
            w = j - full_shift
            out_row[w] = row
            out_start[w] = pos
            out_len[w] = p
            out_seq[w] = j
            out_log2[w] = k
            if write_seq:
                seq_tokens[j] = p
                seq_off[j] = j
            pos += p
            rem -= p
            j += 1
    if rem >= cap:
        for k in range(max_log2, min_log2 - 1, -1):
            p = np.int64(1) << k
            if rem & p:
                w = j - full_shift
                out_row[w] = row
                out_start[w] = pos
                out_len[w] = p
                out_seq[w] = j
                out_log2[w] = k
                if write_seq:
                    seq_tokens[j] = p
                    seq_off[j] = j
                pos += p
                j += 1
        rem &= cap - 1
    if rem == 0 or policy == 2:
        return j, o, c
    if policy == 1:
        out_row[o] = row
        out_start[o] = pos
        out_len[o] = rem
        out_seq[o] = rem_seq
        if write_seq:
            seq_tokens[rem_seq] = rem
            seq_off[rem_seq] = o
        return j, o + 1, c
    while rem > 0:
        take = min(rem, cap - (c & (cap - 1)))
        out_row[o] = row
        out_start[o] = pos
        out_len[o] = take
        out_seq[o] = nf + (c >> min_log2)
        if write_seq and (c & (cap - 1)) == 0:
            seq_off[nf + (c >> min_log2)] = o
        o += 1
        pos += take
        rem -= take
        c += take
    return j, o, c


_POLICY_CODE = {"pack": 0, "pad": 1, "drop": 2}


@njit(parallel=True)
def _scan(lengths, row_offset, min_log2, max_log2, seed):
    # pass 1 (block API): pieces per document and the tail left at its end
    n = lengths.shape[0]
    counts = np.empty(n, dtype=np.int64)
    tail = np.empty(n, dtype=np.int64)
    for i in numba.prange(n):
        counts[i], tail[i] = _count_tail(lengths[i], row_offset + i, min_log2, max_log2, seed)
    return counts, tail


@njit
def _layout(counts, tail, policy, cap):
    # prefix sums: first bucket piece, first remainder piece and concatenated tail position of every document
    n = counts.shape[0]
    piece_off = np.empty(n + 1, dtype=np.int64)
    tail_off = np.empty(n + 1, dtype=np.int64)
    tail_pos = np.empty(n + 1, dtype=np.int64)
    piece_off[0] = 0
    tail_off[0] = 0
    tail_pos[0] = 0
    for i in range(n):
        piece_off[i + 1] = piece_off[i] + counts[i]
        t = tail[i]
        if policy == 2 or t == 0:
            npieces = 0
        elif policy == 1:
            npieces = 1
        else:
            a = tail_pos[i]
            # one piece, plus one more for every multiple of cap strictly inside (a, a + t)
            npieces = 1 + (a + t - 1) // cap - a // cap
        tail_off[i + 1] = tail_off[i] + npieces
        tail_pos[i + 1] = tail_pos[i] + (t if policy != 2 else 0)
    return piece_off, tail_off, tail_pos


@njit(parallel=True)
def _fill(lengths, row_offset, min_log2, max_log2, seed, policy, cap, piece_off, tail_off, tail_pos,
          n_full_total, out_row, out_start, out_len, out_seq, out_log2, full_shift, rem_base, rem_shift,
          write_seq, seq_tokens, seq_off):
    # pass 2 (block API): replay each document's draws and write its pieces at their final places; with
    # write_seq (global output) also each sequence's tokens and first piece, so no later pass is needed
    n = lengths.shape[0]
    for i in numba.prange(n):
        _fill_doc(lengths[i], row_offset + i, min_log2, max_log2, seed, policy, piece_off[i],
                  rem_base + tail_off[i] - rem_shift, tail_pos[i], n_full_total, out_row, out_start, out_len,
                  out_seq, out_log2, write_seq, seq_tokens, seq_off, full_shift, n_full_total + tail_off[i])


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
            c, t = _count_tail(L, i, min_log2, max_log2, seed)
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
                    t = _count_tail(L, i, min_log2, max_log2, seed)[1]
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
            j, o2, c = _fill_doc(lengths[i], i, min_log2, max_log2, seed, policy, j, o, c, nf, out_row, out_start,
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
def _offsets_from_sorted(seq, num):
    off = np.empty(num + 1, dtype=np.int64)
    j = 0
    for s in range(num + 1):
        while j < seq.shape[0] and seq[j] < s:
            j += 1
        off[s] = j
    return off


def _check_log2(min_log2: int, max_log2: int) -> tuple[int, int]:
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


def scan_documents(lengths, *, min_log2: int = 8, max_log2: int = 13, seed: int = 0,
                   row_offset: int = 0) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """First pass of the decomposition over a block of documents.

    Args:
        lengths: int ``[n]`` tokens per document (EOS included), ``>= 0``.
        min_log2, max_log2: piece sizes ``2^k``, ``min_log2 <= k <= max_log2``.
        seed: seed of the size draws; a document's draws depend only on ``(seed, row)``.
        row_offset: global row id of ``lengths[0]``.

    Returns:
        ``(counts, tail)``: int64 ``[n]`` bucket pieces per document, and tokens left at its end
        (``< 2^min_log2``).
    """
    min_log2, max_log2 = _check_log2(min_log2, max_log2)
    lengths = check_doc_lengths(lengths, allow_zero=True)
    return _scan(lengths, np.int64(row_offset), np.int64(min_log2), np.int64(max_log2), _seed64(seed))


def _seed64(seed: int) -> np.uint64:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int (got {type(seed).__name__})")
    return np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)


def plan_layout(counts, tail, *, min_log2: int, remainder: str = "pack") -> dict:
    """Where every document's pieces go in the output (prefix sums over all documents, in row order).

    Returns:
        dict: int64 ``piece_off``, ``tail_off``, ``tail_pos`` ``[N+1]`` and the ints ``num_full`` (bucket
        pieces = bucket sequences), ``num_rem_pieces``, ``num_rem_sequences``, ``tail_tokens``.
    """
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    cap = 1 << int(min_log2)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    tail = np.ascontiguousarray(tail, dtype=np.int64)
    piece_off, tail_off, tail_pos = _layout(counts, tail, np.int64(_POLICY_CODE[remainder]), np.int64(cap))
    tail_tokens = int(tail_pos[-1])
    if remainder == "pack":
        n_rseq = -(-tail_tokens // cap)
    elif remainder == "pad":
        n_rseq = int(tail_off[-1])
    else:
        n_rseq = 0
    return {"piece_off": piece_off, "tail_off": tail_off, "tail_pos": tail_pos, "num_full": int(piece_off[-1]),
            "num_rem_pieces": int(tail_off[-1]), "num_rem_sequences": n_rseq, "tail_tokens": tail_tokens,
            "remainder": remainder, "min_log2": int(min_log2)}


def fill_block(lengths, layout: dict, *, lo: int, hi: int, min_log2: int, max_log2: int, seed: int,
               out: dict | None = None, layout_base: int = 0) -> dict:
    """Second pass over rows ``lo:hi`` (``lengths`` holds exactly those rows): their pieces, at final places.

    With ``out`` (the global arrays of :func:`decompose_lengths`) pieces are written in place; without it a
    block-local dict is returned: ``full_*`` arrays for the block's bucket pieces (global positions
    ``piece_off[lo]:piece_off[hi]``) and ``rem_*`` arrays for its remainder pieces (global positions
    ``num_full + tail_off[lo]:num_full + tail_off[hi]``), each with ``row``, ``start``, ``length``, ``sequence``
    and ``full_log2``. ``layout_base`` is the global row of ``layout``'s first entry (for a layout sliced to a
    block: its arrays then hold rows ``lo:hi`` plus the end of the last).
    """
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if len(lengths) != hi - lo:
        raise ValueError(f"lengths has {len(lengths)} rows but the block is rows [{lo}, {hi})")
    a, b = lo - layout_base, hi - layout_base
    po, to, tp = (layout[k][a : b + 1] for k in ("piece_off", "tail_off", "tail_pos"))
    if len(po) != hi - lo + 1:
        raise ValueError(f"layout does not cover rows [{lo}, {hi}] (layout_base={layout_base})")
    nf_total = layout["num_full"]
    if out is None:
        nf = int(po[-1] - po[0])
        nr = int(to[-1] - to[0])
        buf = {k: np.empty(nf + nr, np.int64) for k in ("row", "start", "length", "sequence")}
        log2 = np.empty(nf, np.int64)
        full_shift, rem_base, rem_shift = int(po[0]), nf, int(to[0])
        write_seq, seq_tokens, seq_off = False, np.empty(1, np.int64), np.empty(1, np.int64)
    else:
        buf = out
        log2 = out["sequence_log2"]
        full_shift, rem_base, rem_shift = 0, nf_total, 0
        write_seq, seq_tokens, seq_off = True, out["sequence_tokens"], out["sequence_offsets"]
        out["sequences_filled"] = lo == 0 and hi == len(layout["piece_off"]) - 1
    _fill(lengths, np.int64(lo), np.int64(min_log2), np.int64(max_log2), _seed64(seed),
          np.int64(_POLICY_CODE[layout["remainder"]]), np.int64(1 << int(min_log2)),
          po, to, tp, np.int64(nf_total),
          buf["row"], buf["start"], buf["length"], buf["sequence"], log2,
          np.int64(full_shift), np.int64(rem_base), np.int64(rem_shift), write_seq, seq_tokens, seq_off)
    if out is not None:
        return out
    res = {f"full_{k}": v[:nf] for k, v in buf.items()}
    res.update({f"rem_{k}": v[nf:] for k, v in buf.items()})
    res["full_log2"] = log2
    return res


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


def empty_output(layout: dict) -> dict:
    """The global output arrays for a layout, uninitialised (filled by :func:`fill_block`)."""
    n = layout["num_full"] + layout["num_rem_pieces"]
    s = layout["num_full"] + layout["num_rem_sequences"]
    out = {k: np.empty(n, np.int64) for k in ("row", "start", "length", "sequence")}
    out["sequence_log2"] = np.empty(s, np.int64)
    out["sequence_tokens"] = np.empty(s, np.int64)
    out["sequence_offsets"] = np.empty(s + 1, np.int64)
    return out


def finish_output(out: dict, layout: dict, lengths, counts, tail) -> dict:
    """Complete the global arrays once every block is filled: remainder sequences' ``sequence_log2`` and
    ``sequence_tokens``, ``sequence_offsets`` and the token/document counts (see :func:`decompose_lengths`).

    When one :func:`fill_block` call wrote all rows into ``out``, the per-sequence arrays are already filled and
    only the remainder part is completed (no pass over the pieces)."""
    nf, min_log2, policy = layout["num_full"], layout["min_log2"], layout["remainder"]
    cap = 1 << min_log2
    n_rseq = layout["num_rem_sequences"]
    s = nf + n_rseq
    filled = bool(out.pop("sequences_filled", False))
    seq_log2 = out["sequence_log2"]
    seq_log2[nf:] = min_log2
    tokens = out["sequence_tokens"]
    if not filled:
        tokens[:nf] = out["length"][:nf]
        out["sequence_offsets"] = _offsets_from_sorted(out["sequence"], np.int64(s))
        if policy == "pad":
            tokens[nf:] = out["length"][nf:]
    out["sequence_offsets"][s] = len(out["row"])
    if policy == "pack" and n_rseq:
        tokens[nf:] = cap
        tokens[-1] = layout["tail_tokens"] - (n_rseq - 1) * cap
    lengths = np.asarray(lengths)
    total = int(lengths.sum())
    dropped = int(np.asarray(tail).sum()) if policy == "drop" else 0
    if policy == "drop":
        # the EOS (a document's last token) survives only when nothing is left over at its end
        eos_kept = int(np.count_nonzero(np.asarray(tail) == 0))
        dropped_docs = int(np.count_nonzero(np.asarray(counts) == 0))
    else:
        eos_kept = int(np.count_nonzero(lengths))
        dropped_docs = 0
    out.update(documents=int(len(lengths)), tokens=total, kept_tokens=total - dropped, dropped_tokens=dropped,
               dropped_documents=dropped_docs, eos_kept=eos_kept,
               padded_tokens=int(n_rseq * cap - layout["tail_tokens"]) if policy != "drop" else 0)
    return out


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
    min_log2, max_log2 = _check_log2(min_log2, max_log2)
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    lengths = check_doc_lengths(lengths)
    seed64 = _seed64(seed)
    # the same output as scan_documents + plan_layout + fill_block + finish_output (the block API the Ray engine
    # uses), with the layout kept per block of rows instead of per document: pass 1 counts, pass 2 fills, both
    # over blocks in parallel; outputs are allocated once, by numpy (huge pages), and written once
    n = len(lengths)
    nb = max(1, min(_MAX_BLOCKS, -(-n // _BLOCK_ROWS)))
    edges = (np.arange(nb + 1, dtype=np.int64) * n) // nb
    lo_k, hi_k, code = np.int64(min_log2), np.int64(max_log2), np.int64(_POLICY_CODE[remainder])
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
