"""The dataset-decomposition plan kept as steps over bucket streams: what ``DecomposedBatchSampler`` needs at 1e9.

The exact plan (``samplers.decomposed``) materialises every sequence of the epoch. Its structure is simple,
though: a *group* is one cycle's slice of one bucket ``k`` (a contiguous range of the bucket's shuffled
sequences, read cyclically when repeats fill its last step, ``drop_last=False``), cut into batches of ``b =
tokens_per_batch >> k`` sequences, ``world_size`` batches per step; the curriculum only orders the steps. So a
:class:`StepPlan` keeps, per group, where its batches start in the group's stream, and per step its group and
its index within the group (``[steps]`` int32 + int64; 1e9 sequences at 2^17 tokens per batch and 8 ranks:
~1.4M steps, 17 MB). Rank ``r``'s batch at step ``s`` is group stream positions ``[q * b, (q + 1) * b)`` with
``q = base[g] + j[s] * W + r``; the sampler maps positions to sequences on demand (a Feistel permutation of
the bucket, then the bucket's ``m``-th sequence by ``native.bucket_select``).

An elastic resume re-arranges the rest of the epoch as ``samplers.base.regroup_in_order`` does on the
materialised plan: each group's remaining batches (a contiguous range of its stream: a group's steps are taken
in order) are cut into steps of the new world size (the trailing ``remaining % W'`` batches dropped and counted
under ``uneven_tail``), and the new steps keep their place in time (ordered by their first batch's old step and
rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from native.curriculum import curriculum_order
from native.rng import mix_seed

__all__ = ["StepPlan", "arrange_steps", "first_steps", "regroup_steps"]


@dataclasses.dataclass
class StepPlan:
    """Steps of one bucket group each, over the groups' streams of sequence positions (``G`` groups, ``S`` steps)."""

    #: batches per step
    world_size: int
    #: int64 ``[G]`` per group: bucket, sequences per batch, first position of the group's slice in the bucket's
    #: shuffled order, and the slice's length (stream position ``p`` reads shuffled position ``lo + p % length``)
    k: NDArray[np.int64]
    batch: NDArray[np.int64]
    lo: NDArray[np.int64]
    length: NDArray[np.int64]
    #: int64 ``[G]`` the curriculum cycle of each group
    cycle: NDArray[np.int64]
    #: int64 ``[G]`` the group's first batch (in batches of ``batch``) still in the plan
    base: NDArray[np.int64]
    #: int64 ``[G]`` steps of each group in the plan
    steps: NDArray[np.int64]
    #: int32 ``[S]`` the group of each step, in time order
    step_group: NDArray[np.int32]
    #: int64 ``[S]`` the step's index among its group's steps
    step_j: NDArray[np.int64]
    #: reason -> sequences left out
    dropped: dict = dataclasses.field(default_factory=dict)
    #: reason -> slots filled by repeats
    repeated: dict = dataclasses.field(default_factory=dict)
    #: steps, and batches (``num_steps * world_size``), of the plan (computed)
    num_steps: int = dataclasses.field(init=False)
    num_batches: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.num_steps = len(self.step_group)
        self.num_batches = self.num_steps * self.world_size

    def batch_span(self, b: int) -> tuple[int, int, int]:
        """``(group, first stream position, sequences)`` of global batch ``b`` (step ``b // W``, rank ``b % W``)."""
        W = self.world_size
        s, r = divmod(int(b), W)
        g = int(self.step_group[s])
        q = int(self.base[g]) + int(self.step_j[s]) * W + r
        size = int(self.batch[g])
        return g, q * size, size

    @property
    def rows(self) -> int:
        """Sequence slots of the plan (repeats counted), as ``rows`` of the other lazy plans
        (``samplers.lazy_plan.SizePlan``, ``samplers.grouped_lazy_plan.PartPlan``)."""
        return int((self.steps * self.batch).sum()) * self.world_size


