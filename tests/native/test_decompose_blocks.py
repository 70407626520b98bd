"""native.decompose_blocks.plan_layout of one block of rows (``start``, ``num_full``): the slice of the whole
corpus's layout, so blocks can be laid out one after another (the streaming engine of datapipe.decompose)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.decompose_blocks import plan_layout, scan_documents


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=60), cut=st.data(),
       remainder=st.sampled_from(["pack", "pad", "drop"]), lo_k=st.integers(0, 5), span=st.integers(0, 4))
def test_block_layout_is_the_slice_of_the_whole_layout(lengths, cut, remainder, lo_k, span):
    kw = dict(min_log2=lo_k, max_log2=lo_k + span, seed=9)
    counts, tail = scan_documents(np.array(lengths), **kw)
    whole = plan_layout(counts, tail, min_log2=lo_k, remainder=remainder)
    a = cut.draw(st.integers(0, len(lengths) - 1))
    b = cut.draw(st.integers(a + 1, len(lengths)))
    start = tuple(int(whole[k][a]) for k in ("piece_off", "tail_off", "tail_pos"))
    c2, t2 = scan_documents(np.array(lengths[a:b]), row_offset=a, **kw)
    np.testing.assert_array_equal(c2, counts[a:b])
    part = plan_layout(c2, t2, min_log2=lo_k, remainder=remainder, start=start, num_full=whole["num_full"])
    for k in ("piece_off", "tail_off", "tail_pos"):
        np.testing.assert_array_equal(part[k], whole[k][a:b + 1], err_msg=k)
    assert part["num_full"] == whole["num_full"]
    if b == len(lengths):  # the last block's totals are the corpus's
        for k in ("num_rem_pieces", "num_rem_sequences", "tail_tokens"):
            assert part[k] == whole[k], k


@pytest.mark.parametrize("start", [(0, 0), (0, -1, 0)])
def test_bad_start(start):
    with pytest.raises(ValueError, match="start must be three offsets >= 0"):
        plan_layout(np.zeros(2, np.int64), np.zeros(2, np.int64), min_log2=2, start=start)
