"""Plans kept as batch sizes over a virtual stream of rows: what a sampler needs at 1e9 rows.

A materialised :class:`samplers.base.Plan` holds every row of the epoch (8 B/row on every rank). Samplers whose
epoch is a *stream* (a stateless permutation of the rows, or a sequence of independently planned windows) keep
only the batch sizes instead: batch ``b`` of the arranged global plan holds the stream positions
``[base + offsets[b], base + offsets[b + 1])``, and the sampler maps positions to rows on demand (e.g.
``native.feistel.feistel_permute``). Arranging for ``world_size`` ranks and resuming at another world size
(elastic) change only the sizes and ``base``: :func:`even_out_sizes` and :func:`arrange_sizes` mirror
:func:`samplers.base.even_out` and ``BatchSamplerBase._plans`` exactly (a split batch keeps its rows in order,
so every batch stays a contiguous range of the stream), which the tests check against the materialised path.

Memory: ``8 B`` per batch (``sizes`` and ``offsets``), nothing per row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import NDArray

from native.batching import split_to_multiple

__all__ = ["SizePlan", "arrange_sizes", "check_durations_part", "check_lengths_chunked", "count_above",
           "even_out_sizes"]


@dataclasses.dataclass
class SizePlan:
    """Batches as contiguous ranges of a stream: batch ``b`` is positions ``[base + offsets[b], base +
    offsets[b+1])``.

    Attributes:
        base: stream position of the first row of batch 0.
        sizes: int64 ``[B]`` rows per batch.
        dropped: reason -> rows left out of the epoch.
    """

    base: int
    sizes: NDArray[np.int64]
    dropped: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = np.ascontiguousarray(self.sizes, dtype=np.int64)
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])

    @property
    def num_batches(self) -> int:
        return len(self.sizes)

    @property
    def rows(self) -> int:
        return int(self.offsets[-1])

    def span(self, batch: int) -> tuple[int, int]:
        """Stream positions ``(start, stop)`` of batch ``batch``."""
        return self.base + int(self.offsets[batch]), self.base + int(self.offsets[batch + 1])

    def skip(self, count: int) -> SizePlan:
        """The plan without its first ``count`` batches (what ``take_batches(plan, arange(count, B))`` does)."""
        return SizePlan(self.base + int(self.offsets[count]), self.sizes[count:], dict(self.dropped))


def even_out_sizes(plan: SizePlan, world_size: int, drop_last: bool) -> SizePlan:
    """:func:`samplers.base.even_out` on sizes: the batch count made a multiple of ``world_size`` by splitting the
    largest batches (``drop_last=False``) or dropping the trailing batches (counted in ``dropped``)."""
    nb = plan.num_batches
    if nb % world_size == 0:
        return plan
    tail = None
    if not drop_last and plan.rows < -(-nb // world_size) * world_size:
        tail = "uneven_tail_too_few_rows_to_split"
    elif drop_last:
        tail = "uneven_tail"
    if tail is not None:
        keep = nb - nb % world_size
        dropped = dict(plan.dropped)
        dropped[tail] = dropped.get(tail, 0) + int(plan.offsets[-1] - plan.offsets[keep])
        return SizePlan(plan.base, plan.sizes[:keep], dropped)
    return SizePlan(plan.base, split_to_multiple(plan.sizes, world_size), dict(plan.dropped))


def arrange_sizes(first, segments: tuple[tuple[int, int], ...], world_size: int, drop_last: bool) -> SizePlan:
    """The rest of an epoch arranged for ``world_size`` ranks, as ``BatchSamplerBase._plans`` arranges it.

    Args:
        first: callable ``first(w) -> SizePlan``: the epoch's global plan evened out for ``w`` ranks.
        segments: ``((w, batches per rank consumed), ...)`` under earlier world sizes (elastic resume).
        world_size: ranks now.
        drop_last: as the sampler's.

    Returns:
        the plan whose batches ``r, r + W, ...`` are rank ``r``'s from now on.
    """
    if not segments:
        return first(world_size)
    w0, k0 = segments[0]
    plan = first(w0).skip(k0 * w0)
    for w, k in segments[1:]:
        plan = even_out_sizes(plan, w, drop_last).skip(k * w)
    return even_out_sizes(plan, world_size, drop_last)


#: rows validated per step by :func:`check_lengths_chunked` (64 MiB of int32 temporaries at most)
CHECK_CHUNK = 1 << 24


def check_lengths_chunked(lengths, name: str = "lengths") -> NDArray:
    """:func:`samplers.base.check_lengths` for arrays too large to copy: 1-D, integers (or floats holding whole
    numbers, finite, ``<= 2**53``), ``>= 0``, checked ``CHECK_CHUNK`` rows at a time. Returns the array as given
    (a memory map stays a memory map, int32 stays int32); errors name the parameter and the first bad row."""
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape 1-D (got shape {arr.shape})")
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"{name} must be integers (got dtype {arr.dtype})")
    if arr.dtype == np.uint64:
        raise TypeError(f"{name} must be int64/int32 or smaller (got uint64); store lengths as int64")
    for a in range(0, len(arr), CHECK_CHUNK):
        part = arr[a : a + CHECK_CHUNK]
        if kind == "f":
            bad = np.flatnonzero(~np.isfinite(part))
            if len(bad):
                raise ValueError(f"{name} has NaN/inf at row {a + int(bad[0])}")
            bad = np.flatnonzero((part != np.round(part)) | (np.abs(part) > 2.0**53))
            if len(bad):
                raise ValueError(f"{name} must be whole numbers below 2**53: row {a + int(bad[0])} has "
                                 f"{part[bad[0]]}")
        if kind != "u" and part.min(initial=0) < 0:
            i = int(np.flatnonzero(part < 0)[0])
            raise ValueError(f"{name} has a negative value {part[i]} at row {a + i}")
    return arr


def check_durations_part(part: NDArray, offset: int, name: str = "durations") -> None:
    """Check rows ``offset, offset + 1, ...`` of a durations array (``part``, one chunk of it): finite and ``> 0``;
    the ``ValueError`` names the parameter and the first bad row of the whole array."""
    if part.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(part))
        if len(bad):
            raise ValueError(f"{name} has NaN/inf at row {offset + int(bad[0])}; fix the metadata")
    bad = np.flatnonzero(part <= 0)
    if len(bad):
        raise ValueError(f"{name} must be > 0: row {offset + int(bad[0])} has {part[bad[0]]}; remove empty or broken "
                         "cuts before sampling")


def count_above(values: NDArray, limit: float) -> tuple[int, int]:
    """``(rows with value > limit, first such row or -1)``, ``CHECK_CHUNK`` rows at a time."""
    count, first = 0, -1
    for a in range(0, len(values), CHECK_CHUNK):
        hit = np.flatnonzero(values[a : a + CHECK_CHUNK] > limit)
        if len(hit) and first < 0:
            first = a + int(hit[0])
        count += len(hit)
    return count, first