def _occurrence(step_group: NDArray, groups: int) -> NDArray[np.int64]:
    """For every step, how many earlier steps have its group (the step's index within its group)."""
    order = np.argsort(step_group, kind="stable")
    counts = np.bincount(step_group, minlength=groups)
    starts = np.zeros(groups, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    j = np.empty(len(step_group), dtype=np.int64)
    j[order] = np.arange(len(step_group), dtype=np.int64) - np.repeat(starts, counts)
    return j


def first_steps(sizes: dict[int, int], odds: dict[int, float], *, tokens_per_batch: int, cycles: int,
                world_size: int, incomplete: str, seed: int) -> StepPlan:
    """The epoch's plan for ``world_size`` ranks, laid out as the exact plan lays it out.

    Args:
        sizes: bucket ``k`` -> sequences in the bucket (non-empty buckets, any order).
        odds: bucket ``k`` -> curriculum odds (``0``: the bucket is left out, counted under ``zero_odds``).
        tokens_per_batch, cycles, incomplete: the sampler's options.
        world_size: batches per step.
        seed: the curriculum's seed (cycle ``c`` draws with ``mix_seed(seed, c)``).

    Returns:
        the :class:`StepPlan` (steps of every group, in curriculum order).
    """
    W, C = int(world_size), int(cycles)
    ks: list[int] = []
    bs: list[int] = []
    lo: list[int] = []
    ln: list[int] = []
    cyc: list[int] = []
    st: list[int] = []
    dropped: dict = {}
    repeated = 0
    for c in range(C):
        for k in sorted(sizes):
            n = int(sizes[k])
            a, z = c * n // C, (c + 1) * n // C
            if odds[k] == 0:
                dropped["zero_odds"] = dropped.get("zero_odds", 0) + z - a
                continue
            b = tokens_per_batch >> k
            per_step = b * W
            steps = (z - a) // per_step
            if (z - a) % per_step and incomplete == "repeat":
                steps += 1
                repeated += steps * per_step - (z - a)
            elif (z - a) - steps * per_step:
                dropped["incomplete_step"] = dropped.get("incomplete_step", 0) + (z - a) - steps * per_step
            if steps == 0:
                continue
            for col, v in zip((ks, bs, lo, ln, cyc, st), (k, b, a, z - a, c, steps)):
                col.append(v)
    arr = [np.array(x, dtype=np.int64) for x in (ks, bs, lo, ln, cyc, st)]
    k_, b_, lo_, ln_, cyc_, st_ = arr
    parts = []
    for c in range(C):
        sel = np.flatnonzero(cyc_ == c)
        if not len(sel):
            continue
        draws = curriculum_order(st_[sel], np.array([odds[int(k)] for k in k_[sel]]), mix_seed(seed, c))
        parts.append(sel[draws].astype(np.int32))
    step_group = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    plan = StepPlan(W, k_, b_, lo_, ln_, cyc_, np.zeros(len(k_), np.int64), st_, step_group,
                    _occurrence(step_group, len(k_)), dropped, {"incomplete_step": repeated} if repeated else {})
    return plan


def regroup_steps(plan: StepPlan, consumed: int, world_size: int) -> StepPlan:
    """The rest of ``plan`` after its first ``consumed`` steps, arranged for ``world_size`` ranks (elastic).

    Every group's remaining batches are cut into steps of ``world_size`` (the trailing ``remaining %
    world_size`` batches dropped, counted under ``uneven_tail``); the new steps are ordered by the old step and
    rank of their first batch, as ``samplers.base.regroup_in_order`` orders them.
    """
    W0, W = plan.world_size, int(world_size)
    G = len(plan.k)
    done = np.bincount(plan.step_group[:consumed], minlength=G).astype(np.int64)
    left = (plan.steps - done) * W0  # remaining batches per group
    steps = left // W
    lost = int(((left % W) * plan.batch).sum())
    dropped = dict(plan.dropped)
    if lost:
        dropped["uneven_tail"] = dropped.get("uneven_tail", 0) + lost
    # old time index of each group's j-th step: group g's steps sit at when[gstart[g] + j]
    when = np.argsort(plan.step_group, kind="stable")
    gstart = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(np.bincount(plan.step_group, minlength=G), out=gstart[1:])
    new_group = np.repeat(np.arange(G, dtype=np.int32), steps)
    t = np.arange(len(new_group), dtype=np.int64) - np.repeat(np.cumsum(steps) - steps, steps)
    q = np.repeat(done * W0, steps) + t * W  # first old batch (relative to the old base) of each new step
    j_old, r_old = q // W0, q % W0
    key = when[gstart[new_group] + j_old] * W0 + r_old
    order = np.argsort(key, kind="stable")
    step_group = new_group[order]
    return StepPlan(W, plan.k, plan.batch, plan.lo, plan.length, plan.cycle, plan.base + done * W0, steps,
                    step_group, t[order], dropped, dict(plan.repeated))


def arrange_steps(first: Callable[[int], StepPlan], segments: tuple[tuple[int, int], ...],
                  world_size: int) -> StepPlan:
    """The rest of an epoch for ``world_size`` ranks after elastic ``segments`` ``((w, steps consumed), ...)``,
    as ``BatchSamplerBase._plans`` arranges a materialised plan."""
    if not segments:
        return first(world_size)
    w0, k0 = segments[0]
    plan = first(w0)
    for w, k in segments[1:]:
        plan = regroup_steps(plan, k0, w)
        k0 = k
    return regroup_steps(plan, k0, world_size)
