"""native.windows.window_major_order: a deal of every window's batches that keeps a window's batches together."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from native.windows import window_major_order


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.integers(0, 2**63 - 1))
def test_every_batch_once_windows_contiguous_and_shuffled(counts, seed):
    wcum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    order = window_major_order(wcum, seed, seed ^ 12345)
    assert sorted(order.tolist()) == list(range(int(wcum[-1])))  # a permutation of the batches
    win = np.searchsorted(wcum, order, side="right") - 1
    runs = [int(w) for i, w in enumerate(win) if i == 0 or w != win[i - 1]]
    assert len(runs) == len(set(runs)) == sum(c > 0 for c in counts)  # each window's batches in one run


def test_orders_depend_on_the_seeds():
    wcum = np.arange(0, 401, 20, dtype=np.int64)  # 20 windows of 20 batches
    a, b, c = (window_major_order(wcum, s, p) for s, p in ((1, 2), (3, 2), (1, 4)))
    win = lambda o: (np.searchsorted(wcum, o, side="right") - 1)[::20].tolist()  # noqa: E731
    assert win(a) != win(b) and sorted(win(a)) == sorted(win(b)) == list(range(20))  # window order from the seed
    assert win(a) == win(c) and a.tolist() != c.tolist()  # batch order within windows from the prefix
