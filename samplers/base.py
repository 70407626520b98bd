"""The sampler contract of DESIGN.md, and the one helper that turns an epoch plan into per-rank batches.

Every batch sampler in ``samplers/`` subclasses :class:`BatchSamplerBase` and implements one method,
``_build_plan(epoch) -> Plan``: the *global* plan of the epoch (all ranks' batches), a pure function of the
metadata, the seed, the epoch and the options. The base class then

* evens the plan out so every rank gets the same number of batches (:func:`even_out` / :func:`group_steps`),
* deals batch ``s * world_size + r`` to rank ``r`` at step ``s`` (:func:`deal`),
* keeps a cursor (epoch, batches yielded) that is the whole checkpoint: restoring recomputes the plan and skips,
  through the same code path as a fresh start (:meth:`BatchSamplerBase.reset`, the one entry that positions a
  sampler: ``set_epoch``, ``load_state_dict`` and ``datapipe.DataLoader`` all go through it, so epoch hooks run
  whichever path moved the epoch);
* guards a state with the options and a digest of the metadata, so it cannot load into another configuration;
* resumes a state saved at another world size (elastic): the rows the old ranks had not yet received are dealt
  to the new ranks.

Rows a plan leaves out are never silent: ``Plan.dropped`` maps a reason to a row count, ``stats()`` reports it, and
a plan that drops rows (or repeats rows) beyond what was asked for emits :class:`PlanWarning` once per epoch
(``strict=True`` raises ``ValueError`` instead).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TypedDict

import numpy as np
from numpy.typing import NDArray

from native.rng import mix_seed
from samplers.plan import (Plan, check_budget, check_lengths, deal, digest_array, even_out, group_steps, jsonable,
                           regroup_in_order, reorder_steps, resolve_rank, resolve_world, take_batches)

# the plan helpers are re-exported: samplers import them from here, next to the contract they serve
__all__ = ["BatchSamplerBase", "Plan", "PlanStats", "PlanWarning", "check_budget", "check_lengths", "deal",
           "digest_array", "even_out", "group_steps", "jsonable", "regroup_in_order", "reorder_steps", "resolve_rank",
           "resolve_world", "take_batches"]

STATE_VERSION = 2


class PlanWarning(UserWarning):
    """A sampler's plan drops rows, or repeats rows beyond what was asked for. Emitted once per epoch with the
    counts, the share of tokens (or seconds) lost, the reason and the option that changes it; pass
    ``strict=True`` to the sampler to make it a ``ValueError``."""


class PlanStats(TypedDict):
    """The keys every sampler's ``stats()`` returns, for the current epoch over all ranks.

    A plain ``dict`` at run time (``json.dumps`` takes it). Each sampler adds its own keys (padding, tokens per
    batch, passes per domain, ...), listed in its ``stats()`` docstring; a type checker sees the shared ones.

    Keys:
        epoch: the epoch the statistics describe.
        num_batches: batches of the epoch, all ranks together.
        batches_per_rank: batches each rank yields (``num_batches // world_size``).
        rows: rows the epoch yields, all ranks together (repeats counted each time).
        mean_batch_size, min_batch_size, max_batch_size: rows per batch (0 for an empty epoch).
        dropped_rows: rows left out of the epoch, ``sum(dropped.values())``.
        dropped: reason -> rows left out for it (``"incomplete_batch"``, ``"longer_than_max_tokens"``, ...).
        repeated: reason -> rows yielded more than once for it.
    """

    epoch: int
    num_batches: int
    batches_per_rank: int
    rows: int
    mean_batch_size: float
    min_batch_size: int
    max_batch_size: int
    dropped_rows: int
    dropped: dict[str, int]
    repeated: dict[str, int]


#: what each drop reason means and the option that changes it (for PlanWarning messages)
DROP_HINTS = {
    "uneven_tail_too_few_rows_to_split": "too few rows to give every rank a batch at the last step; use fewer ranks "
                                         "or more data",
    "longer_than_max_tokens": "rows longer than max_tokens; raise max_tokens, or truncate/split long rows at ingest",
    "longer_than_max_duration": "cuts longer than max_duration; raise max_duration",
    "outside_2d_bins": "cuts outside every 2D bucket; widen the bins or pass strict_2d=False",
    "incomplete_step": "sequences that do not fill a whole step of their bucket; pass drop_last=False to fill it with "
                       "repeats, or drop_last=True to drop them without this warning",
}
#: drop reasons the user asked for by passing drop_last=True
ASKED_FOR = frozenset({"incomplete_batch", "uneven_tail"})


class BatchSamplerBase:
    """Base of every batch sampler: the cursor, the state, rank dealing and the shared statistics.

    Subclasses set their options in ``__init__`` (calling ``super().__init__``) and implement
    ``_build_plan(epoch) -> Plan`` returning the global plan of an epoch, not yet evened out across ranks (reading
    ``self.world_size`` when the plan depends on it: an elastic resume builds the plan of the old world size).
    Samplers whose batches have a shape set ``plan.groups`` and get steps whose batches share the shape.
    ``_options()`` lists every option that shapes the plan (it guards states), ``_metadata()`` the size and digest
    of the metadata, ``_on_epoch(epoch)`` is the hook that runs whenever the sampler is positioned at an epoch.
    """

    #: extra keys (ints/strings) a subclass stores in its state; checked on load.
    _state_keys: tuple[str, ...] = ()
    #: whether a state saved at another world size can resume here (see :meth:`reset`)
    _elastic: bool = True

    def __init__(self, *, seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 drop_last: bool = False, strict: bool = False) -> None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int (got {type(seed).__name__})")
        self.seed = int(seed)
        self.rank, self.world_size = resolve_world(rank, world_size)
        self.drop_last = bool(drop_last)
        self.strict = bool(strict)
        self.epoch = 0
        self._yielded = 0  # batches of the current epoch already handed out by this rank
        self._resume_at = 0  # where the next iter() starts: set by reset/load_state_dict, else a pass starts at 0
        # elastic resume: (world_size, batches per rank) consumed earlier in this epoch under other world sizes
        self._segments: tuple[tuple[int, int], ...] = ()
        self._cache: tuple | None = None  # ((epoch, segments), global plan, rank plan)
        self._warned: set[int] = set()  # epochs whose PlanWarning was emitted

    # ---- to implement -------------------------------------------------------------------------------------
    def _build_plan(self, epoch: int) -> Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def _options(self) -> dict:
        """Every option that shapes the plan (JSON-serialisable). Default: the ``_state_keys`` attributes."""
        return {k: getattr(self, k) for k in self._state_keys}

    def _metadata(self) -> dict:
        """Size and digest of the metadata the plan is computed from."""
        return {}

    def _on_epoch(self, epoch: int) -> None:
        """Epoch hook, run by every path that positions the sampler (must be idempotent)."""

    def _lost_share(self, plan: Plan) -> str:
        """Share of tokens/seconds a plan leaves out, for PlanWarning messages ('' when not meaningful)."""
        return ""

    # ---- plan ---------------------------------------------------------------------------------------------
    def epoch_seed(self, epoch: int | None = None, *salt: int) -> int:
        """The seed of an epoch's randomness: a pure function of (seed, epoch, salt). Same on every rank."""
        return mix_seed(self.seed, self.epoch if epoch is None else epoch, *salt)

    def _arranged(self, epoch: int, world_size: int) -> Plan:
        """The global plan of ``epoch`` evened out and arranged in steps for ``world_size`` ranks."""
        saved = self.world_size
        self.world_size = world_size  # plans that depend on the world size read it (elastic: the old one)
        try:
            plan = self._build_plan(epoch)
            if plan.groups is not None:
                return group_steps(plan, world_size, self.drop_last, **self._step_order_kw(plan))
            return even_out(plan, world_size, self.drop_last)
        finally:
            self.world_size = saved

    def _plans(self) -> tuple[Plan, Plan]:
        key = (self.epoch, self._segments)
        if self._cache is None or self._cache[0] != key:
            if not self._segments:
                plan = self._arranged(self.epoch, self.world_size)
            else:
                w0, k0 = self._segments[0]
                plan = self._arranged(self.epoch, w0)
                plan = take_batches(plan, np.arange(k0 * w0, plan.num_batches, dtype=np.int64))
                for w, k in self._segments[1:]:
                    plan = regroup_in_order(plan, w, self.drop_last)
                    plan = take_batches(plan, np.arange(k * w, plan.num_batches, dtype=np.int64))
                plan = regroup_in_order(plan, self.world_size, self.drop_last)
            self._cache = (key, plan, deal(plan, self.rank, self.world_size))
            self._report(self.epoch, plan)
        return self._cache[1], self._cache[2]

    def _report(self, epoch: int, plan: Plan) -> None:
        """Emit the epoch's PlanWarning (or raise with ``strict``) when the plan drops or repeats rows unasked."""
        self._announce(epoch, plan.dropped, plan.repeated, plan)

    def _asked_for(self) -> frozenset:
        """Drop/repeat reasons the user's options asked for (no PlanWarning for them)."""
        return ASKED_FOR if self.drop_last else frozenset()

    def _announce(self, epoch: int, dropped: Mapping, repeated: Mapping, plan: Plan | None = None) -> None:
        asked = self._asked_for()
        drops = {k: int(v) for k, v in dropped.items() if v and k not in asked}
        reps = {k: int(v) for k, v in repeated.items() if v and k not in asked}
        if not (drops or reps) or epoch in self._warned:
            return
        self._warned.add(epoch)
        parts = []
        if drops:
            default = "see stats()['dropped']"
            what = "; ".join(f"{n} rows: {k} ({DROP_HINTS.get(k, default)})" for k, n in drops.items())
            share = self._lost_share(plan) if plan is not None else ""
            parts.append(f"drops {sum(drops.values())} rows{share} [{what}]")
        if reps:
            parts.append("repeats " + "; ".join(f"{n} row slots: {k}" for k, n in reps.items()))
        msg = f"{type(self).__name__} epoch {epoch}: the plan " + " and ".join(parts)
        if self.strict:
            raise ValueError(msg + " (strict=True)")
        warnings.warn(msg + "; pass strict=True to make this an error", PlanWarning, stacklevel=4)

    def _step_order_kw(self, plan: Plan) -> dict:
        """How grouped steps are ordered: by default a seeded shuffle of the steps."""
        return {"seed": self.epoch_seed(None, 0x5EED)}

    def global_plan(self) -> Plan:
        """The evened-out global plan of the current epoch (every rank's batches, step-major)."""
        return self._plans()[0]

    # ---- iteration ----------------------------------------------------------------------------------------
    def _begin_pass(self) -> int:
        """Where a new ``iter()`` starts: the restored cursor after ``reset``/``load_state_dict``, else the epoch's
        start (as a torch sampler: a new ``iter()`` is a new pass, also after an abandoned one)."""
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        return start

    def _on_demand(self) -> tuple[int, Callable[[int], NDArray[np.int64]]] | None:
        """For plans computed on demand (the windowed samplers at scale): ``(global batches of the arranged plan,
        rows of global batch b)``; ``None`` (default) for plans built whole."""
        return None

    def __iter__(self) -> Iterator[NDArray[np.int64]]:
        lazy = self._on_demand()
        if lazy is None:
            plan = self._plans()[1]
            start = self._begin_pass()
            off, idx = plan.offsets, plan.indices
            for b in range(start, plan.num_batches):
                self._yielded = b + 1
                yield idx[off[b] : off[b + 1]].copy()
        else:
            num, rows_of = lazy
            w, r = self.world_size, self.rank
            for j in range(self._begin_pass(), num // w):
                rows = rows_of(j * w + r)  # rank r's batch at step j
                self._yielded = j + 1
                yield rows
        # a finished pass starts the next pass of the same epoch from its beginning, as torch samplers do
        self._yielded = 0

    def __len__(self) -> int:
        """Batches this rank yields in the epoch the next ``iter()`` runs."""
        lazy = self._on_demand()
        return self._plans()[1].num_batches if lazy is None else lazy[0] // self.world_size

    # ---- positioning: one entry ---------------------------------------------------------------------------
    def reset(self, initial_state: Mapping | None = None) -> None:
        """Position the sampler: at the start of the current epoch (``None``), or where ``initial_state`` (a dict
        from :meth:`state_dict`) says. ``set_epoch`` and ``load_state_dict`` both come here, and so does
        ``datapipe.DataLoader``; the epoch hook (e.g. NGAME's refresh) runs whichever path moved the epoch.

        A state saved at another world size resumes elastically: the rows the old ranks had not yet received in
        that epoch are dealt to this sampler's ranks (each once, equal batch counts per rank, same-shape steps).
        """
        if initial_state is None:
            self._position(self.epoch, 0, ())
            return
        state = self._check_state(initial_state)
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        segments = tuple((int(w), int(k)) for w, k in state["segments"])
        if int(state["world_size"]) != self.world_size:
            if not self._elastic:
                raise ValueError(f"{type(self).__name__} cannot resume a state saved at world_size="
                                 f"{state['world_size']} with world_size={self.world_size}: {self._elastic_reason()}")
            segments, done = (*segments, (int(state["world_size"]), done)), 0
        self._position(epoch, done, segments)

    def seek(self, batches_yielded: int) -> None:
        """Position the next ``iter()`` after ``batches_yielded`` batches of the current epoch (keeping an elastic
        resume's segments): what ``datapipe.DataLoader`` does at each pass."""
        self._position(self.epoch, int(batches_yielded), self._segments)

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batches yielded)``: where the sampler stands (after ``load_state_dict``, where it resumes)."""
        return self.epoch, self._yielded

    def _elastic_reason(self) -> str:
        return "resume with the same number of ranks"

    def _position(self, epoch: int, done: int, segments: tuple) -> None:
        self._on_epoch(epoch)
        if epoch != self.epoch or segments != self._segments:
            self._cache = None
        self.epoch, self._segments = epoch, segments
        if done and done > len(self):  # a fresh epoch (done == 0) is planned lazily, on first use
            raise ValueError(f"batches_yielded={done} is outside [0, {len(self)}] for epoch {epoch} of "
                             f"{type(self).__name__}")
        self._yielded = self._resume_at = done

    def set_epoch(self, epoch: int) -> None:
        """Position the sampler at the start of ``epoch`` (runs the epoch hook). Setting the epoch it is already at
        keeps a position restored by ``load_state_dict`` (the usual loop calls ``set_epoch`` after a resume)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0 (got {epoch=})")
        if int(epoch) == self.epoch:
            self._on_epoch(self.epoch)
            return
        self._position(int(epoch), 0, ())

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Small and JSON-serialisable: position (epoch, batches yielded, elastic segments), seed, world size, every
        option that shapes the plan and a digest of the metadata."""
        state = {
            "version": STATE_VERSION,
            "sampler": type(self).__name__,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "world_size": self.world_size,
            "segments": [list(s) for s in self._segments],
            "options": jsonable({"drop_last": self.drop_last, **self._options()}),
            "metadata": jsonable(self._metadata()),
        }
        for k in self._state_keys:
            state[k] = getattr(self, k)
        return state

    def _check_state(self, state: Mapping) -> Mapping:
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(f"{name}.load_state_dict expects the dict returned by state_dict() "
                            f"(got {type(state).__name__})")
        if "sampler" in state and state["sampler"] != name:
            raise ValueError(f"state was saved by {state['sampler']}, not {name}")
        if "version" in state and state["version"] != STATE_VERSION:
            raise ValueError(f"state version {state['version']} is not supported (this is {STATE_VERSION}); "
                             "states of datapipe < 0.2 cannot resume here")
        expected = {"version", "sampler", "seed", "epoch", "batches_yielded", "world_size", "segments", "options",
                    "metadata", *self._state_keys}
        unknown, missing = set(state) - expected, expected - set(state)
        if unknown or missing:
            raise ValueError(f"{name}.load_state_dict: unknown keys {sorted(unknown)}, missing keys "
                             f"{sorted(missing)}; pass the dict returned by state_dict()")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']} but this {name} has seed={self.seed}")
        mine = jsonable({"drop_last": self.drop_last, **self._options()})
        theirs = state["options"]
        for k in [*mine, *(k for k in theirs if k not in mine)]:  # the sampler's own order: the first that differs
            if mine.get(k, "<absent>") != theirs.get(k, "<absent>"):
                raise ValueError(f"state was saved with other options: {k}={theirs.get(k, '<absent>')!r} there, "
                                 f"{k}={mine.get(k, '<absent>')!r} in this {name}; it cannot resume another "
                                 "configuration")
        meta = jsonable(self._metadata())
        for k in sorted(set(meta) | set(state["metadata"])):
            if meta.get(k) != state["metadata"].get(k):
                raise ValueError(f"state was saved over other metadata ({k}: {state['metadata'].get(k)!r} there, "
                                 f"{meta.get(k)!r} here): another dataset, or the same one changed")
        for k in self._state_keys:
            if jsonable(state[k]) != jsonable(getattr(self, k)):
                raise ValueError(f"state has {k}={state[k]!r} but this sampler has {k}={getattr(self, k)!r}")
        for k in ("epoch", "batches_yielded", "world_size"):
            if not isinstance(state[k], (int, np.integer)) or state[k] < 0:
                raise ValueError(f"state[{k!r}] must be an integer >= 0 (got {state[k]!r})")
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Resume exactly where ``state`` was saved (see :meth:`reset`); refuses another configuration naming the
        first differing option, and accepts another world size (elastic) where the sampler allows it."""
        self.reset(state)

    # ---- statistics ---------------------------------------------------------------------------------------
    def stats(self) -> PlanStats:
        """Plan statistics of the current epoch, over all ranks: batches, rows, batch sizes, drops and repeats
        (the keys of :class:`PlanStats`; subclasses add their own)."""
        plan = self.global_plan()
        return self._shared_stats(plan.sizes, len(plan.indices), plan.dropped, plan.repeated)

    def _shared_stats(self, sizes: NDArray, rows: int, dropped: Mapping, repeated: Mapping) -> PlanStats:
        """The keys every sampler's ``stats()`` has, from the global plan's batch sizes, rows, drops and repeats."""
        nb = len(sizes)
        return {
            "epoch": self.epoch,
            "num_batches": int(nb),
            "batches_per_rank": int(nb // self.world_size),
            "rows": int(rows),
            "mean_batch_size": float(sizes.mean()) if nb else 0.0,
            "min_batch_size": int(sizes.min()) if nb else 0,
            "max_batch_size": int(sizes.max()) if nb else 0,
            "dropped_rows": int(sum(dropped.values())),
            "dropped": {k: int(v) for k, v in dropped.items()},
            "repeated": {k: int(v) for k, v in repeated.items()},
        }
