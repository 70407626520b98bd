"""The pair table of TAS-Balanced: per-query (positive, negative) passage pairs with teacher margins, in CSR form.

"Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling" (Hofstätter, Lin, Yang,
Lin and Hanbury, SIGIR 2021). ``samplers.TopicAwareBatchSampler`` draws one pair per query from it.

At 1e9 queries the table's arrays are memory maps (``np.load(..., mmap_mode="r")``: offsets 8 GB, a few pairs per
query of int32 ids and float32 margins): :class:`PairTable` keeps them as given (int64 offsets, integer ids and
float32/float64 margins are never copied) and validates them :data:`CHECK_ROWS` values at a time. When every array is
a file, a passed check is remembered in the plan cache (``samplers.plan_cache``, keyed by the files' identities:
path, inode, size, modification and change times), so a restarted job does not read 8 GB of offsets again.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.typing import ArrayLike, NDArray

from samplers.plan_cache import PlanCache, file_identity

__all__ = ["CHECK_ROWS", "PairTable"]

#: values validated per step (64 MiB of int64 temporaries at most)
CHECK_ROWS = 1 << 23
#: passed validations of memory-mapped pair tables (this process and disk)
_CHECKED = PlanCache("pair_table_checks", keep=4)


def _int_array(x: ArrayLike, name: str) -> NDArray:
    """A 1-D integer array: an integer ndarray (a memory map too) as given, other input converted to int64."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {arr.shape})")
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"{name} must be an integer array (got dtype {arr.dtype})")
    if arr.dtype.kind == "f" or arr.dtype == np.uint64:
        return np.ascontiguousarray(arr, dtype=np.int64)
    return arr


def _readonly(arr: NDArray) -> NDArray:
    view = arr.view()  # the caller's array keeps its flags
    view.setflags(write=False)
    return view


def _check_offsets(off: NDArray[np.int64]) -> None:
    if len(off) < 1 or off[0] != 0:
        raise ValueError("offsets must be non-empty and start at 0 (offsets[q]:offsets[q+1] are query q's pairs)")
    for a in range(0, len(off) - 1, CHECK_ROWS):
        part = np.asarray(off[a : a + CHECK_ROWS + 1])
        bad = np.flatnonzero(part[1:] < part[:-1])
        if len(bad):
            q = a + int(bad[0])
            raise ValueError(f"offsets must be non-decreasing (offsets[{q}]={int(off[q])} > offsets[{q + 1}]="
                             f"{int(off[q + 1])})")


def _check_margin(mar: NDArray) -> None:
    first, total = -1, 0
    for a in range(0, len(mar), CHECK_ROWS):
        bad = np.flatnonzero(~np.isfinite(np.asarray(mar[a : a + CHECK_ROWS])))
        if len(bad) and first < 0:
            first = a + int(bad[0])
        total += len(bad)
    if total:
        raise ValueError(f"margin has NaN/inf at pair row {first} ({total} rows in all)")


