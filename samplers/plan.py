"""Epoch plans and the pure, vectorised helpers that arrange them for ranks: a :class:`Plan` (rows batch after
batch, with shape groups and counted drops/repeats), :func:`even_out` / :func:`group_steps` /
:func:`regroup_in_order` (equal batch counts per rank, same-shape steps), :func:`take_batches` / :func:`deal`
(reorder and deal batches), and the metadata checks every sampler uses (:func:`check_lengths`,
:func:`digest_array`). ``samplers.base`` builds the sampler contract on them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from native.batching import split_to_multiple

__all__ = ["Plan", "check_budget", "check_lengths", "deal", "digest_array", "even_out", "group_steps", "jsonable",
           "regroup_in_order", "reorder_steps", "resolve_rank", "resolve_world", "take_batches"]


@dataclasses.dataclass
class Plan:
    """A global epoch plan: batch ``b`` is ``indices[offsets[b]:offsets[b+1]]``.

    Attributes:
        indices: int64 ``[N]`` rows, batch after batch.
        offsets: int64 ``[B+1]`` batch boundaries.
        groups: optional int64 ``[B]``: the shape key of each batch (a bucket id); batches dealt at one step
            share it when the plan was arranged by :func:`group_steps`.
        dropped: reason -> number of rows left out of this epoch.
        repeated: reason -> number of row slots that repeat a row already in the epoch.
    """

    indices: NDArray[np.int64]
    offsets: NDArray[np.int64]
    groups: NDArray[np.int64] | None = None
    dropped: dict = dataclasses.field(default_factory=dict)
    repeated: dict = dataclasses.field(default_factory=dict)

    @property
    def num_batches(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> NDArray[np.int64]:
        return np.diff(self.offsets)

    def padding(self, values: NDArray) -> tuple[float, float]:
        """``(real, padded)`` totals of a per-row size (tokens, seconds) under this plan: padded counts every
        row of a batch at the batch's largest size, as a ``[B, max]`` layout does."""
        v = values[self.indices]
        if not self.num_batches:
            return float(v.sum()), 0.0
        return float(v.sum()), float((np.maximum.reduceat(v, self.offsets[:-1]) * self.sizes).sum())

    @classmethod
    def from_sizes(cls, indices: NDArray, sizes: NDArray, **kw) -> Plan:
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return cls(np.ascontiguousarray(indices[: offsets[-1]], dtype=np.int64), offsets, **kw)


def check_lengths(lengths, name: str = "lengths", n: int | None = None) -> NDArray[np.int64]:
    """Validate a metadata array of per-row counts (tokens, frames): 1-D (``n`` rows when given), finite whole
    numbers, ``>= 0``. Returns int64; errors name the parameter and the first bad row."""
    arr = np.asarray(lengths)
    if arr.ndim != 1 or (n is not None and len(arr) != n):
        want = f"({n},)" if n is not None else "1-D"
        raise ValueError(f"{name} must have shape {want} (got shape {arr.shape})")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise ValueError(f"{name} has NaN/inf at row {int(bad[0])} ({len(bad)} rows in all)")
        bad = np.flatnonzero(arr != np.round(arr))
        if len(bad):
            raise ValueError(f"{name} must be whole numbers: row {int(bad[0])} has {arr[bad[0]]}")
        big = np.flatnonzero(np.abs(arr) > 2.0**53)
        if len(big):
            raise ValueError(f"{name} has {arr[big[0]]!r} at row {int(big[0])}: counts above 2**53 are not exact as "
                             "floats; store lengths as integers")
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers (got dtype {arr.dtype})")
    elif arr.dtype == np.uint64 and len(arr):
        big = np.flatnonzero(arr > np.uint64(2**63 - 1))
        if len(big):
            raise ValueError(f"{name} has {int(arr[big[0]])} at row {int(big[0])}, which does not fit int64")
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"{name} has a negative value {arr[neg[0]]} at row {int(neg[0])}")
    # a memory-mapped int64 array is used as it is (no copy): plans read it, never write it
    return arr if arr.dtype == np.int64 else arr.astype(np.int64)


def check_budget(values: NDArray, budget: float, name: str) -> None:
    """Refuse a budget whose padded totals could overflow int64 (``rows * max value``)."""
    if len(values) and float(np.max(values)) * float(len(values)) >= 2.0**63 and budget >= 2.0**62:
        raise ValueError(f"{name}={budget} with these lengths can overflow int64 totals; use a smaller {name}")


