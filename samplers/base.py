"""The sampler contract of DESIGN.md, and the one helper that turns an epoch plan into per-rank batches.

Every batch sampler in ``samplers/`` subclasses :class:`BatchSamplerBase` and implements one method,
``_build_plan(epoch) -> Plan``: the *global* plan of the epoch (all ranks' batches), a pure function of the
metadata, the seed, the epoch and the options. The base class then

* evens the plan out so every rank gets the same number of batches (:func:`even_out` / :func:`group_steps`),
* deals batch ``s * world_size + r`` to rank ``r`` at step ``s`` (:func:`deal`),
* keeps a cursor (epoch, batches yielded) that is the whole checkpoint: restoring recomputes the plan and skips,
  through the same code path as a fresh start.

Rows a plan leaves out are never silent: ``Plan.dropped`` maps a reason to a row count and ``stats()`` reports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
from numpy.typing import NDArray

from native.batching import split_to_multiple
from native.rng import mix_seed

__all__ = ["BatchSamplerBase", "Plan", "check_lengths", "deal", "even_out", "group_steps", "resolve_rank",
           "resolve_world"]

STATE_VERSION = 1


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
    elif arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers (got dtype {arr.dtype})")
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"{name} has a negative value {arr[neg[0]]} at row {int(neg[0])}")
    return arr.astype(np.int64)


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
                seed: int | None = None) -> Plan:
    """Arrange a grouped plan so that the ``world_size`` batches of every step share a group (shape).

    Each group's batches are evened out on their own (:func:`even_out`), cut into steps of ``world_size``
    consecutive batches, and the steps are laid out in ``step_order`` (indices into the steps, grouped in order
    of first appearance of each group) or, with ``seed``, in a seeded random order, or else group by group.
    """
    if plan.groups is None:
        raise ValueError("group_steps needs a plan with groups")
    sizes = plan.sizes
    uniq, first = np.unique(plan.groups, return_index=True)
    order_groups = uniq[np.argsort(first, kind="stable")]
    parts_idx, parts_sizes, parts_groups = [], [], []
    dropped = dict(plan.dropped)
    for g in order_groups:
        sel = np.flatnonzero(plan.groups == g)
        rows = np.concatenate([plan.indices[plan.offsets[b] : plan.offsets[b + 1]] for b in sel])
        sub = Plan.from_sizes(rows, sizes[sel], groups=np.full(len(sel), g, dtype=np.int64))
        sub = even_out(sub, world_size, drop_last)
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
    if step_order is None and seed is not None:
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


def deal(plan: Plan, rank: int, world_size: int) -> Plan:
    """Rank ``rank``'s share: batches ``rank, rank + W, rank + 2W, ...`` (one per step)."""
    if plan.num_batches % world_size:
        raise AssertionError("plan must be evened out before dealing")  # internal invariant
    return take_batches(plan, np.arange(rank, plan.num_batches, world_size, dtype=np.int64))