@dataclasses.dataclass(frozen=True)
class PairTable:
    """Per-query (positive, negative) training pairs with teacher margins, in CSR form.

    The pairs of query ``q`` are rows ``offsets[q]:offsets[q+1]`` of ``pos_id``, ``neg_id`` and ``margin``. Arrays
    are kept as given when they already have a supported dtype (a memory map stays a memory map, never copied
    whole) and are validated in chunks of :data:`CHECK_ROWS`; each attribute is a read-only view.

    Attributes:
        offsets: int64 ``[Q+1]``, from 0 to ``P``, non-decreasing (other integer dtypes are converted: a copy).
        pos_id: integer ``[P]`` positive passage ids (int64 for lists and float-typed empty input).
        neg_id: integer ``[P]`` negative passage ids.
        margin: float32 or float64 ``[P]`` teacher margins ``s_pos - s_neg`` (finite; other numeric dtypes are
            converted to float64).
    """

    offsets: NDArray[np.int64]
    pos_id: NDArray[np.integer]
    neg_id: NDArray[np.integer]
    margin: NDArray[np.floating]

    def __post_init__(self) -> None:
        off = _int_array(self.offsets, "offsets")
        if off.dtype != np.int64:
            off = np.ascontiguousarray(off, dtype=np.int64)
        pos = _int_array(self.pos_id, "pos_id")
        neg = _int_array(self.neg_id, "neg_id")
        mar = np.asarray(self.margin)
        if mar.ndim != 1:
            raise ValueError(f"margin must be 1-D (got shape {mar.shape})")
        if mar.dtype.kind not in "fiu":
            raise TypeError(f"margin must be numeric (got dtype {mar.dtype})")
        if mar.dtype not in (np.float32, np.float64):
            mar = np.ascontiguousarray(mar, dtype=np.float64)
        idents = [file_identity(a) for a in (off, pos, neg, mar)]
        key = ("checked", tuple(idents)) if all(idents) else None
        checked = key is not None and _CHECKED.get(key, off) is not None
        if not checked:
            _check_offsets(off)
        n = int(off[-1])
        for name, arr in (("pos_id", pos), ("neg_id", neg), ("margin", mar)):
            if len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} rows but offsets[-1]={n}; they must match")
        if not checked:
            _check_margin(mar)
            if key is not None:
                _CHECKED.put(key, {"pairs": n}, off)
        for name, arr in (("offsets", off), ("pos_id", pos), ("neg_id", neg), ("margin", mar)):
            object.__setattr__(self, name, _readonly(arr))

    @classmethod
    def from_arrays(cls, query: ArrayLike, pos_id: ArrayLike, neg_id: ArrayLike, margin: ArrayLike, *,
                    num_queries: int) -> PairTable:
        """Build a table from one row per pair, in any order (rows are grouped by query, stably; in memory).

        Args:
            query: int ``[P]`` query index of each pair, in ``[0, num_queries)``.
            pos_id, neg_id: int ``[P]`` passage ids.
            margin: float ``[P]`` teacher margins (``s_pos - s_neg``).
            num_queries: number of queries ``Q`` (the length of the sampler's ``cluster_ids``).

        Raises:
            ValueError: a pair names a query outside ``[0, num_queries)`` (the first such row is named).
        """
        if not isinstance(num_queries, (int, np.integer)) or num_queries < 0:
            raise ValueError(f"num_queries must be an integer >= 0 (got {num_queries=})")
        q = np.ascontiguousarray(_int_array(query, "query"), dtype=np.int64)
        bad = np.flatnonzero((q < 0) | (q >= num_queries))
        if len(bad):
            r = int(bad[0])
            raise ValueError(
                f"pair row {r} names query {int(q[r])}, which is not in [0, {num_queries}) "
                f"({len(bad)} rows name unknown queries); every pair must belong to a known query"
            )
        order = np.argsort(q, kind="stable")
        offsets = np.zeros(int(num_queries) + 1, dtype=np.int64)
        np.cumsum(np.bincount(q, minlength=int(num_queries)), out=offsets[1:])
        cols = []
        for name, a in (("pos_id", pos_id), ("neg_id", neg_id), ("margin", margin)):
            a = np.asarray(a)
            if a.ndim != 1 or len(a) != len(q):
                raise ValueError(f"{name} has shape {a.shape} but query has {len(q)} rows; they must match")
            cols.append(a[order])
        return cls(offsets, *cols)

    @property
    def num_queries(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_pairs(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_pairs

    def counts(self) -> NDArray[np.int64]:
        """Pairs per query, int64 ``[Q]`` (O(Q) memory: the exact plan's; the windowed plan never calls it)."""
        return np.diff(self.offsets)

    def query_of(self, rows: ArrayLike) -> NDArray[np.int64]:
        """The query of each pair row: int64 array shaped like ``rows`` (a binary search per row)."""
        r = np.asarray(rows, dtype=np.int64)
        if r.size and (r.min() < 0 or r.max() >= self.num_pairs):
            raise IndexError(f"pair rows must lie in [0, {self.num_pairs})")
        return np.searchsorted(self.offsets, r, side="right").astype(np.int64) - 1