def digest_array(arr) -> str:
    """A cheap fingerprint of a metadata array: its length, dtype and up to 65,536 evenly spaced values plus the
    first and last 1,024 (reads a few MB even from a 1e9-row memory map). Guards a state against another dataset;
    it is not a checksum of every value."""
    a = np.asarray(arr)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.shape}|{a.dtype.str}".encode())
    n = len(a)
    if n:
        step = max(1, n // 65536)
        for part in (a[:1024], a[::step], a[-1024:]):
            h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def jsonable(x):
    """Options as they read back from JSON (tuples become lists, numpy scalars plain numbers)."""
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else o.tolist()))


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: the arguments when given, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        r, w = 0, 1
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                r, w = dist.get_rank(), dist.get_world_size()
        except ImportError:  # pragma: no cover - torch is a dependency, but samplers do not need it
            pass
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1 (got {world_size=})")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got {rank=}, {world_size=})")
    return int(rank), int(world_size)


def resolve_rank(rank: int | None, world_size: int | None) -> int:
    return resolve_world(rank, world_size)[0]


def even_out(plan: Plan, world_size: int, drop_last: bool) -> Plan:
    """Make the batch count a multiple of ``world_size`` without losing rows silently.

    ``drop_last=False`` splits the largest batches in two (rows and order kept; a split batch only gets
    smaller, so any budget still holds). ``drop_last=True`` drops the trailing ``B % world_size`` batches and
    counts their rows under ``dropped["uneven_tail"]``. When an epoch has too few rows to split (fewer rows
    than the next multiple of ``world_size``), the tail is dropped and counted under
    ``dropped["uneven_tail_too_few_rows_to_split"]``.
    """
    nb = plan.num_batches
    if nb % world_size == 0:
        return plan
    if not drop_last and len(plan.indices) < -(-nb // world_size) * world_size:
        # too few rows to split into the next multiple (tiny epochs): drop the tail instead, and count it
        return _drop_tail(plan, nb % world_size, "uneven_tail_too_few_rows_to_split")
    if drop_last:
        return _drop_tail(plan, nb % world_size, "uneven_tail")
    sizes = split_to_multiple(plan.sizes, world_size)
    groups = None
    if plan.groups is not None:
        # a split batch keeps its group: map each new batch back to the old batch holding its first row
        new_off = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(plan.offsets, new_off[:-1], side="right") - 1
        groups = plan.groups[owner]
    return Plan.from_sizes(plan.indices, sizes, groups=groups, dropped=plan.dropped, repeated=plan.repeated)


def _drop_tail(plan: Plan, count: int, reason: str) -> Plan:
    keep = plan.num_batches - count
    dropped = dict(plan.dropped)
    lost = int(plan.offsets[-1] - plan.offsets[keep])
    dropped[reason] = dropped.get(reason, 0) + lost
    groups = None if plan.groups is None else plan.groups[:keep]
    return Plan(plan.indices[: plan.offsets[keep]], plan.offsets[: keep + 1], groups, dropped, plan.repeated)


def group_steps(plan: Plan, world_size: int, drop_last: bool, step_order: NDArray[np.int64] | None = None,
                seed: int | None = None,
                order_steps: Callable[[NDArray[np.int64]], NDArray[np.int64]] | None = None) -> Plan:
    """Arrange a grouped plan so that the ``world_size`` batches of every step share a group (shape).

    Each group's batches are evened out on their own (:func:`even_out`), cut into steps of ``world_size``
    consecutive batches, and the steps are laid out in ``step_order`` (indices into the steps, grouped in order
    of first appearance of each group) or, with ``seed``, in a seeded random order, or else group by group.

    ``order_steps`` (a step-order hook, used instead of ``step_order``/``seed``) is called with int64 ``[S]``: the
    batch of ``plan`` that each step's first batch comes from (steps in grouped order; a batch split by evening out
    comes from the batch it was split off), and returns the step order. A sampler whose lazy plan orders steps by
    their source (``samplers.grouped_lazy_plan.arrange_parts`` takes the same hook) gets one order on both paths.
    """
    if plan.groups is None:
        raise ValueError("group_steps needs a plan with groups")
    sizes = plan.sizes
    uniq, first = np.unique(plan.groups, return_index=True)
    order_groups = uniq[np.argsort(first, kind="stable")]
    parts_idx, parts_sizes, parts_groups, parts_src = [], [], [], []
    dropped = dict(plan.dropped)
    for g in order_groups:
        sel = np.flatnonzero(plan.groups == g)
        rows = np.concatenate([plan.indices[plan.offsets[b] : plan.offsets[b + 1]] for b in sel])
        sub = Plan.from_sizes(rows, sizes[sel], groups=np.full(len(sel), g, dtype=np.int64))
        sub = even_out(sub, world_size, drop_last)
        if order_steps is not None:  # evening out keeps rows in order: a batch comes from the one holding its start
            old = np.concatenate([[0], np.cumsum(sizes[sel])])
            parts_src.append(sel[np.searchsorted(old, sub.offsets[:-1], side="right") - 1])
        for k, v in sub.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        parts_idx.append(sub.indices)
        parts_sizes.append(sub.sizes)
        parts_groups.append(sub.groups)
    if not parts_idx:
        return Plan(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), dropped, plan.repeated)
    indices = np.concatenate(parts_idx)
    sizes = np.concatenate(parts_sizes)
    groups = np.concatenate(parts_groups)
    nsteps = len(sizes) // world_size
    if order_steps is not None:
        step_order = order_steps(np.concatenate(parts_src).astype(np.int64)[::world_size][:nsteps])
    elif step_order is None and seed is not None:
        from native.rng import permutation

        step_order = permutation(nsteps, seed)
    out = Plan.from_sizes(indices, sizes, groups=groups, dropped=dropped, repeated=plan.repeated)
    if step_order is not None:
        out = reorder_steps(out, np.asarray(step_order, dtype=np.int64), world_size)
    return out


