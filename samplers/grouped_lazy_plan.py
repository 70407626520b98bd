"""Grouped plans kept as parts of source batches: the bucketed counterpart of :mod:`samplers.lazy_plan`.

A windowed bucketed sampler (``DurationBucketSampler`` above its exact threshold) knows, after a counting pass,
the size and bucket of every *source* batch (window by window), not their rows. Its arranged plan is then a
:class:`PartPlan`: batch ``i`` is rows ``[a[i], a[i] + size[i])`` of source batch ``src[i]`` (a part, because
evening out splits the largest batches of a bucket in two). :func:`arrange_parts` mirrors
:func:`samplers.base.group_steps` (first arrangement: each group evened out on its own, steps of ``world_size``
batches of one group, a seeded permutation of the steps) and :func:`samplers.base.regroup_in_order` (the rest of
an epoch re-arranged for another world size, steps kept in time order) exactly, on parts; the tests check this
against the materialised path. The first arrangement keeps the step permutation instead of applying it, so the
arranged batch ``i`` is looked up, not stored.

Memory: ``16 B`` per batch (``src`` int64, ``a`` and ``size`` int32), nothing per row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from native.batching import split_to_multiple
from native.rng import mix_seed, permutation

__all__ = ["PartPlan", "arrange_parts", "even_out_parts", "window_major_steps"]


@dataclasses.dataclass
class PartPlan:
    """Batches as parts of source batches, in grouped order; arranged batch ``i`` is grouped batch
    ``step_order[i // W] * W + i % W`` (or ``i`` itself when ``step_order`` is ``None``).

    Attributes:
        src: int64 ``[B]`` source batch of each batch.
        a: int32 ``[B]`` first row of the part within its source batch.
        size: int32 ``[B]`` rows of the part.
        world_size: ``W``, the number of batches per step.
        step_order: int64 ``[B / W]`` grouped step of each arranged step, or ``None``.
        dropped: reason -> rows left out.
    """

    src: NDArray[np.int64]
    a: NDArray[np.int32]
    size: NDArray[np.int32]
    world_size: int
    step_order: NDArray[np.int64] | None = None
    dropped: dict = dataclasses.field(default_factory=dict)

    @property
    def num_batches(self) -> int:
        return len(self.src)

    @property
    def rows(self) -> int:
        return int(self.size.sum(dtype=np.int64))

    def grouped_index(self, i: NDArray[np.int64] | int):
        """Index into ``src``/``a``/``size`` of arranged batch(es) ``i``."""
        if self.step_order is None:
            return i
        w = self.world_size
        return self.step_order[i // w] * w + i % w

    def part(self, i: int) -> tuple[int, int, int]:
        """``(src, a, size)`` of arranged batch ``i``."""
        g = int(self.grouped_index(i))
        return int(self.src[g]), int(self.a[g]), int(self.size[g])

    def skip(self, count: int) -> PartPlan:
        """The arranged plan without its first ``count`` batches, materialised in arranged order."""
        g = self.grouped_index(np.arange(count, self.num_batches, dtype=np.int64))
        return PartPlan(self.src[g], self.a[g], self.size[g], self.world_size, None, dict(self.dropped))


def even_out_parts(src, a, size, world_size: int, drop_last: bool, dropped: dict):
    """:func:`samplers.base.even_out` on parts: ``(src, a, size, owner)`` with the batch count a multiple of
    ``world_size`` (the largest parts split in two, or the trailing parts dropped and counted in ``dropped``);
    ``owner[j]`` is the input part that new part ``j`` comes from."""
    nb = len(size)
    if nb % world_size == 0:
        return src, a, size, None
    reason = None
    if not drop_last and int(size.sum(dtype=np.int64)) < -(-nb // world_size) * world_size:
        reason = "uneven_tail_too_few_rows_to_split"
    elif drop_last:
        reason = "uneven_tail"
    if reason is not None:
        keep = nb - nb % world_size
        dropped[reason] = dropped.get(reason, 0) + int(size[keep:].sum(dtype=np.int64))
        return src[:keep], a[:keep], size[:keep], None
    new = split_to_multiple(size.astype(np.int64), world_size)
    old_off = np.zeros(nb + 1, dtype=np.int64)
    np.cumsum(size, out=old_off[1:])
    new_off = np.zeros(len(new) + 1, dtype=np.int64)
    np.cumsum(new, out=new_off[1:])
    owner = np.searchsorted(old_off, new_off[:-1], side="right") - 1
    a2 = (a[owner] + (new_off[:-1] - old_off[owner])).astype(np.int32)
    return src[owner], a2, new.astype(np.int32), owner


def window_major_steps(first_src: NDArray[np.int64], window_starts: NDArray[np.int64], seed: int) -> NDArray[np.int64]:
    """A step order that keeps each window's steps together: the windows in a seeded random order, the steps of a
    window in a random order of their own, a step placed by its first part's window.

    Args:
        first_src: int64 ``[S]`` source batch of each step's first part (source batches in window order).
        window_starts: int64 ``[W+1]`` first source batch of each window.
        seed: the epoch's step seed.

    Returns:
        int64 ``[S]``: the steps, in their new order. A rank then plans each window once per run of steps instead of
        once per batch; the steps themselves do not change.
    """
    nsteps = len(first_src)
    win = np.searchsorted(window_starts, first_src, side="right") - 1
    nw = len(window_starts) - 1
    rank = np.empty(nw, dtype=np.int64)
    rank[permutation(nw, seed)] = np.arange(nw, dtype=np.int64)  # window -> its place in the order
    return np.lexsort((permutation(nsteps, mix_seed(seed, 1)), rank[win])).astype(np.int64)


def arrange_parts(src, a, size, groups, world_size: int, drop_last: bool, dropped: dict, *,
                  step_seed: int | None = None, in_time: bool = False,
                  order_steps: Callable[[NDArray[np.int64]], NDArray[np.int64]] | None = None) -> PartPlan:
    """Steps of ``world_size`` parts of one group each: :func:`samplers.base.group_steps` (with ``step_seed``: a
    seeded step permutation, kept lazily; with ``order_steps``: the order that hook gives, as ``group_steps``
    calls it; else group by group) or, with ``in_time``, :func:`samplers.base.regroup_in_order` (steps in the
    order their first part stood in the input).

    Args:
        src, a, size: the input parts in plan order (int64, int32, int32 ``[B]``); ``src=None`` stands for
            ``arange(B)`` and ``a=None`` for zeros (whole source batches, without the arrays).
        groups: int ``[B]`` group of each part (integers ``>= 0``).
        world_size, drop_last: as the sampler's.
        dropped: reason -> rows dropped so far (copied, then added to).
        order_steps: the step-order hook of :func:`samplers.base.group_steps`: called with int64 ``[S]``, the
            source batch of each step's first part (steps in grouped order), it returns the step order (e.g.
            :func:`window_major_steps`), kept lazily.

    Returns:
        the arranged :class:`PartPlan`.
    """
    dropped = dict(dropped)
    nb = len(size)
    w = world_size
    if nb == 0:
        return PartPlan(np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), w, None, dropped)
    order = np.argsort(groups, kind="stable")  # radix sort for small integer groups
    counts = np.bincount(groups)
    present = np.flatnonzero(counts)
    bounds = np.zeros(len(present) + 1, dtype=np.int64)
    np.cumsum(counts[present], out=bounds[1:])
    first = order[bounds[:-1]]  # a group's first part in the input (stable sort: its smallest index)
    cap = nb + len(present) * w
    out_src = np.empty(cap, dtype=np.int64)
    out_a = np.empty(cap, dtype=np.int32)
    out_size = np.empty(cap, dtype=np.int32)
    key = np.empty(cap, dtype=np.int64) if in_time else None
    at = 0
    for gi in np.argsort(first, kind="stable"):  # groups in order of first appearance (as group_steps)
        sel = order[bounds[gi] : bounds[gi + 1]]
        s_in = sel if src is None else src[sel]
        a_in = np.zeros(len(sel), dtype=np.int32) if a is None else a[sel]
        s2, a2, z2, owner = even_out_parts(s_in, a_in, size[sel], w, drop_last, dropped)
        m = len(s2)
        out_src[at : at + m] = s2
        out_a[at : at + m] = a2
        out_size[at : at + m] = z2
        if in_time:
            key[at : at + m] = sel[:m] if owner is None else sel[owner]
        at += m
    del order
    out_src, out_a, out_size = out_src[:at], out_a[:at], out_size[:at]
    nsteps = at // w
    if in_time:
        step_key = key[:at].reshape(nsteps, w).min(axis=1)
        step_order = np.argsort(step_key, kind="stable").astype(np.int64)
    elif order_steps is not None:
        step_order = np.asarray(order_steps(out_src[::w][:nsteps]), dtype=np.int64)
    elif step_seed is not None:
        step_order = permutation(nsteps, step_seed)
    else:
        step_order = None
    return PartPlan(out_src, out_a, out_size, w, step_order, dropped)
