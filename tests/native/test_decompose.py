"""native.decompose: the kernels against a plain-Python reference, invariants, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import native.decompose as nd
from native.curriculum import curriculum_order
from native.decompose import bucket_totals, decompose_lengths
from native.decompose_blocks import empty_output, fill_block, finish_output, plan_layout, scan_documents

from native.rng import SPLITMIX_GAMMA, SPLITMIX_M1, SPLITMIX_M2

# SplitMix64's constants, from their one home (the reference code below is written independently of the kernels)
GAMMA, M1, M2 = int(SPLITMIX_GAMMA), int(SPLITMIX_M1), int(SPLITMIX_M2)

M64 = (1 << 64) - 1


# ---- plain-Python reference (same SplitMix64 stream, no numpy, no numba) ----------------------------------------
def _splitmix(state: list) -> int:
    state[0] = (state[0] + GAMMA) & M64
    z = state[0]
    z = ((z ^ (z >> 30)) * M1) & M64
    z = ((z ^ (z >> 27)) * M2) & M64
    return z ^ (z >> 31)


def _below(state: list, n: int) -> int:
    return ((_splitmix(state) >> 32) * n) >> 32


def ref_decompose(lengths, lo_k, hi_k, remainder, seed):
    """The decomposition spelled out: binary pieces front to back, draws for long remainders, tails by policy."""
    full, tails = [], []
    for row, L in enumerate(lengths):
        st = [row]
        st = [_splitmix(st) ^ (seed & M64)]
        rem, pos = L, 0
        while rem >= 1 << lo_k:
            if rem >= 1 << (hi_k + 1):
                m = hi_k - lo_k
                r = _below(st, (1 << (m + 1)) - 1) + 1
                k = hi_k - (r.bit_length() - 1)
            else:
                k = rem.bit_length() - 1
            full.append((row, pos, 1 << k))
            pos += 1 << k
            rem -= 1 << k
        if rem:
            tails.append((row, pos, rem))
    pieces = [(r, s, n, i) for i, (r, s, n) in enumerate(full)]
    seq_log2 = [n.bit_length() - 1 for _, _, n in full]
    seq_tokens = [n for _, _, n in full]
    nf = len(full)
    if remainder == "pad":
        for j, (r, s, n) in enumerate(tails):
            pieces.append((r, s, n, nf + j))
            seq_log2.append(lo_k)
            seq_tokens.append(n)
    elif remainder == "pack":
        cap, fill, seq = 1 << lo_k, 0, nf
        for r, s, n in tails:
            while n:
                take = min(n, cap - fill)
                pieces.append((r, s, take, seq))
                s, n, fill = s + take, n - take, fill + take
                if fill == cap:
                    seq_log2.append(lo_k)
                    seq_tokens.append(cap)
                    seq, fill = seq + 1, 0
        if fill:
            seq_log2.append(lo_k)
            seq_tokens.append(fill)
    return pieces, seq_log2, seq_tokens


def check_against_reference(lengths, lo_k, hi_k, remainder, seed):
    got = decompose_lengths(lengths, min_log2=lo_k, max_log2=hi_k, remainder=remainder, seed=seed)
    pieces, seq_log2, seq_tokens = ref_decompose([int(x) for x in lengths], lo_k, hi_k, remainder, seed)
    exp = np.array(pieces, dtype=np.int64).reshape(-1, 4)
    for j, k in enumerate(("row", "start", "length", "sequence")):
        assert got[k].dtype == np.int64
        np.testing.assert_array_equal(got[k], exp[:, j], err_msg=k)
    np.testing.assert_array_equal(got["sequence_log2"], seq_log2)
    np.testing.assert_array_equal(got["sequence_tokens"], seq_tokens)
    return got


def check_invariants(got, lengths, lo_k, hi_k, remainder):
    lengths = np.asarray(lengths)
    row, start, length, seq = got["row"], got["start"], got["length"], got["sequence"]
    # inside the document, non-empty
    assert (length > 0).all() and (start >= 0).all() and (start + length <= lengths[row]).all()
    # never overlapping; cover every token except the dropped tails
    cover = np.zeros(int(lengths.sum()), np.int32)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for r, s, n in zip(row, start, length):
        cover[base[r] + s : base[r] + s + n] += 1
    assert cover.max(initial=0) <= 1
    kept = int(cover.sum())
    assert kept == got["kept_tokens"] == int(length.sum())
    if remainder != "drop":
        assert kept == lengths.sum() and got["eos_kept"] == len(lengths)
    else:
        tail_free = lengths == 0
        assert got["dropped_tokens"] == lengths.sum() - kept
        # a document keeps its EOS exactly when its last token is covered
        last = cover[base + lengths - 1] == 1
        assert got["eos_kept"] == int(last.sum()) - int(tail_free.sum())
    # sequences: sorted, offsets consistent, sizes 2^k with k in range, only remainders under-filled
    assert (np.diff(seq) >= 0).all()
    S = len(got["sequence_log2"])
    np.testing.assert_array_equal(got["sequence_offsets"], np.searchsorted(seq, np.arange(S + 1)))
    k = got["sequence_log2"]
    assert ((k >= lo_k) & (k <= hi_k)).all()
    np.testing.assert_array_equal(np.bincount(seq, weights=length, minlength=S), got["sequence_tokens"])
    assert got["padded_tokens"] == int(((1 << k) - got["sequence_tokens"]).sum())
    full = got["sequence_tokens"] == (1 << k)
    short = np.flatnonzero(~full)
    assert (k[short] == lo_k).all()
    if remainder == "pack":
        assert len(short) <= 1 and (len(short) == 0 or short[0] == S - 1)
        assert got["padded_tokens"] < 1 << lo_k


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
@pytest.mark.parametrize("lo_k,hi_k", [(2, 5), (0, 0), (3, 3), (4, 8)])
def test_matches_reference_and_invariants(remainder, lo_k, hi_k):
    rng = np.random.default_rng(lo_k * 31 + hi_k)
    lengths = np.maximum(1, rng.lognormal(3.5, 1.4, 300).astype(np.int64))
    got = check_against_reference(lengths, lo_k, hi_k, remainder, seed=7)
    check_invariants(got, lengths, lo_k, hi_k, remainder)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 700), min_size=1, max_size=60), lo_k=st.integers(0, 5),
       span=st.integers(0, 4), remainder=st.sampled_from(["pack", "pad", "drop"]), seed=st.integers(0, 2**63))
def test_property_matches_reference(lengths, lo_k, span, remainder, seed):
    lengths = np.array(lengths, dtype=np.int64)
    got = check_against_reference(lengths, lo_k, lo_k + span, remainder, seed)
    check_invariants(got, lengths, lo_k, lo_k + span, remainder)


def test_pieces_longest_first_and_exact_binary_split():
    # 2^10 + 2^7 + 2^3 + 5 with buckets 2^3..2^10: the binary decomposition, longest first, tail of 5
    got = decompose_lengths([1024 + 128 + 8 + 5], min_log2=3, max_log2=10, remainder="drop")
    assert got["length"].tolist() == [1024, 128, 8]
    assert got["start"].tolist() == [0, 1024, 1152]
    assert got["dropped_tokens"] == 5 and got["eos_kept"] == 0


def test_long_document_draws_follow_p2_odds():
    lo_k, hi_k = 4, 7
    got = decompose_lengths([1 << 22] * 4, min_log2=lo_k, max_log2=hi_k, seed=1)
    L = got["length"][got["length"] >= 1 << lo_k]
    # pieces drawn while >= 2^(hi+1) tokens remain dominate; their sizes follow P(k) ~ 2^(hi-k)
    freq = np.array([np.mean(L == 1 << k) for k in range(lo_k, hi_k + 1)])
    expected = np.exp2(hi_k - np.arange(lo_k, hi_k + 1)) / (2 ** (hi_k - lo_k + 1) - 1)
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_seed_changes_long_documents_only():
    lengths = np.array([100, 5000, 300, 70000])
    a = decompose_lengths(lengths, min_log2=4, max_log2=8, seed=1)
    b = decompose_lengths(lengths, min_log2=4, max_log2=8, seed=2)
    c = decompose_lengths(lengths, min_log2=4, max_log2=8, seed=1)
    assert a["length"].tobytes() == c["length"].tobytes()
    assert a["length"].tobytes() != b["length"].tobytes()
    for d in (a, b):  # documents under 2^(max+1) are cut deterministically
        assert d["length"][d["row"] == 0].tolist() == [64, 32, 4]


def test_blocks_give_the_same_output_as_one_pass():
    rng = np.random.default_rng(3)
    lengths = np.maximum(1, rng.lognormal(5, 1.5, 2000).astype(np.int64))
    kw = dict(min_log2=3, max_log2=9, seed=11)
    whole = decompose_lengths(lengths, remainder="pack", **kw)
    got = _block_api(lengths, ((1999, 2000), (0, 700), (700, 1999)), "pack", **kw)  # blocks filled in any order
    for k, v in whole.items():
        assert (v.tobytes() == got[k].tobytes()) if isinstance(v, np.ndarray) else v == got[k], k


def _block_api(lengths, blocks, remainder, **kw):
    """decompose_lengths rebuilt from the per-document block API (what the Ray engine runs); blocks are scanned in
    row order and filled in the order given."""
    parts = [scan_documents(lengths[a:b], row_offset=a, **kw) for a, b in sorted(blocks)]
    counts = np.concatenate([p[0] for p in parts])
    tail = np.concatenate([p[1] for p in parts])
    layout = plan_layout(counts, tail, min_log2=kw["min_log2"], remainder=remainder)
    out = empty_output(layout)
    for a, b in blocks:
        blk = fill_block(lengths[a:b], layout, lo=a, hi=b, **kw)
        nf = len(blk["full_row"])
        f0, r0 = int(layout["piece_off"][a]), layout["num_full"] + int(layout["tail_off"][a])
        for k in ("row", "start", "length", "sequence"):
            out[k][f0 : f0 + nf] = blk[f"full_{k}"]
            out[k][r0 : r0 + len(blk["rem_row"])] = blk[f"rem_{k}"]
        out["sequence_log2"][f0 : f0 + nf] = blk["full_log2"]
    return finish_output(out, layout, lengths, counts, tail)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=80), lo_k=st.integers(0, 5),
       span=st.integers(0, 4), remainder=st.sampled_from(["pack", "pad", "drop"]), seed=st.integers(0, 2**64 - 1),
       block_rows=st.integers(1, 9), cut=st.integers(0, 80))
def test_property_block_parallel_path_equals_per_document_layout(lengths, lo_k, span, remainder, seed, block_rows,
                                                                 cut):
    # decompose_lengths lays out blocks of _BLOCK_ROWS rows (prefix sums per block, the packed tail position
    # carried across blocks); tiny blocks put block edges everywhere, inside packed sequences included
    lengths = np.array(lengths, dtype=np.int64)
    kw = {"min_log2": lo_k, "max_log2": lo_k + span, "seed": seed}
    cut = min(cut, len(lengths))
    ref = _block_api(lengths, [(a, b) for a, b in ((0, cut), (cut, len(lengths))) if b > a], remainder, **kw)
    old = nd._BLOCK_ROWS
    nd._BLOCK_ROWS = block_rows
    try:
        got = decompose_lengths(lengths, remainder=remainder, **kw)
    finally:
        nd._BLOCK_ROWS = old
    assert list(got) == list(ref)
    for k, v in ref.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == np.int64 and got[k].tobytes() == v.tobytes(), k
        else:
            assert type(got[k]) is int and got[k] == v, k


@pytest.mark.parametrize("remainder", ["pack", "pad", "drop"])
def test_many_blocks_match_reference_with_long_documents(remainder):
    # documents far beyond 2^(max+1) (many size draws) spread over 1,024 blocks
    rng = np.random.default_rng(5)
    lengths = np.maximum(1, rng.lognormal(6.0, 2.0, 3000).astype(np.int64))
    old = nd._BLOCK_ROWS
    nd._BLOCK_ROWS = 2
    try:
        got = check_against_reference(lengths, 3, 7, remainder, seed=2**64 - 3)
    finally:
        nd._BLOCK_ROWS = old
    assert (lengths >= 1 << 8).sum() > 300
    check_invariants(got, lengths, 3, 7, remainder)


def test_bucket_totals_match_bincount():
    rng = np.random.default_rng(0)
    log2 = rng.integers(2, 9, 200_000)
    tokens = rng.integers(1, 1 << 9, 200_000)
    seqs, toks = bucket_totals(log2, tokens, 10)
    assert seqs.dtype == toks.dtype == np.int64 and len(seqs) == len(toks) == 11
    np.testing.assert_array_equal(seqs, np.bincount(log2, minlength=11))
    np.testing.assert_array_equal(toks, np.bincount(log2, weights=tokens, minlength=11).astype(np.int64))
    empty = bucket_totals(np.zeros(0, np.int64), np.zeros(0, np.int64), 3)
    assert empty[0].tolist() == empty[1].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"sequence_log2 must lie in \[0, 3\] \(got 2\.\.4\)"):
        bucket_totals(np.array([2, 4]), np.array([1, 1]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        bucket_totals(np.array([2, 3]), np.array([1]), 3)


def test_reference_rule_loses_tokens_we_keep():
    rng = np.random.default_rng(0)
    lengths = np.maximum(1, rng.lognormal(np.log(600) - 0.5, 1.0, 20000).astype(np.int64))
    packed = decompose_lengths(lengths)
    dropped = decompose_lengths(lengths, remainder="drop")
    assert packed["kept_tokens"] / packed["tokens"] >= 0.995 and packed["eos_kept"] == len(lengths)
    assert dropped["kept_tokens"] / dropped["tokens"] < 0.9 and dropped["eos_kept"] < 0.01 * len(lengths)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(min_log2=9, max_log2=8), ValueError, "min_log2 must be <= max_log2"),
    (dict(min_log2=-1), ValueError, "min_log2 must be an integer"),
    (dict(min_log2=0, max_log2=31), ValueError, "must be <= 30"),
    (dict(max_log2=2.5), ValueError, "max_log2 must be an integer"),
    (dict(remainder="keep"), ValueError, "remainder must be one of"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_parameters(kw, exc, match):
    with pytest.raises(exc, match=match):
        decompose_lengths([10, 20], **kw)


@pytest.mark.parametrize("lengths,exc,match", [
    ([5, 0, 7], ValueError, r"zero .* at row 1"),
    ([5, -3], ValueError, r"negative length -3 at row 1"),
    ([1.0, 2.0], TypeError, "must be integers"),
    ([[1, 2]], ValueError, "must be 1-D"),
])
def test_bad_lengths(lengths, exc, match):
    with pytest.raises(exc, match=match):
        decompose_lengths(np.array(lengths))


def test_empty_input():
    got = decompose_lengths(np.zeros(0, np.int64))
    assert len(got["row"]) == 0 and len(got["sequence_log2"]) == 0 and got["tokens"] == 0


# ---- curriculum_order --------------------------------------------------------------------------------------------
def ref_curriculum(counts, odds, seed):
    st = [seed & M64]
    rem = list(counts)
    out = []
    for _ in range(sum(counts)):
        w = [o * r for o, r in zip(odds, rem)]
        u = float(_splitmix(st) >> 11) * (1.0 / 9007199254740992.0) * sum(w)
        acc, pick = 0.0, -1
        for k in range(len(rem)):
            if rem[k] > 0:
                pick = k
                acc += w[k]
                if u < acc:
                    break
        out.append(pick)
        rem[pick] -= 1
    return out


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=7), seed=st.integers(0, 2**64 - 1),
       data=st.data())
def test_curriculum_order_matches_reference(counts, seed, data):
    odds = data.draw(st.lists(st.floats(0.01, 100.0), min_size=len(counts), max_size=len(counts)))
    got = curriculum_order(counts, odds, seed)
    assert got.tolist() == ref_curriculum(counts, odds, seed)
    np.testing.assert_array_equal(np.bincount(got, minlength=len(counts)), counts)


def test_curriculum_order_p2_is_short_first():
    counts = np.array([400, 200, 100, 50])
    got = curriculum_order(counts, np.exp2(3 - np.arange(4)), 5)
    first, last = got[: len(got) // 4], got[-len(got) // 4 :]
    assert first.mean() < last.mean() - 0.5


def test_curriculum_order_errors():
    with pytest.raises(ValueError, match="odds must be finite and > 0"):
        curriculum_order([1, 2], [1.0, 0.0], 0)
    with pytest.raises(ValueError, match="one shape"):
        curriculum_order([1, 2], [1.0], 0)
