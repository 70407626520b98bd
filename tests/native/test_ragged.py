import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from native.ragged import gather_ragged, pack_ragged, pad_ragged

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
