import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from native.ragged import gather_ragged, gather_values, pack_layout, pack_ragged, pad_ragged, pad_rows

rows_st = st.lists(st.lists(st.integers(0, 1000), max_size=12), min_size=1, max_size=100)


def to_ragged(rows):
    off = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=off[1:])
    vals = np.array([v for r in rows for v in r], dtype=np.int32)
    return vals, off


@settings(max_examples=50, deadline=None)
@given(rows=rows_st, data=st.data(), parallel=st.booleans())
def test_gather_matches_python(rows, data, parallel):
    vals, off = to_ragged(rows)
    take = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=150))
    v, o = gather_ragged(vals, off.astype(np.int32), np.array(take, dtype=np.int64), parallel=parallel)
    ref = [rows[t] for t in take]
    assert [v[o[i] : o[i + 1]].tolist() for i in range(len(take))] == ref
    assert v.dtype == np.int32


@settings(max_examples=50, deadline=None)
@given(rows=rows_st, pad_id=st.integers(-5, 5), mult=st.one_of(st.none(), st.integers(1, 8)), parallel=st.booleans())
def test_pad_matches_python(rows, pad_id, mult, parallel):
    vals, off = to_ragged(rows)
    ids, mask, labels = pad_ragged(vals, off, pad_id=pad_id, pad_to_multiple_of=mult, parallel=parallel)
    L = max(len(r) for r in rows)
    if mult:
        L = -(-L // mult) * mult
    assert ids.shape == (len(rows), L)
    for b, r in enumerate(rows):
        assert ids[b].tolist() == r + [pad_id] * (L - len(r))
        assert mask[b].tolist() == [1] * len(r) + [0] * (L - len(r))
        assert labels[b].tolist() == r + [-100] * (L - len(r))


@settings(max_examples=50, deadline=None)
@given(rows=rows_st, parallel=st.booleans())
def test_pack_matches_python(rows, parallel):
    vals, off = to_ragged(rows)
    ids, pos, labels = pack_ragged(vals, off, parallel=parallel)
    assert ids.tolist() == [v for r in rows for v in r]
    assert pos.tolist() == [j for r in rows for j in range(len(r))]
    assert labels.tolist() == [(-100 if j == 0 else v) for r in rows for j, v in enumerate(r)]


def test_gather_out_of_range():
    vals, off = to_ragged([[1], [2, 3]])
    with pytest.raises(IndexError, match="rows must be in"):
        gather_ragged(vals, off, np.array([2]))


def split_sources(vals, off, take, cuts):
    """The rows `take` of a ragged column as several sources (as shards would hand them over): each source is a
    separate copy of a slice of rows, with the batch positions of the rows it holds."""
    bounds = sorted({0, len(off) - 1, *cuts})
    sources = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b <= a:
            continue
        s_off = (off[a : b + 1] - off[a]).astype(np.int32)
        s_vals = vals[off[a] : off[b]].copy()
        pos = np.flatnonzero((take >= a) & (take < b)).astype(np.int64)
        sources.append((s_off, s_vals, (take[pos] - a).astype(np.int64), pos))
    return sources


@settings(max_examples=50, deadline=None)
@given(rows=rows_st, data=st.data(), parallel=st.booleans(), dtype=st.sampled_from([np.int32, np.int64]))
def test_pad_rows_from_several_sources_matches_numpy(rows, data, parallel, dtype):
    vals, off = to_ragged(rows)
    take = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=60)), dtype=np.int64)
    cuts = data.draw(st.lists(st.integers(0, len(rows)), max_size=3))
    width = data.draw(st.integers(0, 14))
    ids = np.full((len(take), width), 99, dtype=dtype)
    mask, labels = np.full_like(ids, 99), np.full((len(take), width), 99, dtype=np.int64)
    for s_off, s_vals, r, p in split_sources(vals, off, take, cuts):
        pad_rows(s_off, s_vals, r, p, ids, mask, labels, pad_id=-1, label_pad=-100, parallel=parallel)
    for b, t in enumerate(take):  # numpy reference: truncate to the width, pad the rest
        row = np.asarray(rows[t][:width], dtype=np.int64)
        n = len(row)
        assert ids[b].tolist() == row.tolist() + [-1] * (width - n)
        assert labels[b].tolist() == row.tolist() + [-100] * (width - n)
        assert mask[b].tolist() == [1] * n + [0] * (width - n)


@settings(max_examples=50, deadline=None)
@given(rows=rows_st, data=st.data(), parallel=st.booleans(), dtype=st.sampled_from([np.int32, np.int64]))
def test_gather_then_pack_layout_from_several_sources_matches_numpy(rows, data, parallel, dtype):
    vals, off = to_ragged(rows)
    take = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), min_size=1, max_size=150)), dtype=np.int64)
    cuts = data.draw(st.lists(st.integers(0, len(rows)), max_size=3))
    lengths = np.diff(off)[take]
    out_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    T = int(out_off[-1])
    ids, pos, labels = np.empty(T, dtype), np.empty(T, dtype), np.empty(T, np.int64)
    for s_off, s_vals, r, p in split_sources(vals, off, take, cuts):
        gather_values(s_off, s_vals, r, p, out_off, ids, parallel=parallel)
    pack_layout(out_off, ids, pos, labels, label_pad=-7, parallel=parallel)
    ref = [np.asarray(rows[t], dtype=np.int64) for t in take]  # numpy reference
    flat = np.concatenate(ref) if T else np.zeros(0, np.int64)
    assert ids.tolist() == flat.tolist()
    assert pos.tolist() == np.concatenate([np.arange(len(r)) for r in ref]).tolist()
    ref_labels = flat.copy()
    ref_labels[out_off[:-1][lengths > 0]] = -7
    assert labels.tolist() == ref_labels.tolist()


def test_pack_ragged_keeps_offsets_that_do_not_start_at_zero():
    vals = np.arange(10, dtype=np.int32)
    ids, pos, labels = pack_ragged(vals, np.array([3, 5, 8]), dtype=np.int32)
    assert ids.tolist() == [3, 4, 5, 6, 7] and ids.dtype == np.int32 and pos.tolist() == [0, 1, 0, 1, 2]
    assert labels.tolist() == [-100, 4, -100, 6, 7] and labels.dtype == np.int64


def test_layout_errors_name_the_problem():
    vals, off = to_ragged([[1], [2, 3]])
    out = np.zeros((2, 2), np.int64)
    with pytest.raises(IndexError, match="rows must be in"):
        pad_rows(off, vals, np.array([0, 2]), np.array([0, 1]), out, out.copy(), out.copy())
    with pytest.raises(IndexError, match="pos must be in"):
        pad_rows(off, vals, np.array([0, 1]), np.array([0, 2]), out, out.copy(), out.copy())
    with pytest.raises(ValueError, match="out_offsets must start at 0"):
        pack_layout(np.array([0, 5]), np.zeros(3), np.zeros(3), np.zeros(3))