def reorder_steps(plan: Plan, step_order: NDArray[np.int64], world_size: int) -> Plan:
    """Permute the steps (blocks of ``world_size`` consecutive batches) of a plan."""
    nsteps = plan.num_batches // world_size
    if sorted(step_order.tolist()) != list(range(nsteps)):
        raise ValueError("step_order must be a permutation of the steps")
    batch_order = (step_order[:, None] * world_size + np.arange(world_size)[None, :]).ravel()
    return take_batches(plan, batch_order)


def take_batches(plan: Plan, batch_order: NDArray[np.int64]) -> Plan:
    """A plan holding ``plan``'s batches in ``batch_order`` (vectorised: no Python loop over batches)."""
    sizes = plan.sizes[batch_order]
    starts = plan.offsets[:-1][batch_order]
    new_off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=new_off[1:])
    # position p in the new plan reads old position starts[b] + (p - new_off[b])
    rel = np.arange(new_off[-1], dtype=np.int64) - np.repeat(new_off[:-1], sizes)
    src = np.repeat(starts, sizes) + rel
    groups = None if plan.groups is None else plan.groups[batch_order]
    return Plan(plan.indices[src], new_off, groups, plan.dropped, plan.repeated)


def regroup_in_order(plan: Plan, world_size: int, drop_last: bool) -> Plan:
    """Re-arrange the rest of an epoch for another world size, keeping the order of its steps in time.

    Grouped plans: each group's batches are evened out on their own and cut into steps of ``world_size``; the steps
    are then laid out in the order of their first batch in ``plan`` (a curriculum keeps its course). Plans without
    groups are evened out as they are.
    """
    if plan.groups is None:
        return even_out(plan, world_size, drop_last)
    out = group_steps(plan, world_size, drop_last)  # group by group, batches in plan order within a group
    if not out.num_batches:
        return out
    # the place in time of each output step: where its batches' first rows stood in the input plan
    starts = out.indices[out.offsets[:-1]]
    order = np.argsort(plan.indices, kind="stable")
    loc = order[np.searchsorted(plan.indices[order], starts)]
    step_key = loc.reshape(-1, world_size).min(axis=1)
    return reorder_steps(out, np.argsort(step_key, kind="stable").astype(np.int64), world_size)


def deal(plan: Plan, rank: int, world_size: int) -> Plan:
    """Rank ``rank``'s share: batches ``rank, rank + W, rank + 2W, ...`` (one per step)."""
    if plan.num_batches % world_size:
        raise AssertionError("plan must be evened out before dealing")  # internal invariant
    return take_batches(plan, np.arange(rank, plan.num_batches, world_size, dtype=np.int64))
