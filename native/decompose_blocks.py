"""The staged (block) form of the dataset-decomposition kernel, for engines that split the rows over workers
(the Ray Data engine): ``scan_documents`` per block, ``plan_layout`` once, ``fill_block`` per block,
``finish_output`` once; or, holding one block at a time (the streaming local engine,
``datapipe.decomposition_stream``), ``plan_layout`` per block from the previous block's end (``start``). The
result is byte-identical to ``native.decompose.decompose_lengths``, which runs the same per-document code
(``count_tail``, ``fill_doc``) in one process. Paper: "Dataset Decomposition: Faster LLM
Training with Variable Sequence Length Curriculum" (Pouransari et al., NeurIPS 2024).
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from native._config import njit
from native.decompose import (POLICY_CODE, REMAINDER_POLICIES, check_doc_lengths, check_log2, check_seed, count_tail,
                              fill_doc, offsets_from_sorted)

__all__ = ["empty_output", "fill_block", "finish_output", "plan_layout", "scan_documents"]


@njit(parallel=True)
def _scan(lengths, row_offset, min_log2, max_log2, seed):
    # pass 1 (block API): pieces per document and the tail left at its end
    n = lengths.shape[0]
    counts = np.empty(n, dtype=np.int64)
    tail = np.empty(n, dtype=np.int64)
    for i in numba.prange(n):
        counts[i], tail[i] = count_tail(lengths[i], row_offset + i, min_log2, max_log2, seed)
    return counts, tail


@njit
def _layout(counts, tail, policy, cap, piece0, rem0, pos0):
    # prefix sums from the given starts: first bucket piece, first remainder piece and concatenated tail
    # position of every document
    n = counts.shape[0]
    piece_off = np.empty(n + 1, dtype=np.int64)
    tail_off = np.empty(n + 1, dtype=np.int64)
    tail_pos = np.empty(n + 1, dtype=np.int64)
    piece_off[0] = piece0
    tail_off[0] = rem0
    tail_pos[0] = pos0
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
        fill_doc(lengths[i], row_offset + i, min_log2, max_log2, seed, policy, piece_off[i],
                  rem_base + tail_off[i] - rem_shift, tail_pos[i], n_full_total, out_row, out_start, out_len,
                  out_seq, out_log2, write_seq, seq_tokens, seq_off, full_shift, n_full_total + tail_off[i])


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
    min_log2, max_log2 = check_log2(min_log2, max_log2)
    lengths = check_doc_lengths(lengths, allow_zero=True)
    return _scan(lengths, np.int64(row_offset), np.int64(min_log2), np.int64(max_log2), check_seed(seed))


def plan_layout(counts, tail, *, min_log2: int, remainder: str = "pack", start: tuple[int, int, int] = (0, 0, 0),
                num_full: int | None = None) -> dict:
    """Where every document's pieces go in the output (prefix sums over the documents, in row order).

    Args:
        counts, tail: int ``[n]`` from :func:`scan_documents`.
        min_log2: the smallest piece size ``2^min_log2``.
        remainder: ``"pack"``, ``"pad"`` or ``"drop"``.
        start: ``(piece, remainder piece, tail position)`` of the first document, for the layout of one block of
            rows inside a corpus (the values at the block's first row of the whole corpus's layout); the offsets
            are then global, and the totals below count the rows up to the block's end.
        num_full: the corpus's bucket pieces (remainder sequences are numbered after them) for a block's layout;
            default: this layout's own.

    Returns:
        dict: int64 ``piece_off``, ``tail_off``, ``tail_pos`` ``[n+1]`` and the ints ``num_full`` (bucket
        pieces = bucket sequences), ``num_rem_pieces``, ``num_rem_sequences``, ``tail_tokens``.
    """
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder must be one of {REMAINDER_POLICIES} (got {remainder=})")
    if len(start) != 3 or any(int(v) < 0 for v in start):
        raise ValueError(f"start must be three offsets >= 0: (piece, remainder piece, tail position) (got {start=})")
    cap = 1 << int(min_log2)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    tail = np.ascontiguousarray(tail, dtype=np.int64)
    piece_off, tail_off, tail_pos = _layout(counts, tail, np.int64(POLICY_CODE[remainder]), np.int64(cap),
                                            *(np.int64(v) for v in start))
    tail_tokens = int(tail_pos[-1])
    if remainder == "pack":
        n_rseq = -(-tail_tokens // cap)
    elif remainder == "pad":
        n_rseq = int(tail_off[-1])
    else:
        n_rseq = 0
    nf = int(piece_off[-1]) if num_full is None else int(num_full)
    return {"piece_off": piece_off, "tail_off": tail_off, "tail_pos": tail_pos, "num_full": nf,
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
    _fill(lengths, np.int64(lo), np.int64(min_log2), np.int64(max_log2), check_seed(seed),
          np.int64(POLICY_CODE[layout["remainder"]]), np.int64(1 << int(min_log2)),
          po, to, tp, np.int64(nf_total),
          buf["row"], buf["start"], buf["length"], buf["sequence"], log2,
          np.int64(full_shift), np.int64(rem_base), np.int64(rem_shift), write_seq, seq_tokens, seq_off)
    if out is not None:
        return out
    res = {f"full_{k}": v[:nf] for k, v in buf.items()}
    res.update({f"rem_{k}": v[nf:] for k, v in buf.items()})
    res["full_log2"] = log2
    return res


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
        out["sequence_offsets"] = offsets_from_sorted(out["sequence"], np.int64(s))
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