class BatchSamplerBase:
    """Base of every batch sampler: the cursor, the state, rank dealing and the shared statistics.

    Subclasses set their options in ``__init__`` (calling ``super().__init__``) and implement
    ``_build_plan(epoch) -> Plan`` returning the global plan of an epoch, not yet evened out across ranks.
    Samplers whose batches have a shape set ``plan.groups`` and get steps whose batches share the shape.
    """

    #: extra keys (ints/strings) a subclass stores in its state; checked on load.
    _state_keys: tuple[str, ...] = ()

    def __init__(self, *, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False) -> None:
        if not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int (got {type(seed).__name__})")
        self.seed = int(seed)
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._yielded = 0  # batches of the current epoch already handed out by this rank
        self._resume_at = 0  # where the next iter() starts: set by load_state_dict, else a pass starts at 0
        self._cache: tuple[int, Plan, Plan] | None = None  # (epoch, global plan, rank plan)

    # ---- to implement -------------------------------------------------------------------------------------
    def _build_plan(self, epoch: int) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- plan ---------------------------------------------------------------------------------------------
    def epoch_seed(self, epoch: int | None = None, *salt: int) -> int:
        """The seed of an epoch's randomness: a pure function of (seed, epoch, salt). Same on every rank."""
        return mix_seed(self.seed, self.epoch if epoch is None else epoch, *salt)

    def _plans(self) -> tuple[Plan, Plan]:
        if self._cache is None or self._cache[0] != self.epoch:
            plan = self._build_plan(self.epoch)
            if plan.groups is not None:
                plan = group_steps(plan, self.world_size, self.drop_last, **self._step_order_kw(plan))
            else:
                plan = even_out(plan, self.world_size, self.drop_last)
            self._cache = (self.epoch, plan, deal(plan, self.rank, self.world_size))
        return self._cache[1], self._cache[2]

    def _step_order_kw(self, plan: Plan) -> dict:
        """How grouped steps are ordered: by default a seeded shuffle of the steps."""
        return {"seed": self.epoch_seed(None, 0x5EED)}

    def global_plan(self) -> Plan:
        """The evened-out global plan of the current epoch (every rank's batches, step-major)."""
        return self._plans()[0]

    # ---- iteration ----------------------------------------------------------------------------------------
    def _begin_pass(self) -> int:
        """Where a new ``iter()`` starts: the restored cursor after ``load_state_dict``, else the epoch's start
        (as a torch sampler: a new ``iter()`` is a new pass, also after an abandoned one)."""
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        return start

    def __iter__(self) -> Iterator[NDArray[np.int64]]:
        plan = self._plans()[1]
        start = self._begin_pass()
        off, idx = plan.offsets, plan.indices
        for b in range(start, plan.num_batches):
            self._yielded = b + 1
            yield idx[off[b] : off[b + 1]].copy()
        # a finished pass starts the next pass of the same epoch from its beginning, as torch samplers do
        self._yielded = 0

    def __len__(self) -> int:
        return self._plans()[1].num_batches

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0 (got {epoch=})")
        if int(epoch) != self.epoch:
            self._yielded = self._resume_at = 0
        self.epoch = int(epoch)

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "version": STATE_VERSION,
            "sampler": type(self).__name__,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "world_size": self.world_size,
        }
        for k in self._state_keys:
            state[k] = getattr(self, k)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("sampler", type(self).__name__) != type(self).__name__:
            raise ValueError(f"state was saved by {state['sampler']}, not {type(self).__name__}")
        expected = {"version", "sampler", "seed", "epoch", "batches_yielded", "world_size", *self._state_keys}
        unknown = set(state) - expected
        missing = expected - set(state)
        if unknown or missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: unknown keys {sorted(unknown)}, missing keys "
                f"{sorted(missing)}; pass the dict returned by state_dict()"
            )
        if state["sampler"] != type(self).__name__:
            raise ValueError(f"state was saved by {state['sampler']}, not {type(self).__name__}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state version {state['version']} is not supported (this is {STATE_VERSION})")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"state was saved with world_size={state['world_size']} but this sampler has "
                f"world_size={self.world_size}; resume with the same number of ranks"
            )
        for k in self._state_keys:
            if state[k] != getattr(self, k):
                raise ValueError(f"state has {k}={state[k]!r} but this sampler has {k}={getattr(self, k)!r}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._cache = None
        n = len(self)
        if not 0 <= int(state["batches_yielded"]) <= n:
            raise ValueError(f"batches_yielded={state['batches_yielded']} is outside [0, {n}] for epoch {self.epoch}")
        self._yielded = self._resume_at = int(state["batches_yielded"])

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Plan statistics of the current epoch, over all ranks: batches, rows, batch sizes, drops and repeats."""
        plan = self.global_plan()
        sizes = plan.sizes
        return {
            "epoch": self.epoch,
            "num_batches": int(plan.num_batches),
            "batches_per_rank": int(plan.num_batches // self.world_size),
            "rows": int(len(plan.indices)),
            "mean_batch_size": float(sizes.mean()) if len(sizes) else 0.0,
            "min_batch_size": int(sizes.min()) if len(sizes) else 0,
            "max_batch_size": int(sizes.max()) if len(sizes) else 0,
            "dropped_rows": int(sum(plan.dropped.values())),
            "dropped": dict(plan.dropped),
            "repeated": dict(plan.repeated),
        }
